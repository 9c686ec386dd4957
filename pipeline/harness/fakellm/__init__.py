"""A scripted fake LLM: the OpenAI chat-completions API over real HTTP, failing on purpose.

Tests, benchmarks and the demo point the pipeline at it to get every failure mode a real
model endpoint produces (bad JSON, refusals, hedging, 429s, 500s, resets, hangs, slowness)
on demand and reproducibly. See :mod:`pipeline.harness.fakellm.server` for behaviour precedence and
:mod:`pipeline.harness.fakellm.behaviors` for the directive syntax.
"""

from pipeline.harness.fakellm.behaviors import (
    BEHAVIORS,
    BehaviorSpec,
    Profile,
    choose_behavior,
    parse_behavior,
    parse_profile,
)
from pipeline.harness.fakellm.schema_instance import SchemaInstanceError, minimal_instance
from pipeline.harness.fakellm.server import (
    DEFAULT_PORT,
    FakeLLMServer,
    ServerConfig,
    main,
    running_fake_llm,
    serve,
)

__all__ = [
    "BEHAVIORS",
    "DEFAULT_PORT",
    "BehaviorSpec",
    "FakeLLMServer",
    "Profile",
    "SchemaInstanceError",
    "ServerConfig",
    "choose_behavior",
    "main",
    "minimal_instance",
    "parse_behavior",
    "parse_profile",
    "running_fake_llm",
    "serve",
]
