"""Bytes <-> envelopes: Avro (plain or Confluent wire format) and JSON.

Outputs are Avro by default because the schemas are the contract; JSON is offered because
many upstream services cannot speak Avro. Decoding never raises anything but
:class:`DecodeError`, so a stage can turn any bad input into a dead letter with a reason.

Plain Avro is written by a writer compiled per schema from the envelope's attributes
(:func:`_writer`, the hot path: every stage hop encodes) and read by fastavro; both give
exactly fastavro's bytes and values (``tests/contract/test_wire_golden.py``).

The Confluent wire format (magic byte, schema id, Avro body) goes through a
:class:`SchemaWire`, a Schema Registry at the Kafka edge (``pipeline.transport.registry``):
it writes the registered schema's id, and reads a frame with the schema its id names (the
writer's), resolved against this codec's schema of the envelope (the reader's), so a
producer on an older or newer compatible schema is read correctly. Without a wire the
Confluent frame is read with the local schema, its id unchecked.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import fastavro
from fastavro.logical_writers import LOGICAL_WRITERS
from pydantic import TypeAdapter, ValidationError

from pipeline.contract.envelopes import Envelope
from pipeline.contract.jsontext import dumps as _to_json
from pipeline.contract.jsontext import loads as json_loads

E = TypeVar("E", bound=Envelope)

CONTENT_TYPE_HEADER = "content-type"
JSON = "application/json"
AVRO = "application/vnd.llmpipe.avro"
CONFLUENT_AVRO = "application/vnd.confluent.avro"
CONFLUENT_MAGIC = 0
JSON_FIELD_MARK = "llmpipe.json"

OutputFormat = Literal["avro", "json", "confluent"]

DEFAULT_SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"

RECENT_ENCODED = 1_024
"""Envelopes a codec remembers by the bytes it encoded them to. A worker's next stage
reads its previous stage's outputs within milliseconds, so a few in-flight windows
suffice; outputs read by another worker are forgotten after this many newer ones."""


class DecodeError(Exception):
    """Bytes that do not make an envelope; ``reason`` is the dead-letter reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def load_schemas(directory: Path = DEFAULT_SCHEMAS_DIR) -> dict[str, dict[str, Any]]:
    """Read every ``*.avsc`` and return the raw schemas by full name.

    Raw (unparsed) schemas are kept because fastavro drops custom properties such as the
    JSON-field mark, and the codec needs them.
    """
    raw: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.avsc")):
        schema = json.loads(path.read_text())
        raw[f"{schema['namespace']}.{schema['name']}"] = schema
    return raw


class SchemaUnavailable(Exception):
    """The registry could not be asked for a frame's writer schema (unreachable, 5xx): not
    the message's fault, so never a ``decode_error``; the message's handling fails instead
    (an ``internal_error`` dead letter, replayable once the registry is back)."""


class SchemaWire(Protocol):
    """Confluent frames against a Schema Registry, per envelope schema (full name)."""

    def encode(self, name: str, record: dict[str, Any]) -> bytes:
        """The frame for an Avro ``record`` of schema ``name``: magic byte, the id the
        registry gave that schema, the body."""

    def decode(self, name: str, data: bytes) -> Any:
        """The record in frame ``data``, read with the writer's schema (found by the id in
        the frame) and resolved against the local schema ``name``. Raises
        :class:`DecodeError` for an id the registry does not know, and
        :class:`SchemaUnavailable` when the registry cannot be asked."""


class Codec:
    """Encodes and decodes every envelope type with one set of schemas."""

    def __init__(
        self,
        schemas: Mapping[str, dict[str, Any]] | None = None,
        output_format: OutputFormat = "avro",
        wire: SchemaWire | None = None,
    ) -> None:
        self._raw = dict(schemas if schemas is not None else load_schemas())
        self._parsed = {name: _parse(self._raw, name) for name in self._raw}
        self._to_avro = {
            name: _converter(schema, self._raw, True) for name, schema in self._raw.items()
        }
        self._from_avro = {
            name: _converter(schema, self._raw, False) for name, schema in self._raw.items()
        }
        self._writers = {name: _writer(schema, self._raw) for name, schema in self._raw.items()}
        self.output_format = output_format
        if output_format == "confluent" and wire is None:
            raise ValueError("the Confluent wire format needs a Schema Registry")
        self._wire = wire
        self._older_parsed: dict[str, list[Any]] = {}
        self._recent: dict[bytes, tuple[Envelope, str]] = {}  # see encode()

    def schema_name(self, cls: type[Envelope]) -> str:
        return f"llmpipe.{cls.__name__}"

    def registry_schema(self, name: str) -> dict[str, Any]:
        return registry_schema(self._raw, name)

    def encode(self, envelope: Envelope, *, remember: bool = False) -> tuple[bytes, str]:
        """Return the bytes and the content type to put in the ``content-type`` header.

        ``remember`` (a stage's outputs, encoded on the worker's event loop; never from
        another thread) keeps the envelope by its bytes, the oldest of
        :data:`RECENT_ENCODED` forgotten first: when this codec decodes those very bytes,
        as the next stage of the same worker does moments later, :meth:`decode` returns
        it instead of reading and validating it again (reading and validating were 9 % of
        a worker's CPU). Same bytes, same codec: the same envelope
        (``tests/contract/test_envelopes.py`` round-trips every envelope type).
        """
        if self.output_format == "json":
            data, kind = envelope.model_dump_json().encode(), JSON
        elif self.output_format == "confluent":
            assert self._wire is not None
            name = self.schema_name(type(envelope))
            data, kind = self._wire.encode(name, self.record(envelope)), CONFLUENT_AVRO
        else:
            out = bytearray()
            self._writers[self.schema_name(type(envelope))](envelope, out)
            data, kind = bytes(out), AVRO
        if remember:
            recent = self._recent
            if len(recent) >= RECENT_ENCODED:
                del recent[next(iter(recent))]
            recent[data] = (envelope, kind)
        return data, kind

    def record(self, envelope: Envelope) -> dict[str, Any]:
        """The envelope as the record fastavro (and confluent-kafka's serializer) writes:
        its fields, JSON-marked ones as text. Plain Avro output does not go through it (the
        compiled writer reads the model itself); it is the reference that writer matches."""
        record: dict[str, Any] = self._to_avro[self.schema_name(type(envelope))](
            envelope.model_dump()
        )
        return record

    def decode_fields(
        self, data: bytes, cls: type[Envelope], content_type: str | None = None
    ) -> dict[str, Any]:
        """Decode to plain fields without validating them against the model.

        Kept separate from :meth:`decode` so the validation stage can tell "not a message at
        all" (``decode_error``) from "a message with a missing or bad field".
        """
        kind = _detect(data, content_type)
        try:
            if kind == JSON:
                value = json_loads(data)
                if not isinstance(value, dict):
                    raise DecodeError("decode_error", "JSON message is not an object")
                return value
            name = self.schema_name(cls)
            body = data
            if kind == CONFLUENT_AVRO:
                if len(data) < 5:
                    raise DecodeError("decode_error", "Confluent frame shorter than 5 bytes")
                body = data[5:]
            if kind == CONFLUENT_AVRO and self._wire is not None:
                record = self._wire.decode(name, data)
            else:
                record = self._schemaless(name, body)
            fields = self._from_avro[name](record)
            if not isinstance(fields, dict):
                raise DecodeError("decode_error", "Avro record did not decode to an object")
            return fields
        except (DecodeError, SchemaUnavailable):
            raise
        except RecursionError:
            raise DecodeError("decode_error", "message nested too deeply") from None
        except UnicodeDecodeError as exc:
            raise DecodeError("decode_error", f"invalid UTF-8 at byte {exc.start}") from None
        except json.JSONDecodeError as exc:
            raise DecodeError("decode_error", f"invalid JSON: {exc.msg} at {exc.pos}") from None
        except Exception as exc:  # fastavro raises many unrelated types on corrupt input
            raise DecodeError("decode_error", f"invalid Avro: {type(exc).__name__}") from None

    def _schemaless(self, name: str, body: bytes) -> Any:
        """Read with the local schema; a body that ends early may have been written before
        trailing fields with defaults were added (schemaless Avro carries no writer
        schema): it is read with those fields left out, so the defaults apply."""
        stream = io.BytesIO(body)
        try:
            record = fastavro.schemaless_reader(stream, self._parsed[name], None)
        except EOFError:
            for older in self._older(name):
                stream = io.BytesIO(body)
                try:
                    record = fastavro.schemaless_reader(stream, older, None)
                except EOFError:
                    continue
                if stream.tell() == len(body):
                    return record
            raise
        if stream.tell() != len(body):
            raise DecodeError("decode_error", "trailing bytes after the Avro record")
        return record

    def _older(self, name: str) -> list[Any]:
        """The schema ``name`` without its last 1, 2, ... fields, while those have defaults."""
        if name not in self._older_parsed:
            raw = self._raw[name]
            fields = raw["fields"]
            older = []
            cut = len(fields)
            while cut > 0 and "default" in fields[cut - 1]:
                cut -= 1
                older.append(_parse({**self._raw, name: {**raw, "fields": fields[:cut]}}, name))
            self._older_parsed[name] = older
        return self._older_parsed[name]

    def decode(self, data: bytes, cls: type[E], content_type: str | None = None) -> E:
        recent = self._recent.pop(data, None)
        if recent is not None:
            envelope, kind = recent
            if type(envelope) is cls and _detect(data, content_type) == kind:
                return envelope
        fields = self.decode_fields(data, cls, content_type)
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise DecodeError("invalid_envelope", _first_error(exc)) from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "<root>"
    return f"{loc}: {err['msg']}"


def _detect(data: bytes, content_type: str | None) -> str:
    """Header first; otherwise sniff: ``{`` cannot start a valid Avro record of ours."""
    if content_type:
        lowered = content_type.lower()
        if "json" in lowered:
            return JSON
        if "confluent" in lowered:
            return CONFLUENT_AVRO
        if "avro" in lowered:
            return AVRO
    stripped = data.lstrip(b" \t\r\n\xef\xbb\xbf")
    if stripped[:1] == b"{":
        return JSON
    if data[:1] == bytes([CONFLUENT_MAGIC]) and len(data) >= 5:
        return CONFLUENT_AVRO
    return AVRO


def registry_schema(raw: Mapping[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """Schema ``name`` as one self-contained document, the form a Schema Registry stores:
    every named type it refers to (``llmpipe.PromptRef``, ...) is defined inline at its
    first use, as the Avro specification allows."""
    inlined: dict[str, Any] = _inline(raw[name], raw, set(), "llmpipe")
    return inlined


def _inline(schema: Any, raw: Mapping[str, dict[str, Any]], seen: set[str], space: str) -> Any:
    """``schema`` with references to ``raw``'s named types replaced by their definitions,
    each at its first use only (later uses keep the name: redefining one is an error)."""
    if isinstance(schema, str):
        full = schema if "." in schema else f"{space}.{schema}"
        if full in raw and full not in seen:
            return _inline(raw[full], raw, seen, space)
        return full if full in raw or full in seen else schema
    if isinstance(schema, list):
        return [_inline(branch, raw, seen, space) for branch in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if out.get("type") in ("record", "enum", "fixed") and "name" in out:
        space = out.get("namespace", space)
        name = out["name"]
        seen.add(name if "." in name else f"{space}.{name}")
    if "fields" in out:
        out["fields"] = [{**f, "type": _inline(f["type"], raw, seen, space)} for f in out["fields"]]
    for key in ("items", "values"):
        if key in out:
            out[key] = _inline(out[key], raw, seen, space)
    if isinstance(out.get("type"), dict | list):
        out["type"] = _inline(out["type"], raw, seen, space)
    return out


def _parse(raw: Mapping[str, dict[str, Any]], name: str) -> Any:
    """Schema ``name`` parsed for fastavro from its self-contained form (named types defined
    inline): fastavro reads it 10-15 % faster than one that refers to types parsed apart
    (a named-schema lookup per use), and it needs no parse order across files."""
    return fastavro.parse_schema(registry_schema(raw, name))


Convert = Callable[[Any], Any]


def _identity(value: Any) -> Any:
    return value


def _converter(schema: Any, raw: Mapping[str, dict[str, Any]], to_avro: bool) -> Convert:
    """One function per schema between model fields and fastavro records, built once.

    The only difference between the two shapes is the JSON-marked string fields (a JSON
    value in the model, its text in Avro), so the function touches exactly those paths and
    passes everything else through: no per-field Python on the fields that need none.
    """
    built = _build(schema, raw, to_avro)
    return built if built is not None else _identity


def _build(schema: Any, raw: Mapping[str, dict[str, Any]], to_avro: bool) -> Convert | None:
    """The conversion for ``schema``, or None when values pass through unchanged."""
    schema = _resolve(schema, raw)
    if isinstance(schema, list):
        branch = next(s for s in schema if s != "null")
        inner = _build(branch, raw, to_avro)
        if inner is None:
            return None
        return lambda value: None if value is None else inner(value)
    if not isinstance(schema, dict):
        return None
    if schema.get(JSON_FIELD_MARK):
        return _to_json if to_avro else json_loads
    kind = schema["type"]
    if kind == "record":
        fields = [(f["name"], _build(f["type"], raw, to_avro)) for f in schema["fields"]]
        changed = [(name, conv) for name, conv in fields if conv is not None]
        if not changed:
            return None

        def record(value: Any) -> Any:
            # Changed in place: ``value`` is always a dict just made for this call (by
            # model_dump or the Avro reader), so a copy per record level would be waste.
            for name, conv in changed:
                value[name] = conv(value.get(name))
            return value

        return record
    if kind in ("array", "map"):
        item = _build(schema["items" if kind == "array" else "values"], raw, to_avro)
        if item is None:
            return None
        if kind == "array":
            return lambda value: [item(v) for v in value]
        return lambda value: {k: item(v) for k, v in value.items()}
    if isinstance(kind, dict | list):
        return _build(kind, raw, to_avro)
    return None


def _resolve(schema: Any, raw: Mapping[str, dict[str, Any]]) -> Any:
    if isinstance(schema, str) and schema in raw:
        return raw[schema]
    if isinstance(schema, dict) and isinstance(schema.get("type"), str) and schema["type"] in raw:
        return raw[schema["type"]]
    return schema


Write = Callable[[Any, bytearray], None]
"""Appends one value's Avro binary encoding to the buffer."""

_pack_double = struct.Struct("<d").pack
_timestamp_millis = LOGICAL_WRITERS["long-timestamp-millis"]
_TIMESTAMP_MILLIS = {"type": "long", "logicalType": "timestamp-millis"}
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1
_any = TypeAdapter(Any)


def _write_long(value: int, out: bytearray) -> None:
    """Zig-zag varint, as fastavro writes ``int`` and ``long`` alike (an ``int`` past 32
    bits included); past 64 bits is an error, as it is for fastavro. A float (only an
    unvalidated model can hold one here) is refused, where fastavro would truncate it."""
    if 0 <= value < 64:
        out.append(value << 1)
        return
    if not _LONG_MIN <= value <= _LONG_MAX:
        raise OverflowError(f"{value} does not fit an Avro long")
    n = (value << 1) ^ (value >> 63)
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _write_string(value: str, out: bytearray) -> None:
    data = value.encode()
    size = len(data)
    if size < 64:
        out.append(size << 1)
    else:
        _write_long(size, out)
    out += data


def _write_double(value: float, out: bytearray) -> None:
    out += _pack_double(value)


def _write_timestamp(value: Any, out: bytearray) -> None:
    """fastavro's own conversion (a naive datetime is local time, as fastavro reads it)."""
    _write_long(_timestamp_millis(value, _TIMESTAMP_MILLIS), out)


def _write_json(value: Any, out: bytearray) -> None:
    """A JSON-marked field's text. A value that is not plain JSON (a pydantic model inside
    an ``Any``) is first serialised the way ``model_dump`` would have."""
    try:
        text = _to_json(value)
    except TypeError:
        text = _to_json(_any.dump_python(value))
    _write_string(text, out)


_PRIMITIVE_WRITERS: dict[str, Write] = {
    "string": _write_string,
    "int": _write_long,
    "long": _write_long,
    "double": _write_double,
}


def _writer(schema: Any, raw: Mapping[str, dict[str, Any]]) -> Write:
    """The Avro writer of one schema, built once, that reads an envelope's attributes.

    fastavro's writer wants a dict (``model_dump`` per message, JSON fields converted) and
    then decides per value at run time (union branches by validation, logical types by
    lookup); here every decision is made at build time, from the schema, so a message pays
    only for its bytes: 2.0-2.5x less CPU per encode than ``model_dump`` + fastavro. The
    bytes are fastavro's (``tests/contract/test_wire_golden.py``, and a property test
    against :meth:`Codec.record` written by fastavro). Only the constructs the envelope
    schemas use are compiled; anything else is refused when the codec is built.
    """
    schema = _resolve(schema, raw)
    if isinstance(schema, str):
        if schema not in _PRIMITIVE_WRITERS:
            raise ValueError(f"the compiled Avro writer does not handle type {schema!r}")
        return _PRIMITIVE_WRITERS[schema]
    if isinstance(schema, list):
        return _union_writer(schema, raw)
    if schema.get(JSON_FIELD_MARK):
        return _write_json
    if schema.get("logicalType") == "timestamp-millis":
        return _write_timestamp
    kind = schema["type"]
    if kind == "record":
        return _record_writer(schema, raw)
    if kind == "enum":
        indexes = {symbol: bytes([i << 1]) for i, symbol in enumerate(schema["symbols"])}
        if len(indexes) > 64:
            raise ValueError("the compiled Avro writer handles enums of up to 64 symbols")

        def enum(value: str, out: bytearray) -> None:
            out += indexes[value]

        return enum
    if kind == "array":
        item = _writer(schema["items"], raw)

        def array(value: list[Any], out: bytearray) -> None:
            if value:
                _write_long(len(value), out)
                for element in value:
                    item(element, out)
            out.append(0)

        return array
    if kind == "map":
        entry = _writer(schema["values"], raw)

        def map_(value: dict[str, Any], out: bytearray) -> None:
            if value:
                _write_long(len(value), out)
                for key, element in value.items():
                    _write_string(key, out)
                    entry(element, out)
            out.append(0)

        return map_
    return _writer(kind, raw)


def _union_writer(schema: list[Any], raw: Mapping[str, dict[str, Any]]) -> Write:
    """Unions of null and one type, the only ones the envelopes have (an optional field)."""
    if len(schema) != 2 or "null" not in schema:
        raise ValueError(f"the compiled Avro writer handles only [null, T] unions, not {schema}")
    null_index = schema.index("null")
    null, present = bytes([null_index << 1]), bytes([(1 - null_index) << 1])
    inner = _writer(schema[1 - null_index], raw)

    def union(value: Any, out: bytearray) -> None:
        if value is None:
            out += null
        else:
            out += present
            inner(value, out)

    return union


def _record_writer(schema: dict[str, Any], raw: Mapping[str, dict[str, Any]]) -> Write:
    fields = [(f["name"], _writer(f["type"], raw)) for f in schema["fields"]]

    def record(value: Envelope, out: bytearray) -> None:
        attributes = value.__dict__
        for name, write in fields:
            write(attributes[name], out)

    return record
