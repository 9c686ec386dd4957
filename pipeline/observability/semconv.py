"""Every attribute, span and metric name llmpipe emits, in one module.

Why one module: dashboards, alerts, the collector config and the tests all match on these
strings. A name typed twice drifts (``gen_ai.request_model`` in one place, ``.request.model``
in another) and the panel silently goes blank; a name imported from here cannot drift.

The names follow the OpenTelemetry semantic conventions where a convention exists
(messaging, Kafka, GenAI, ``error.type``); ours live under ``llmpipe.``. We copy the
strings instead of importing ``opentelemetry.semconv._incubating``: that package is
explicitly unstable, and a rename there must not silently rename our telemetry
(``tests/observability/test_observability_unit.py`` checks the copies against it instead).
"""

from __future__ import annotations

from typing import Final

# -- messaging (https://opentelemetry.io/docs/specs/semconv/messaging/kafka/) -------------
MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_SYSTEM_KAFKA: Final = "kafka"
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"
MESSAGING_OPERATION_NAME: Final = "messaging.operation.name"
MESSAGING_DESTINATION_NAME: Final = "messaging.destination.name"
MESSAGING_CONSUMER_GROUP_NAME: Final = "messaging.consumer.group.name"
MESSAGING_DESTINATION_PARTITION_ID: Final = "messaging.destination.partition.id"
MESSAGING_KAFKA_OFFSET: Final = "messaging.kafka.offset"
MESSAGING_KAFKA_MESSAGE_KEY: Final = "messaging.kafka.message.key"
MESSAGING_MESSAGE_BODY_SIZE: Final = "messaging.message.body.size"
OPERATION_PROCESS: Final = "process"
OPERATION_SEND: Final = "send"

# -- GenAI (https://opentelemetry.io/docs/specs/semconv/gen-ai/) -----------------------------
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_OPERATION_CHAT: Final = "chat"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE: Final = "gen_ai.request.temperature"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_TOKEN_TYPE: Final = "gen_ai.token.type"
GEN_AI_TOKEN_TYPE_INPUT: Final = "input"
GEN_AI_TOKEN_TYPE_OUTPUT: Final = "output"
GEN_AI_PROMPT_NAME: Final = "gen_ai.prompt.name"
# Not (yet) in the conventions; named beside gen_ai.prompt.name so the pair reads as one.
GEN_AI_PROMPT_VERSION: Final = "gen_ai.prompt.version"
# Opt-in content (LLMPIPE_TRACE_CONTENT=true), always redacted first.
GEN_AI_INPUT_MESSAGES: Final = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES: Final = "gen_ai.output.messages"

ERROR_TYPE: Final = "error.type"

# -- llmpipe ---------------------------------------------------------------------------------
REQUEST_ID: Final = "llmpipe.request_id"
STAGE: Final = "llmpipe.stage"
ROUTE: Final = "llmpipe.route"
REASON: Final = "llmpipe.reason"
RULE: Final = "llmpipe.rule"
RESULT_SOURCE: Final = "llmpipe.result.source"
PROMPT_ARM: Final = "llmpipe.prompt.arm"
ATTEMPT: Final = "llmpipe.attempt"
COST_USD: Final = "llmpipe.cost_usd"
STRUCTURED_OUTPUT: Final = "llmpipe.structured_output"
ATTEMPTS: Final = "llmpipe.attempts"
BREAKER_NAME: Final = "llmpipe.breaker.name"
BREAKER_STATE: Final = "llmpipe.breaker.state"
BREAKER_PREVIOUS_STATE: Final = "llmpipe.breaker.previous_state"
CONTROL_KIND: Final = "llmpipe.control.kind"
CONTROL_NAME: Final = "llmpipe.control.name"
CONTROL_SCOPE: Final = "llmpipe.control.scope"
REVIEW_ACTION: Final = "llmpipe.review.action"
AUDIT_VERDICT: Final = "llmpipe.audit.verdict"
TOPIC: Final = "llmpipe.topic"

# -- span names ------------------------------------------------------------------------------


def consumer_span_name(stage: str) -> str:
    """``validate process``: the stage is what an operator looks for in a trace view."""
    return f"{stage} {OPERATION_PROCESS}"


def producer_span_name(logical_topic: str) -> str:
    """``send llm.results``: the logical topic (no test/tenant prefix) keeps names few."""
    return f"{OPERATION_SEND} {logical_topic}"


def chat_span_name(model: str) -> str:
    """The GenAI convention: ``{gen_ai.operation.name} {gen_ai.request.model}``."""
    return f"{GEN_AI_OPERATION_CHAT} {model}"


def attempt_span_name(model: str) -> str:
    return f"{GEN_AI_OPERATION_CHAT} {model} attempt"


# -- metrics: (name, unit) -------------------------------------------------------------------
GEN_AI_CLIENT_OPERATION_DURATION: Final = "gen_ai.client.operation.duration"
GEN_AI_CLIENT_TOKEN_USAGE: Final = "gen_ai.client.token.usage"
REQUESTS: Final = "llmpipe.requests"
STAGE_MESSAGES: Final = "llmpipe.stage.messages"
STAGE_DURATION: Final = "llmpipe.stage.duration"
STAGE_IN_FLIGHT: Final = "llmpipe.stage.in_flight"
REQUEST_DURATION: Final = "llmpipe.request.duration"
VALIDATION_FAILURES: Final = "llmpipe.validation.failures"
FALLBACKS: Final = "llmpipe.fallbacks"
REVIEWS: Final = "llmpipe.reviews"
DEAD_LETTERS: Final = "llmpipe.dead_letters"
MODEL_RETRIES: Final = "llmpipe.model.retries"
MODEL_COST: Final = "llmpipe.model.cost"
MODEL_IN_FLIGHT: Final = "llmpipe.model.in_flight"
BREAKER_TRANSITIONS: Final = "llmpipe.breaker.transitions"
BREAKER_STATE_GAUGE: Final = "llmpipe.breaker.state"
RATE_LIMIT_WAITS: Final = "llmpipe.ratelimit.waits"
RATE_LIMIT_WAIT_DURATION: Final = "llmpipe.ratelimit.wait.duration"
RATE_LIMIT_REJECTIONS: Final = "llmpipe.ratelimit.rejections"
CONTROL_CHANGES: Final = "llmpipe.control.changes"
HUMAN_DECISIONS: Final = "llmpipe.review.decisions"
DISTRIBUTION_SHIFTS: Final = "llmpipe.quality.distribution_shifts"
MONITOR_SIGNAL: Final = "llmpipe.monitor.signal"

AUDIT_VERDICTS: Final = "llmpipe.audit.verdicts"
ACCEPTED_ERROR_RATE: Final = "llmpipe.audit.accepted_error_rate"
CONSUMER_LAG: Final = "llmpipe.consumer.lag"

# Bucket boundaries recommended by the GenAI metric conventions; dashboards and the
# Prometheus histogram_quantile() estimates depend on them, so they are not tunable.
GEN_AI_DURATION_BUCKETS: Final = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
GEN_AI_TOKEN_BUCKETS: Final = (
    1,
    4,
    16,
    64,
    256,
    1024,
    4096,
    16384,
    65536,
    262144,
    1048576,
    4194304,
    16777216,
    67108864,
)
# Stage and end-to-end latency: milliseconds (a validate step) up to minutes (a request
# that waited out retries and a fallback).
LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
BREAKER_STATE_VALUES: Final = {"closed": 0, "half_open": 1, "open": 2}
