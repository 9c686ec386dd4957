"""``extract``/``inject`` agree with the OpenTelemetry W3C propagator on every input.

``extract`` parses the canonical ``traceparent`` itself and ``span_headers`` formats one
without the propagator (both for speed, see the module): these properties hold them to
exactly what the propagator accepts, rejects and writes, so one trace per request across
hops does not depend on the shortcut.
"""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from pipeline.observability.propagation import (
    PROPAGATOR,
    extract,
    inject,
    passed_on,
    span_headers,
)

LOWER_HEX = "0123456789abcdef"
VALID = st.builds(
    lambda t, s, f: f"00-{t}-{s}-{f}",
    st.text(LOWER_HEX, min_size=32, max_size=32),
    st.text(LOWER_HEX, min_size=16, max_size=16),
    st.text(LOWER_HEX, min_size=2, max_size=2),
)


@st.composite
def near_valid(draw: st.DrawFn) -> str:
    """A valid header with one edit: each edit is one W3C rule the fast path must not bend."""
    value = draw(VALID)
    edit = draw(st.sampled_from(["none", "upper", "version", "zero", "replace", "cut", "affix"]))
    if edit == "upper":
        at = draw(st.sampled_from([i for i, c in enumerate(value) if c in "abcdef"] or [0]))
        value = value[:at] + value[at].upper() + value[at + 1 :]
    elif edit == "version":
        value = draw(st.sampled_from(["01", "ff", "fe", "0A", "99"])) + value[2:]
    elif edit == "zero":
        value = draw(
            st.sampled_from([value[:3] + "0" * 32 + value[35:], value[:36] + "0" * 16 + value[52:]])
        )
    elif edit == "replace":
        at = draw(st.integers(0, len(value) - 1))
        value = value[:at] + draw(st.sampled_from(list("-_ +gx0\n\t"))) + value[at + 1 :]
    elif edit == "cut":
        at = draw(st.integers(0, len(value) - 1))
        value = value[:at] + value[at + 1 :]
    elif edit == "affix":
        affix = draw(st.sampled_from([" ", "\t", "\n", "-", "-00", "-x", "\r\n", "0"]))
        value = affix + value if draw(st.booleans()) else value + affix
    return value


def _propagator(value: str) -> SpanContext:
    context = PROPAGATOR.extract({"traceparent": value})
    return trace.get_current_span(context).get_span_context()


def _ours(value: bytes) -> SpanContext:
    return trace.get_current_span(extract([("traceparent", value)])).get_span_context()


@given(near_valid())
@example("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
@example("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n")
@example("00-0AF7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
@example("00-00000000000000000000000000000000-b7ad6b7169203331-01")
@example("00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01")
@example("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra")
def test_extract_matches_the_propagator(value: str) -> None:
    assert _ours(value.encode("latin-1")) == _propagator(value)


@given(st.binary(max_size=80))
def test_extract_matches_the_propagator_on_any_bytes(value: bytes) -> None:
    assert _ours(value) == _propagator(value.decode("latin-1"))


@given(near_valid())
@example("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
@example("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra")
def test_passed_on_carries_what_the_propagator_accepts_as_the_propagator_writes_it(
    value: str,
) -> None:
    """A hop that starts no span forwards the upstream's context: its headers are the
    propagator's own for that context (the canonical value as it came, nothing for a
    value it rejects)."""
    context, carried = passed_on(value.encode("latin-1"))
    accepted = _propagator(value)
    assert trace.get_current_span(context).get_span_context() == accepted
    expected: dict[str, str] = {}
    if accepted.is_valid:
        PROPAGATOR.inject(expected, trace.set_span_in_context(NonRecordingSpan(accepted)))
    assert carried == expected
    assert passed_on(None)[1] == {}


def test_extract_takes_the_last_traceparent_and_ignores_other_headers() -> None:
    first = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    last = b"00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-00"
    parent = trace.get_current_span(
        extract([("TraceParent", first), ("x-request-id", b"r"), ("traceparent", last)])
    ).get_span_context()
    assert parent == _propagator(last.decode())
    assert not trace.get_current_span(extract([("x-request-id", b"r")])).get_span_context().is_valid


@given(
    st.integers(0, 2**128 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 255),
    st.booleans(),
)
def test_span_headers_match_the_propagator(
    trace_id: int, span_id: int, flags: int, with_state: bool
) -> None:
    state = TraceState([("vendor", "v1"), ("other", "x")]) if with_state else None
    span_context = SpanContext(trace_id, span_id, False, TraceFlags(flags), state)
    expected: dict[str, str] = {}
    PROPAGATOR.inject(expected, trace.set_span_in_context(NonRecordingSpan(span_context)))
    assert span_headers(span_context) == expected
    assert inject(trace.set_span_in_context(NonRecordingSpan(span_context))) == expected
