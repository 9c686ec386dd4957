"""All configuration in one place: environment variables with the ``LLMPIPE_`` prefix.

One settings class means one table in the README and one place to look when a worker
behaves differently in two environments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Runtime configuration. Every field maps to ``LLMPIPE_<FIELD>`` in upper case."""

    model_config = SettingsConfigDict(env_prefix="LLMPIPE_", extra="ignore")

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers.")
    topic_prefix: str = Field("", description="Prefix for every topic and consumer group.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol, passed to every client."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = (
        Field(None, description="SASL mechanism (SASL_* protocols; PLAIN unless set).")
    )
    sasl_username: str | None = Field(None, description="SASL user name (PLAIN, SCRAM).")
    sasl_password: SecretStr | None = Field(None, description="SASL password (PLAIN, SCRAM).")
    sasl_oauthbearer_token_endpoint_url: str | None = Field(
        None,
        description="OAUTHBEARER: the OIDC token endpoint; the clients fetch and refresh "
        "tokens themselves (client-credentials grant).",
    )
    sasl_oauthbearer_client_id: str | None = Field(None, description="OAUTHBEARER client id.")
    sasl_oauthbearer_client_secret: SecretStr | None = Field(
        None, description="OAUTHBEARER client secret."
    )
    sasl_oauthbearer_scope: str | None = Field(
        None, description="OAUTHBEARER scope(s) asked for, space-separated."
    )
    sasl_oauthbearer_extensions: str | None = Field(
        None, description="OAUTHBEARER SASL extensions, key=value,key=value (e.g. logicalCluster)."
    )
    ssl_cafile: Path | None = Field(
        None,
        description="CA certificates (PEM) that signed the brokers' certificates; unset: the "
        "system's CA bundle (public-CA and managed clusters).",
    )
    ssl_certfile: Path | None = Field(
        None, description="Client certificate (PEM, chain allowed) for mTLS."
    )
    ssl_keyfile: Path | None = Field(None, description="Client private key (PEM) for mTLS.")
    ssl_key_password: SecretStr | None = Field(
        None, description="Password of an encrypted LLMPIPE_SSL_KEYFILE."
    )

    cli_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long a CLI command waits for the broker (a write's acknowledgement, a "
        "read's metadata) before it fails with one line.",
    )

    model_base_url: str = Field(
        "http://127.0.0.1:8089/v1",
        description="OpenAI-compatible base URL (ends in /v1). https is verified against the "
        "system CAs or SSL_CERT_FILE / SSL_CERT_DIR; HTTP(S)_PROXY, NO_PROXY and ~/.netrc apply.",
    )
    model_api_key: SecretStr | None = Field(
        None, description="Bearer token for the model endpoint."
    )
    model_timeout_s: float = Field(
        30.0, description="Upper bound on one model call; a prompt may set less."
    )
    model_max_attempts: int = Field(
        3, description="Attempts per model call on timeouts, 429 and 5xx."
    )

    model_structured_output: Literal["json_schema", "json_object_schema", "json_object", "none"] = (
        Field(
            "none",
            description="Structured output of the default endpoint: json_schema (OpenAI), "
            "json_object_schema (llama.cpp), json_object or none; a prompt may override it.",
        )
    )
    model_headers: str = Field(
        "", description="JSON: extra HTTP headers for the default endpoint (gateways)."
    )
    model_extra_body: str = Field(
        "", description="JSON: extra request body fields for the default endpoint."
    )
    model_endpoints: str = Field(
        "",
        description="JSON: model -> base URL or {base_url, api_key_env, structured_output, "
        "headers, headers_env, extra_body, token_limit_param, reasoning}; others: MODEL_BASE_URL.",
    )
    model_rate_limits: str = Field(
        "",
        description="JSON: model (or `*`) -> {requests_per_minute, tokens_per_minute, "
        "max_in_flight}, account-wide: each worker takes its share, following the fleet's "
        "leases on llm.fleet.",
    )
    breaker_min_calls: int = Field(10, description="Calls in the window before a breaker can open.")
    breaker_failure_rate: float = Field(0.5, description="Failure rate that opens an endpoint.")
    breaker_open_s: float = Field(30.0, description="Seconds an open breaker waits before probing.")
    breaker_wait_s: float = Field(
        30.0,
        description="How long a request waits for open breakers to probe before taking the "
        "fallback path (it holds its slot: back-pressure).",
    )
    share_endpoint_breakers: bool = Field(
        True,
        description="Announce this worker's endpoint-breaker openings and closings on llm.fleet "
        "and follow the others' (false: every worker finds an outage with its own calls).",
    )
    quality_breaker_min_calls: int = Field(
        20, description="Answers per prompt version before output quality can open its breaker."
    )
    quality_breaker_failure_rate: float = Field(
        0.5, description="Share of invalid or low-confidence answers that opens it."
    )
    quality_breaker_open_s: float = Field(
        300.0, description="Seconds a prompt version stays on the fallback path."
    )
    max_request_tokens: int | None = Field(
        None, description="Cap on estimated prompt tokens + max_tokens per request."
    )
    prompt_daily_tokens: str = Field(
        "", description="JSON: prompt -> tokens per UTC day (budget_exceeded when spent)."
    )
    model_prices: str = Field(
        "",
        description="JSON: model -> {input, output, cached_input} USD per 1M tokens; "
        "others priced from the bundled genai-prices catalogue (never fetched).",
    )
    max_request_cost_usd: float | None = Field(
        None, description="Cap on the estimated cost of one request, in USD."
    )
    prompt_daily_cost_usd: str = Field(
        "", description="JSON: prompt -> USD per UTC day (budget_exceeded when spent)."
    )

    prompts_dir: Path = Field(REPO_ROOT / "prompts", description="Directory of prompt files.")
    topics_dir: Path = Field(REPO_ROOT / "topics", description="Directory of topic declarations.")
    output_format: Literal["avro", "json", "confluent"] = Field(
        "avro",
        description="Encoding of produced messages; confluent: Avro in the Confluent wire "
        "format with Schema Registry ids (needs LLMPIPE_SCHEMA_REGISTRY_URL).",
    )
    schema_registry_url: str | None = Field(
        None,
        description="Confluent-compatible Schema Registry: `topics apply` registers and checks "
        "each topic's `<topic>-value` subject; Confluent frames are read by their schema id.",
    )
    schema_registry_basic_auth: SecretStr | None = Field(
        None, description="Schema Registry credentials, `user:password` (HTTP basic)."
    )
    schema_registry_cafile: Path | None = Field(
        None, description="CA certificates (PEM) for an HTTPS Schema Registry."
    )

    max_in_flight: int = Field(
        64, description="Messages processed concurrently per stage and worker."
    )
    kafka_prefetch_kbytes: int = Field(
        4_096,
        ge=1_024,
        description="Messages a stage consumer fetches ahead of its free slots, at most this "
        "many KiB per consumer (librdkafka's queued.max.messages.kbytes and fetch.max.bytes; "
        "one fetch and one message of up to 10 MiB may overshoot it). Large requests drain "
        "faster with about LLMPIPE_MAX_IN_FLIGHT x their size.",
    )
    kafka_prefetch_messages: int = Field(
        0,
        ge=0,
        description="Messages a stage consumer fetches ahead, at most this many per partition "
        "(queued.min.messages; librdkafka's default is 100,000); 0 means 4 x "
        "LLMPIPE_MAX_IN_FLIGHT.",
    )
    kafka_producer_buffer_kbytes: int = Field(
        32_768,
        ge=11_264,
        description="Outputs a producer holds until the broker acknowledges them, in KiB "
        "(queue.buffering.max.kbytes; at least one largest message, 10 MiB, plus headers): "
        "a full buffer makes the stage wait, e.g. through a broker outage.",
    )
    kafka_stage_linger_ms: int = Field(
        5,
        ge=0,
        le=1_000,
        description="at_least_once: how long the stages' shared producer waits to batch "
        "outputs (linger.ms). Each hop sends its outputs as decided, so this is latency added "
        "per hop; lower sends sooner at more CPU per request (fewer outputs per produce "
        "request): measured here, 1 ms cost 0.06 ms of librdkafka CPU per request over three "
        "hops and 5 ms 0.015 ms, for about 8 ms more median latency end to end at half load.",
    )
    delivery: Literal["exactly_once", "at_least_once"] = Field(
        "exactly_once",
        description="exactly_once: each hop commits outputs and input offsets in one Kafka "
        "transaction; at_least_once: idempotent sends, offsets committed after delivery.",
    )
    commit_interval_ms: int = Field(
        100,
        ge=1,
        description="How often a stage commits (one transaction per interval in exactly_once): "
        "the latency each hop may add.",
    )
    worker_processes: int = Field(
        0,
        ge=0,
        description="Worker processes `llmpipe worker` runs under one supervisor; 0 means "
        "one per core this process may use (CPU affinity and cgroup quota).",
    )
    group_instance_id: str | None = Field(
        None,
        description="Static group membership id (unique per worker process): a restart "
        "within the session timeout keeps its partitions, and fences its predecessor.",
    )
    revoke_grace_s: float = Field(
        10.0,
        description="On a rebalance, how long revoked partitions' in-flight messages may "
        "finish before they are cancelled (and redone by the new owner).",
    )
    max_request_bytes: int = Field(
        1_000_000, description="Larger requests are dead-lettered (too_large)."
    )
    max_prompt_chars: int = Field(50_000, description="Longest rendered prompt, in characters.")
    max_prompt_tokens: int = Field(
        8_000, description="Estimated prompt tokens allowed per request."
    )
    deny_patterns: list[str] = Field(
        default_factory=list, description="Regexes that block a request (blocked_content)."
    )
    pii_policy: Literal["allow", "flag", "block"] = Field(
        "flag", description="What to do when variables contain personal data."
    )

    health_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of the worker's /healthz, /readyz and /metrics (unset: not served). "
        "With --processes N the supervisor answers there; its children use the N ports above.",
    )
    health_host: str = Field(
        "127.0.0.1", description="Address those endpoints listen on (0.0.0.0 in a container)."
    )
    health_stale_s: float = Field(
        15.0,
        gt=0,
        description="/healthz fails once the worker's event loop has not run for this long "
        "(a wedged loop: the orchestrator restarts the process).",
    )

    review_db: str = Field("sqlite:///llmpipe-review.db", description="Review queue database URL.")

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def group(self, name: str) -> str:
        return f"{self.topic_prefix}llmpipe.{name}"

    @model_validator(mode="after")
    def _connections_complete(self) -> Settings:
        """A half-configured security setting is an error at start, in one line naming the
        variable, not a client that retries a handshake forever."""
        sasl = self.security_protocol.startswith("SASL_")
        mechanism = self.sasl_mechanism or "PLAIN"
        if sasl and mechanism == "OAUTHBEARER":
            missing = [
                name
                for name, value in (
                    (
                        "LLMPIPE_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
                        self.sasl_oauthbearer_token_endpoint_url,
                    ),
                    ("LLMPIPE_SASL_OAUTHBEARER_CLIENT_ID", self.sasl_oauthbearer_client_id),
                    ("LLMPIPE_SASL_OAUTHBEARER_CLIENT_SECRET", self.sasl_oauthbearer_client_secret),
                )
                if not value
            ]
        elif sasl:
            missing = [
                name
                for name, value in (
                    ("LLMPIPE_SASL_USERNAME", self.sasl_username),
                    ("LLMPIPE_SASL_PASSWORD", self.sasl_password),
                )
                if not value
            ]
        else:
            missing = []
        if missing:
            raise ValueError(
                f"LLMPIPE_SECURITY_PROTOCOL={self.security_protocol} with SASL mechanism "
                f"{mechanism} needs {', '.join(missing)}"
            )
        if self.output_format == "confluent" and not self.schema_registry_url:
            raise ValueError("LLMPIPE_OUTPUT_FORMAT=confluent needs LLMPIPE_SCHEMA_REGISTRY_URL")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("mTLS needs both LLMPIPE_SSL_CERTFILE and LLMPIPE_SSL_KEYFILE")
        for name, path in (
            ("LLMPIPE_SSL_CAFILE", self.ssl_cafile),
            ("LLMPIPE_SSL_CERTFILE", self.ssl_certfile),
            ("LLMPIPE_SSL_KEYFILE", self.ssl_keyfile),
            ("LLMPIPE_SCHEMA_REGISTRY_CAFILE", self.schema_registry_cafile),
        ):
            if path is not None and not path.is_file():
                raise ValueError(f"{name}={path}: no such file")
        return self

    def kafka_client_config(self) -> dict[str, Any]:
        """librdkafka-style keys shared by confluent-kafka clients (admin, replay, tools):
        connection and security. The one place that maps the security settings.

        TLS without ``LLMPIPE_SSL_CAFILE`` uses the system's CA bundle: ``probe`` makes
        librdkafka look in the usual places (the wheels link OpenSSL statically, so its
        compiled-in default directory need not exist on this machine), after OpenSSL's
        own default paths (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set)."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            config["ssl.ca.location"] = str(self.ssl_cafile) if self.ssl_cafile else "probe"
            if self.ssl_certfile and self.ssl_keyfile:
                config["ssl.certificate.location"] = str(self.ssl_certfile)
                config["ssl.key.location"] = str(self.ssl_keyfile)
            if self.ssl_key_password:
                config["ssl.key.password"] = self.ssl_key_password.get_secret_value()
        if not self.security_protocol.startswith("SASL_"):
            return config
        mechanism = self.sasl_mechanism or "PLAIN"
        config["sasl.mechanism"] = mechanism
        if mechanism != "OAUTHBEARER":
            assert self.sasl_password is not None  # checked when the settings were read
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = self.sasl_password.get_secret_value()
            return config
        assert self.sasl_oauthbearer_client_secret is not None
        config.update(
            {
                "sasl.oauthbearer.method": "oidc",
                "sasl.oauthbearer.token.endpoint.url": self.sasl_oauthbearer_token_endpoint_url,
                "sasl.oauthbearer.client.id": self.sasl_oauthbearer_client_id,
                "sasl.oauthbearer.client.secret": (
                    self.sasl_oauthbearer_client_secret.get_secret_value()
                ),
            }
        )
        if self.sasl_oauthbearer_scope:
            config["sasl.oauthbearer.scope"] = self.sasl_oauthbearer_scope
        if self.sasl_oauthbearer_extensions:
            config["sasl.oauthbearer.extensions"] = self.sasl_oauthbearer_extensions
        return config


def settings_table() -> str:
    """The README's configuration table, generated so that docs and code cannot drift."""
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        if isinstance(default, Path) and default.is_relative_to(REPO_ROOT):
            default = f"./{default.relative_to(REPO_ROOT)}"
        shown = f"`{default}`" if default not in (None, "", []) else "(unset)"
        lines.append(f"| `LLMPIPE_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_table())
