"""The pydantic envelopes and the Avro schemas describe the same messages."""

from __future__ import annotations

import io
import types
import typing
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest.mock import patch

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.contract import envelopes
from pipeline.contract.codec import JSON_FIELD_MARK, Codec, load_schemas
from pipeline.contract.envelopes import ENVELOPES, Envelope

RAW = load_schemas()
CODEC = Codec()
JSON_CODEC = Codec(output_format="json")

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
timestamps = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
).map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))
CONSTRAINED = {
    "confidence": st.floats(0.0, 1.0),
    "request_id": st.text(min_size=1, max_size=20),
    "prompt": st.text(min_size=1, max_size=20),
}


def strategy(schema: Any, field: str | None = None) -> st.SearchStrategy[Any]:
    if field in CONSTRAINED and schema in ("string", "double"):
        return CONSTRAINED[field]
    if isinstance(schema, str) and schema in RAW:
        return strategy(RAW[schema])
    if isinstance(schema, list):
        return st.one_of(*(strategy(s, field) for s in schema))
    if isinstance(schema, dict):
        if schema.get(JSON_FIELD_MARK):
            return json_objects
        kind = schema["type"]
        if schema.get("logicalType") == "timestamp-millis":
            return timestamps
        if kind == "record":
            return st.fixed_dictionaries(
                {f["name"]: strategy(f["type"], f["name"]) for f in schema["fields"]}
            )
        if kind == "array":
            return st.lists(strategy(schema["items"]), max_size=3)
        if kind == "map":
            return st.dictionaries(st.text(max_size=8), strategy(schema["values"]), max_size=3)
        if kind == "enum":
            return st.sampled_from(schema["symbols"])
        return strategy(kind, field)
    return {
        "null": st.none(),
        "string": st.text(max_size=30),
        "int": st.integers(-(2**31), 2**31 - 1),
        "long": st.integers(-(2**63), 2**63 - 1),
        "double": st.floats(allow_nan=False, allow_infinity=False),
        "boolean": st.booleans(),
    }[schema]


def _optional(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


@pytest.mark.parametrize("name", sorted(ENVELOPES))
def test_fields_and_nullability_match_the_schema(name: str) -> None:
    schema = RAW[f"llmpipe.{name}"]
    model = ENVELOPES[name]
    avro_fields = {f["name"]: f for f in schema["fields"]}
    assert list(avro_fields) == list(model.model_fields), f"{name}: field names or order differ"
    for field_name, info in model.model_fields.items():
        avro_type = avro_fields[field_name]["type"]
        avro_nullable = isinstance(avro_type, list) and "null" in avro_type
        if field_name == "value" and name in ("ControlEvent", "FleetEvent"):
            continue  # Any: JSON value that may be null by design
        assert _optional(info.annotation) == avro_nullable, (
            f"{name}.{field_name}: nullability differs"
        )


@pytest.mark.parametrize("name", sorted(ENVELOPES))
# No deadline: on a loaded machine the largest envelopes take longer than hypothesis's
# default 200 ms per example, which says nothing about the codec.
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_instances_round_trip_avro_and_json(name: str, data: st.DataObject) -> None:
    fields = data.draw(strategy(RAW[f"llmpipe.{name}"]))
    model: type[Envelope] = ENVELOPES[name]
    envelope = model.model_validate(fields)
    for codec in (CODEC, JSON_CODEC):
        encoded, content_type = codec.encode(envelope)
        assert codec.decode(encoded, model, content_type) == envelope


@pytest.mark.parametrize("name", sorted(ENVELOPES))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_compiled_writer_gives_fastavros_bytes(name: str, data: st.DataObject) -> None:
    """The hot path (the model read by a writer compiled per schema) and the reference
    (``model_dump``, JSON fields as text, fastavro's writer) agree byte for byte."""
    envelope = ENVELOPES[name].model_validate(data.draw(strategy(RAW[f"llmpipe.{name}"])))
    reference = io.BytesIO()
    schema = fastavro.parse_schema(CODEC.registry_schema(f"llmpipe.{name}"))
    fastavro.schemaless_writer(reference, schema, CODEC.record(envelope))
    assert CODEC.encode(envelope)[0] == reference.getvalue()


@given(
    st.integers(min_value=0, max_value=4_102_444_800_000 - 1),  # up to 2100-01-01
    st.integers(min_value=0, max_value=999_999),
)
def test_utc_now_is_the_current_whole_millisecond(ms: int, sub_ms_ns: int) -> None:
    """utc_now goes through a float of seconds: it must still land on the exact millisecond
    (what Avro's timestamp-millis keeps), never one off."""
    with patch.object(envelopes.time, "time_ns", return_value=ms * 1_000_000 + sub_ms_ns):
        now = envelopes.utc_now()
    assert now == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
