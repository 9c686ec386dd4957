"""Decoding is total: any bytes give an envelope or a typed DecodeError with a reason."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.config import Settings
from pipeline.contract.codec import AVRO, CONFLUENT_AVRO, JSON, Codec, DecodeError
from pipeline.contract.envelopes import Request, Result
from pipeline.transport.registry import apply_subjects, codec_for, registry_client

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
