"""Decoding is total: any bytes give an envelope or a typed DecodeError with a reason."""

from __future__ import annotations

import io
import json
import struct
from datetime import datetime
from typing import Any

import fastavro
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.config import Settings
from pipeline.contract.codec import AVRO, CONFLUENT_AVRO, JSON, Codec, DecodeError
from pipeline.contract.envelopes import ControlEvent, Envelope, PromptRef, Request, Result, Usage
from pipeline.transport.registry import codec_for
from pipeline.transport.schema_registry import apply_subjects, registry_client

CODEC = Codec()
REQUEST = Request(
    request_id="r-1",
    prompt="ticket_triage",
    variables={"text": "My invoice is wrong", "nested": {"a": [1, 2.5, None, True]}},
    metadata={"tenant": "acme"},
)


def test_json_and_avro_requests_decode_to_the_same_envelope() -> None:
    avro_bytes, content_type = CODEC.encode(REQUEST)
    assert content_type == AVRO
    json_bytes = json.dumps(
        {
            "request_id": "r-1",
            "prompt": "ticket_triage",
            "variables": REQUEST.variables,
            "metadata": {"tenant": "acme"},
        }
    ).encode()
    from_avro = CODEC.decode(avro_bytes, Request)
    assert CODEC.decode(json_bytes, Request) == from_avro == REQUEST
    assert CODEC.decode(json_bytes, Request, JSON) == REQUEST
    assert CODEC.decode(avro_bytes, Request, AVRO) == REQUEST


def test_bytes_a_stage_just_encoded_decode_to_the_envelope_it_encoded() -> None:
    """A stage's outputs are remembered by their bytes: the next stage of the worker gets
    the very envelope back, once, and only as the type and content type it was written
    as; any other bytes, or the same bytes a second time, are read and validated."""
    codec = Codec()
    data, content_type = codec.encode(REQUEST, remember=True)
    again = bytes(bytearray(data))  # equal bytes, another object: as a consumer hands them
    assert codec.decode(again, Request, content_type) is REQUEST
    read = codec.decode(again, Request, content_type)  # taken once: now read
    assert read == REQUEST and read is not REQUEST

    codec.encode(REQUEST, remember=True)
    with pytest.raises(DecodeError):
        codec.decode(data, Result, content_type)  # another type: read, and refused
    codec.encode(REQUEST, remember=True)
    with pytest.raises(DecodeError):
        codec.decode(data, Request, JSON)  # claimed to be JSON: read as JSON, and refused
    assert codec.decode(data, Request, content_type) is not REQUEST  # and forgotten

    unremembered = Codec()
    data, content_type = unremembered.encode(REQUEST)
    assert unremembered.decode(data, Request, content_type) is not REQUEST


def test_a_codec_remembers_only_its_latest_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.contract.codec.RECENT_ENCODED", 2)
    codec = Codec()
    requests = [REQUEST.model_copy(update={"request_id": f"r-{i}"}) for i in range(3)]
    encoded = [codec.encode(r, remember=True) for r in requests]
    decoded = [codec.decode(data, Request, kind) for data, kind in encoded]
    assert decoded == requests
    assert decoded[0] is not requests[0]  # the oldest was forgotten
    assert decoded[1] is requests[1] and decoded[2] is requests[2]


def test_confluent_wire_format_carries_the_registered_schema_id() -> None:
    settings = Settings(schema_registry_url="mock://codec-test", output_format="confluent")
    client = registry_client(settings)
    apply_subjects(client, Codec(), "")
    codec = codec_for(settings)
    encoded, content_type = codec.encode(REQUEST)
    assert content_type == CONFLUENT_AVRO
    registered = client.get_latest_version("llm.requests-value").schema_id
    assert encoded[0] == 0 and struct.unpack(">I", encoded[1:5])[0] == registered
    assert codec.decode(encoded, Request) == REQUEST
    assert CODEC.decode(encoded, Request, CONFLUENT_AVRO) == REQUEST, "no registry: local schema"


@pytest.mark.parametrize(
    ("data", "content_type", "reason", "fragment"),
    [
        (b"not json at all", JSON, "decode_error", "invalid JSON"),
        (b"\xff\xfe\xfa", JSON, "decode_error", "invalid UTF-8"),
        (b"\xef\xbb\xbf{}", None, "decode_error", "invalid JSON: Unexpected UTF-8 BOM"),
        (b'{"request_id": "\\ud800\x01"}', JSON, "decode_error", "Invalid control character"),
        (b"[1, 2]", None, "decode_error", "invalid Avro"),
        (b"[1, 2]", JSON, "decode_error", "not an object"),
        (b"{" * 100_000 + b"}" * 100_000, None, "decode_error", ""),
        (b'{"request_id": "x"}', JSON, "invalid_envelope", "prompt"),
        (b"\x02ab\x00", AVRO, "decode_error", ""),
    ],
)
def test_malformed_bytes_give_a_typed_error(
    data: bytes, content_type: str | None, reason: str, fragment: str
) -> None:
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(data, Request, content_type)
    assert caught.value.reason == reason
    assert fragment in caught.value.detail


def test_trailing_bytes_after_avro_are_refused() -> None:
    encoded, _ = CODEC.encode(REQUEST)
    with pytest.raises(DecodeError, match="trailing"):
        CODEC.decode(encoded + b"\x00", Request)


@given(st.binary(max_size=512), st.sampled_from([None, JSON, AVRO, CONFLUENT_AVRO]))
def test_arbitrary_bytes_never_raise_anything_but_decode_error(
    data: bytes, content_type: str | None
) -> None:
    for cls in (Request, Result):
        # What decode must say, from its two steps: bytes -> fields, fields -> envelope.
        try:
            fields = CODEC.decode_fields(data, cls, content_type)
        except DecodeError:
            expected = "decode_error"
        else:
            try:
                envelope = cls.model_validate(fields)
                expected = None
            except ValidationError:
                expected = "invalid_envelope"
        if expected is not None:
            with pytest.raises(DecodeError) as caught:
                CODEC.decode(data, cls, content_type)
            assert caught.value.reason == expected
            continue
        # Bytes that decode are a real envelope, and it survives its own round trip.
        decoded = CODEC.decode(data, cls, content_type)
        assert decoded == envelope
        encoded, encoded_type = CODEC.encode(decoded)
        assert CODEC.decode(encoded, cls, encoded_type) == decoded


any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


@given(any_json, st.booleans())
@example(2**64, False)
@example(-(2**63) - 1, False)
@example(12345678901234567890123, True)
@example([float("nan"), float("inf"), 1e-400], False)
@example("lone \ud800 surrogate", True)
@example("lone \ud800 surrogate", False)
def test_json_reads_exactly_as_json_loads(value: Any, ascii_only: bool) -> None:
    """A JSON message, and a JSON-marked Avro field, give what ``json.loads`` gives: same
    types too (an integer past 64 bits stays an int), or the same error."""
    fields = {"request_id": "r", "prompt": "p", "variables": {"v": value}}
    data = json.dumps(fields, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    try:
        expected = json.dumps(json.loads(data.decode("utf-8")))
    except UnicodeDecodeError:
        with pytest.raises(DecodeError, match="invalid UTF-8"):
            CODEC.decode_fields(data, Request, JSON)
        return
    assert json.dumps(CODEC.decode_fields(data, Request, JSON)) == expected
    request = Request.model_validate(fields)
    try:
        encoded, content_type = CODEC.encode(request)
    except UnicodeEncodeError:
        return  # a lone surrogate: unencodable in Avro (the runner's dead letter)
    decoded = CODEC.decode_fields(encoded, Request, content_type)
    assert json.dumps(decoded["variables"]) == json.dumps(fields["variables"])


def _fastavro_bytes(envelope: Envelope) -> bytes:
    buffer = io.BytesIO()
    schema = fastavro.parse_schema(CODEC.registry_schema(CODEC.schema_name(type(envelope))))
    fastavro.schemaless_writer(buffer, schema, CODEC.record(envelope))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "value",
    [
        PromptRef(name="p", version=1, hash="h"),
        (1, "two"),
        {"nested": [PromptRef(name="q", version=2, hash="h")]},
    ],
)
def test_json_fields_holding_models_or_tuples_encode_as_model_dump_has_them(value: Any) -> None:
    """Not plain JSON inside an ``Any``: written as ``model_dump`` serialises it."""
    event = ControlEvent(key="k", value=value, actor="a", at=datetime(2026, 12, 1))
    assert CODEC.encode(event)[0] == _fastavro_bytes(event)


def test_a_naive_timestamp_is_written_as_fastavro_writes_it() -> None:
    event = ControlEvent(key="k", actor="a", at=datetime(1999, 12, 31, 23, 59, 59, 999000))
    assert CODEC.encode(event)[0] == _fastavro_bytes(event)


@pytest.mark.parametrize(
    "envelope",
    [
        Request.model_construct(request_id="r", prompt="lone \ud800 surrogate"),
        Usage(prompt_tokens=2**63),
        Usage.model_construct(prompt_tokens=None),
        REQUEST.model_copy(update={"metadata": {"k": 1}}),
    ],
)
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")  # the reference's model_dump
def test_values_avro_cannot_hold_raise_as_they_do_with_fastavro(envelope: Envelope) -> None:
    """The runner turns any encode error into an ``unencodable`` dead letter."""
    with pytest.raises(Exception):  # noqa: B017 - fastavro raises several types too
        _fastavro_bytes(envelope)
    with pytest.raises(Exception):  # noqa: B017
        CODEC.encode(envelope)


def test_a_message_written_before_a_trailing_field_was_added_still_decodes() -> None:
    """Schemaless Avro carries no writer schema: completions and results written before
    ``calls`` existed (in flight during an upgrade, or stored for re-parsing) are read with
    the field left out, and get its default; a body cut short is still refused."""
    from datetime import UTC, datetime

    from pipeline.contract.codec import load_schemas
    from pipeline.contract.envelopes import (
        Completion,
        PromptRef,
        Request,
        Usage,
        ValidatedRequest,
    )

    schemas = load_schemas()
    before = dict(schemas)
    for name in ("llmpipe.Completion", "llmpipe.Result", "llmpipe.Escalation"):
        fields = [f for f in schemas[name]["fields"] if f["name"] != "calls"]
        before[name] = {**schemas[name], "fields": fields}
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    validated = ValidatedRequest(
        request=Request(request_id="r-1", prompt="p"),
        prompt=PromptRef(name="p", version=1, hash="h"),
        received_at=now,
    )
    completion = Completion(
        validated=validated,
        model="m",
        raw_text="{}",
        usage=Usage(prompt_tokens=3),
        latency_ms=1.5,
        attempts=2,
        completed_at=now,
    )
    data, content_type = Codec(before).encode(completion)
    decoded = Codec().decode(data, Completion, content_type)
    assert decoded == completion and decoded.calls == []
    with pytest.raises(DecodeError):
        Codec().decode(data[:-4], Completion, content_type)
