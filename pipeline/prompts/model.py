"""The prompt file format (``prompts/<name>/v<N>.yaml``) as Pydantic models.

Every model forbids unknown keys and validates strictly (no "0.2" -> 0.2
coercion) because a prompt file is code: a misspelt key such as
``temprature`` must fail the load, not silently fall back to a default. Checks
that need more than one field (template variables against the input schema,
rule field paths against the output schema, the safe default against the
output schema) run here too, so that anything a loaded ``PromptVersion``
promises has been verified once, at load, instead of on the first event.

``PromptSpec`` is exactly what a file may contain; ``PromptVersion`` adds what
the loader knows about the file (where it came from and its content hash) so
those can never be written in, or faked by, the file itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from jinja2 import TemplateSyntaxError
from jsonschema import Draft202012Validator, SchemaError
from jsonschema.exceptions import ValidationError as SchemaValidationError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.llm.structured import StrictDecision, StructuredOutput, strict_decision
from pipeline.prompts.conditions import Condition, parse_condition
from pipeline.prompts.references import Reference, parse_reference
from pipeline.prompts.templating import template_variables

PROMPT_NAME_PATTERN = r"^[a-z][a-z0-9_]*$"

FieldPath = Annotated[str, Field(pattern=r"^[^.\s]+(\.[^.\s]+)*$")]
"""A field of the model's output object; dots walk into nested objects."""

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
AGREEMENT_RULE_FIELD = "confidence.components.agreement.rule"


def _parses_as_reference(reference: str) -> str:
    parse_reference(reference)
    return reference


FunctionReference = Annotated[str, AfterValidator(_parses_as_reference)]
"""A ``rules.py:function`` or ``package.module:function`` reference, parsed at load so a
typo fails there, naming its field, instead of when the function is first needed."""


def _patterns_compile(patterns: dict[str, str]) -> dict[str, str]:
    for field, pattern in patterns.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regex for {field!r}: {exc}") from exc
    return patterns


RegexByField = Annotated[dict[FieldPath, str], AfterValidator(_patterns_compile)]
"""Output field path -> regular expression, compiled at load so a bad pattern fails there."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """Name and version implied by a file's path, passed as validation context.

    The path is what people grep for and what the lock records; a file whose
    body claims another identity would make both lie, so it is rejected.
    """

    name: str
    version: int


# Body fields with a first-class place in the prompt file (or owned by llmpipe): an
# ``extra_body`` that set one of them would silently override it.
_FIRST_CLASS_BODY_FIELDS = frozenset(
    {
        "model",
        "messages",
        "temperature",
        "max_tokens",
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
        "seed",
        "stop",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "reasoning_effort",
        "response_format",
        "stream",
        "n",
    }
)
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class ModelParams(_Strict):
    """How to call the model: the sampling parameters are prompt logic, so they live here
    and are part of the content hash (the whole file is hashed). Where the model runs
    (base URL, keys, gateway headers, deployment body fields, whether it is a reasoning
    model) is deployment and lives in the endpoint configuration instead.

    ``fallback_models`` are ordered alternates for resilience. ``structured_output``
    overrides the endpoint's mode for this prompt (see ``pipeline.llm.structured``).
    ``reasoning_effort`` marks the prompt as written for a reasoning model, which takes
    no ``temperature``, ``top_p``, penalties or ``logprobs``. ``extra_body`` carries
    server-specific sampling fields (llama.cpp's ``top_k``, vLLM's ``min_p``...).
    """

    model: str = Field(min_length=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(default=512, ge=1)
    logprobs: bool = False
    timeout_s: float = Field(default=30.0, gt=0.0)
    fallback_models: list[str] = Field(default_factory=list)
    seed: int | None = None
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list, max_length=4)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    structured_output: StructuredOutput | None = None
    extra_body: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _alternates_are_distinct(self) -> ModelParams:
        duplicates = _repeated([self.model, *self.fallback_models])
        if duplicates:
            raise ValueError(f"fallback_models repeats {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _reasoning_takes_no_sampling(self) -> ModelParams:
        if self.reasoning_effort is None:
            return self
        sampling = {"temperature", "top_p", "presence_penalty", "frequency_penalty", "logprobs"}
        given = sorted(sampling & self.model_fields_set)
        if given:
            raise ValueError(
                f"reasoning models take no {', '.join(given)}; remove it or reasoning_effort"
            )
        return self

    @field_validator("extra_body")
    @classmethod
    def _extra_body_adds_only(cls, extra: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(_FIRST_CLASS_BODY_FIELDS & set(extra))
        if clash:
            raise ValueError(f"extra_body may not set {', '.join(clash)}: use its own field")
        return extra


class MessageTemplate(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)

    @field_validator("content")
    @classmethod
    def _parses(cls, content: str) -> str:
        try:
            template_variables(content)
        except TemplateSyntaxError as exc:
            raise ValueError(f"template syntax error on line {exc.lineno}: {exc.message}") from exc
        return content


class OutputRules(_Strict):
    """Deterministic checks applied to the parsed output after schema validation.

    They exist next to the JSON Schema because some constraints are awkward or
    impossible to express there (banned phrases over the whole output, checks
    against the input variables) and because their error strings are what the
    re-ask prompt shows the model.
    """

    regex: RegexByField = Field(default_factory=dict)
    max_length: dict[FieldPath, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    min_length: dict[FieldPath, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    enum: dict[FieldPath, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    banned_phrases: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    checks: list[str] = Field(default_factory=list)

    @field_validator("checks")
    @classmethod
    def _references_parse(cls, checks: list[str]) -> list[str]:
        for check in checks:
            parse_reference(check)
        if len(set(checks)) != len(checks):
            raise ValueError("a check is listed twice")
        return checks

    @model_validator(mode="after")
    def _bounds_are_consistent(self) -> OutputRules:
        for field, low in self.min_length.items():
            high = self.max_length.get(field)
            if high is not None and low > high:
                raise ValueError(f"min_length {low} > max_length {high} for {field!r}")
        return self

    def fields(self) -> set[str]:
        """Every output field path some rule refers to."""
        return {*self.regex, *self.max_length, *self.min_length, *self.enum}


Weight = Annotated[float, Field(ge=0.0, le=10.0)]
"""A component's exponent in the confidence product: 0 records it without counting it."""

KeyFields = Annotated[list[FieldPath], Field(min_length=1)]


class AgreementSpec(_Strict):
    """Second opinion from a deterministic rule: do model and rule agree on ``fields``?

    ``rule`` is a ``f(variables) -> output | None`` reference; by default the
    prompt's ``fallback.rule``. A rule that returns None (or lacks a field) has
    no opinion, and no opinion is not counted either way.
    """

    fields: KeyFields
    rule: FunctionReference | None = None
    weight: Weight = 1.0


class GroundingSpec(_Strict):
    """Extractive fields whose values must be printed in the input (after normalisation)."""

    fields: KeyFields
    weight: Weight = 1.0


class SupportSpec(_Strict):
    """Free-text fields (summaries) that must be supported by the input.

    The score is the share of the text's content words found in the input,
    scaled so that ``full_support`` counts as fully supported, times
    ``invented_penalty`` for every number or name that the input does not contain.
    """

    fields: KeyFields
    full_support: Annotated[float, Field(gt=0.0, le=1.0)] = 0.6
    invented_penalty: Probability = 0.5
    weight: Weight = 1.0


class ConsistencySpec(_Strict):
    """Self-consistency: ``samples`` extra answers at ``temperature``; costs that many calls."""

    fields: KeyFields
    samples: int = Field(default=3, ge=1, le=10)
    temperature: float = Field(default=0.8, gt=0.0, le=2.0)
    weight: Weight = 1.0


class FieldLogprobSpec(_Strict):
    """The model's probability of the values of ``fields`` (their tokens only)."""

    fields: KeyFields
    weight: Weight = 1.0


class ConfidenceComponents(_Strict):
    """Second opinions, each an optional factor of the confidence with its own weight."""

    agreement: AgreementSpec | None = None
    grounding: GroundingSpec | None = None
    support: SupportSpec | None = None
    consistency: ConsistencySpec | None = None
    field_logprob: FieldLogprobSpec | None = None

    def fields(self) -> set[str]:
        """Every output field path a component refers to."""
        specs = (self.agreement, self.grounding, self.support, self.consistency)
        found = {f for spec in specs if spec is not None for f in spec.fields}
        if self.field_logprob is not None:
            found.update(self.field_logprob.fields)
        return found


class SelfCheckSpec(_Strict):
    """The self-check call with its own model and budget.

    Its calls are charged to the budget of ``<prompt name>.self_check`` (not the
    prompt's own allowance), so a grader cannot starve the answers it grades.
    """

    model: str | None = None
    """Default: the prompt's own model."""
    max_tokens: int = Field(default=20, ge=1, le=200)
    weight: Weight = 1.0


MonitorSignal = Annotated[str, Field(min_length=1)]
CONFIDENCE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("0.0-0.5", 0.5),
    ("0.5-0.8", 0.8),
    ("0.8-0.95", 0.95),
    ("0.95-1.0", float("inf")),
)
"""The confidence distribution is monitored as the share of answers in each bucket."""
MONITOR_ROUTES = ("result", "review", "fallback")


class MonitorSpec(_Strict):
    """Distribution monitor: shares over a sliding window against a baseline.

    Signals are the declared categorical ``fields`` plus ``confidence`` (shares
    per :data:`CONFIDENCE_BUCKETS`) and ``route`` (the settle stage's route).
    The baseline of a signal is, in order: ``expected`` (explicit shares in
    this file), the prompt's test cases (``baseline: tests``; fields and
    routes), or the previous version's window in the same process. A total
    variation distance above ``max_shift`` raises one alert and, with
    ``trip_breaker``, holds the prompt version's quality breaker open while
    the shift lasts.
    """

    window: int = Field(default=50, ge=10, le=10_000)
    fields: list[FieldPath] = Field(default_factory=list)
    confidence: bool = True
    routes: bool = True
    max_shift: Annotated[float, Field(gt=0.0, le=1.0)] = 0.4
    baseline: Literal["expected", "tests", "previous"] = "expected"
    expected: dict[MonitorSignal, dict[str, Probability]] = Field(default_factory=dict)
    trip_breaker: bool = True

    def signals(self) -> list[str]:
        found = list(self.fields)
        if self.confidence:
            found.append("confidence")
        if self.routes:
            found.append("route")
        return found

    @model_validator(mode="after")
    def _expected_is_a_distribution(self) -> MonitorSpec:
        unknown = sorted(set(self.expected) - set(self.signals()))
        if unknown:
            raise ValueError(f"expected names {', '.join(unknown)}, which is not a signal")
        for signal, shares in self.expected.items():
            total = sum(shares.values())
            if abs(total - 1.0) > 0.01:
                raise ValueError(f"expected.{signal} shares sum to {total:.3f}, not 1")
        buckets = {name for name, _ in CONFIDENCE_BUCKETS}
        bad = sorted(set(self.expected.get("confidence", {})) - buckets)
        if bad:
            raise ValueError(f"expected.confidence buckets are {sorted(buckets)}, not {bad}")
        routes = sorted(set(self.expected.get("route", {})) - set(MONITOR_ROUTES))
        if routes:
            raise ValueError(f"expected.route routes are {list(MONITOR_ROUTES)}, not {routes}")
        if self.baseline == "expected" and not self.expected:
            raise ValueError("baseline 'expected' needs expected shares")
        return self


class ConfidencePolicy(_Strict):
    """What to do with an answer, given its confidence score.

    ``policy`` applies below ``accept``: "review" sends it to a human,
    "fallback" uses the prompt's fallback instead, "clarify" turns it into a
    clarifying question, which needs ``clarify_field`` to know which output
    field carries the model's own request for clarification.

    ``components`` are second opinions (see :mod:`pipeline.stages.score`);
    ``self_check`` is ``true`` (the prompt's model, default budget) or a
    :class:`SelfCheckSpec`; ``monitor`` watches the output distribution.
    """

    accept: Probability = 0.7
    policy: Literal["review", "fallback", "clarify"] = "review"
    clarify_field: str | None = None
    self_check: bool | SelfCheckSpec = False
    components: ConfidenceComponents = Field(default_factory=ConfidenceComponents)
    monitor: MonitorSpec | None = None

    @model_validator(mode="after")
    def _clarify_has_field(self) -> ConfidencePolicy:
        if self.policy == "clarify" and self.clarify_field is None:
            raise ValueError("policy 'clarify' needs clarify_field")
        return self

    @property
    def self_check_spec(self) -> SelfCheckSpec | None:
        if isinstance(self.self_check, SelfCheckSpec):
            return self.self_check
        return SelfCheckSpec() if self.self_check else None

    def without_components(self) -> ConfidencePolicy:
        """The same policy with every second opinion switched off: the evaluation baseline."""
        return self.model_copy(update={"components": ConfidenceComponents()})


class FallbackSpec(_Strict):
    """How to answer without the model.

    ``rule`` runs first; when it returns None (or is absent) ``default`` is
    used; with neither, the fallback is always human review.
    """

    rule: FunctionReference | None = None
    default: dict[str, Any] | None = None


class RiskRule(_Strict):
    """One reason a person must see an answer that would otherwise be delivered.

    ``when`` is a field comparison (:mod:`pipeline.prompts.conditions`) on the output or,
    with ``input.``, on the variables; ``check`` names a function
    ``f(output, variables) -> list[str]`` for anything else (a non-empty list means the
    rule fires, and its strings say why). Exactly one of the two.
    """

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    when: str | None = None
    check: FunctionReference | None = None

    @field_validator("when")
    @classmethod
    def _condition_parses(cls, when: str | None) -> str | None:
        if when is not None:
            parse_condition(when)
        return when

    @model_validator(mode="after")
    def _one_form(self) -> RiskRule:
        if (self.when is None) == (self.check is None):
            raise ValueError(f"risk rule {self.name!r} needs exactly one of 'when' or 'check'")
        return self

    @property
    def condition(self) -> Condition | None:
        return parse_condition(self.when) if self.when is not None else None


class AuditPolicy(_Strict):
    """A share of *accepted* answers copied to review, chosen by a hash of the request id.

    The answer is delivered at once either way; the copy only asks a person for a verdict,
    which is what makes the accepted-error rate measurable. ``supersede``: a reviewer's
    correction of an audited answer is also published as a new result (source ``human``)
    that supersedes the delivered one; without it the correction only goes to
    ``llm.corrections``.
    """

    share: Probability = 0.0
    supersede: bool = False


class BurnInPolicy(_Strict):
    """A new version's first ``answers`` answers, and every answer in its first ``days``,
    wait for a person before delivery (counted fleet-wide on Kafka). Zero turns a limit off;
    with both set, burn-in lasts until both have passed."""

    answers: int = Field(default=0, ge=0)
    days: float = Field(default=0.0, ge=0.0)

    @property
    def active(self) -> bool:
        return self.answers > 0 or self.days > 0


class ReviewPolicy(_Strict):
    """When a person sees an answer although the pipeline could settle it on its own."""

    risk: list[RiskRule] = Field(default_factory=list)
    audit: AuditPolicy = Field(default_factory=AuditPolicy)
    burn_in: BurnInPolicy = Field(default_factory=BurnInPolicy)
    preview: list[Annotated[str, Field(pattern=r"^(output\.)?[^.\s]+(\.[^.\s]+)*$")]] = Field(
        default_factory=list, max_length=3
    )
    """What the review queue shows for each item so a reviewer can triage without opening
    it: input variables by name (``subject``) or output fields (``output.summary``).
    Undeclared, the queue previews the first string variable the input schema requires.
    Display only, but a declared value is hashed like every other value in the file."""

    @field_validator("preview", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        """``preview: subject`` reads as well as ``preview: [subject, output.label]``."""
        return [value] if isinstance(value, str) else value

    @field_validator("risk")
    @classmethod
    def _names_unique(cls, risk: list[RiskRule]) -> list[RiskRule]:
        duplicates = _repeated([r.name for r in risk])
        if duplicates:
            raise ValueError(f"duplicate risk rule names: {', '.join(duplicates)}")
        return risk


class TestExpectation(_Strict):
    """What a recorded answer must produce offline; keys are output field paths.

    ``output_contains`` is a case-sensitive substring test and
    ``output_matches`` a full regex match, the same as ``rules.regex``, so an
    expectation reads like the rule it exercises.
    """

    __test__: ClassVar[bool] = False  # not a pytest test class, despite the name

    route: Literal["result", "review", "fallback", "dead_letter"] | None = None
    output_equals: dict[FieldPath, Any] = Field(default_factory=dict)
    output_contains: dict[FieldPath, str] = Field(default_factory=dict)
    output_matches: RegexByField = Field(default_factory=dict)
    confidence_above: Probability | None = None
    confidence_below: Probability | None = None

    @model_validator(mode="after")
    def _confidence_window_not_empty(self) -> TestExpectation:
        above, below = self.confidence_above, self.confidence_below
        if above is not None and below is not None and above >= below:
            raise ValueError(f"confidence_above {above} must be below confidence_below {below}")
        return self


class PromptTestCase(_Strict):
    """A recorded model answer and what the pipeline must do with it; runs offline in CI."""

    __test__: ClassVar[bool] = False

    name: str = Field(min_length=1)
    variables: dict[str, Any]
    model_answer: str
    expect: TestExpectation


class PromptSpec(_Strict):
    """Exactly what one ``v<N>.yaml`` file may contain.

    Field order matters: the schemas are declared before the fields whose
    validators compare against them (``info.data`` only holds earlier fields).
    """

    name: str = Field(pattern=PROMPT_NAME_PATTERN)
    version: int = Field(ge=1)
    description: str = Field(min_length=1)
    model: ModelParams
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    messages: list[MessageTemplate] = Field(min_length=1)
    rules: OutputRules = Field(default_factory=OutputRules)
    confidence: ConfidencePolicy = Field(default_factory=ConfidencePolicy)
    fallback: FallbackSpec = Field(default_factory=FallbackSpec)
    review: ReviewPolicy = Field(default_factory=ReviewPolicy)
    reask: int = Field(default=1, ge=0, le=3)
    tests: list[PromptTestCase] = Field(default_factory=list)

    _input_validator: Draft202012Validator = PrivateAttr()
    _output_validator: Draft202012Validator = PrivateAttr()
    _strict: StrictDecision = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        self._input_validator = _validator(self.input_schema)
        self._output_validator = _validator(self.output_schema)
        self._strict = strict_decision(self.output_schema)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def input_validator(self) -> Draft202012Validator:
        """Built once per version; validating every event must not rebuild it."""
        return self._input_validator

    @property
    def output_validator(self) -> Draft202012Validator:
        return self._output_validator

    @property
    def strict_output(self) -> StrictDecision:
        """Whether ``output_schema`` can go to ``json_schema`` mode with ``strict: true``."""
        return self._strict

    def references(self) -> list[tuple[str, Reference]]:
        """Every function reference with the field it came from, for hashing and resolving."""
        found = [
            (f"rules.checks[{i}]", parse_reference(c)) for i, c in enumerate(self.rules.checks)
        ]
        if self.fallback.rule is not None:
            found.append(("fallback.rule", parse_reference(self.fallback.rule)))
        found += [
            (f"review.risk[{i}].check", parse_reference(r.check))
            for i, r in enumerate(self.review.risk)
            if r.check is not None
        ]
        agreement = self.confidence.components.agreement
        if agreement is not None and agreement.rule is not None:
            found.append((AGREEMENT_RULE_FIELD, parse_reference(agreement.rule)))
        return found

    @field_validator("name")
    @classmethod
    def _name_matches_directory(cls, name: str, info: ValidationInfo) -> str:
        identity = info.context
        if isinstance(identity, FileIdentity) and name != identity.name:
            raise ValueError(f"{name!r} does not match its directory {identity.name!r}")
        return name

    @field_validator("version")
    @classmethod
    def _version_matches_file_name(cls, version: int, info: ValidationInfo) -> int:
        identity = info.context
        if isinstance(identity, FileIdentity) and version != identity.version:
            raise ValueError(f"{version} does not match the file name v{identity.version}.yaml")
        return version

    @field_validator("input_schema", "output_schema")
    @classmethod
    def _is_object_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            where = "".join(f"/{p}" for p in exc.absolute_path) or "/"
            raise ValueError(f"not a valid JSON Schema at {where}: {exc.message}") from exc
        if schema.get("type") != "object":
            raise ValueError("must describe an object (type: object)")
        return schema

    @field_validator("messages")
    @classmethod
    def _variables_are_declared(
        cls, messages: list[MessageTemplate], info: ValidationInfo
    ) -> list[MessageTemplate]:
        declared = info.data.get("input_schema", {}).get("properties")
        if not isinstance(declared, Mapping):
            return messages
        for index, message in enumerate(messages):
            unknown = sorted(template_variables(message.content) - declared.keys())
            if unknown:
                raise ValueError(
                    f"messages[{index}] uses {', '.join(unknown)}, "
                    "not declared in input_schema.properties"
                )
        return messages

    @field_validator("rules")
    @classmethod
    def _rule_fields_exist(cls, rules: OutputRules, info: ValidationInfo) -> OutputRules:
        _require_paths(info, rules.fields(), "rules refer to")
        return rules

    @field_validator("confidence")
    @classmethod
    def _clarify_field_exists(
        cls, confidence: ConfidencePolicy, info: ValidationInfo
    ) -> ConfidencePolicy:
        if confidence.clarify_field is not None:
            _require_paths(info, {confidence.clarify_field}, "clarify_field refers to")
        _require_paths(info, confidence.components.fields(), "confidence components refer to")
        if confidence.monitor is not None:
            _require_paths(info, set(confidence.monitor.fields), "monitor.fields refer to")
        return confidence

    @model_validator(mode="after")
    def _agreement_has_a_rule(self) -> PromptSpec:
        agreement = self.confidence.components.agreement
        if agreement is not None and agreement.rule is None and self.fallback.rule is None:
            raise ValueError(
                "confidence.components.agreement needs a rule: set agreement.rule or fallback.rule"
            )
        return self

    @field_validator("fallback")
    @classmethod
    def _default_matches_output_schema(
        cls, fallback: FallbackSpec, info: ValidationInfo
    ) -> FallbackSpec:
        schema = info.data.get("output_schema")
        if fallback.default is not None and schema is not None:
            error = _first_error(_validator(schema), fallback.default)
            if error is not None:
                raise ValueError(f"default does not match output_schema: {error}")
        return fallback

    @field_validator("review")
    @classmethod
    def _risk_fields_exist(cls, review: ReviewPolicy, info: ValidationInfo) -> ReviewPolicy:
        conditions = [c for c in (r.condition for r in review.risk) if c is not None]
        _require_paths(info, {c.path for c in conditions if not c.on_input}, "risk rules refer to")
        inputs = info.data.get("input_schema")
        if inputs is not None:
            missing = sorted(
                c.field for c in conditions if c.on_input and not schema_has_path(inputs, c.path)
            )
            if missing:
                raise ValueError(
                    f"risk rules refer to {', '.join(missing)}, not a property in input_schema"
                )
        return review

    @field_validator("review")
    @classmethod
    def _preview_fields_exist(cls, review: ReviewPolicy, info: ValidationInfo) -> ReviewPolicy:
        outputs = {p.removeprefix("output.") for p in review.preview if p.startswith("output.")}
        _require_paths(info, outputs, "review.preview refers to")
        inputs = info.data.get("input_schema", {}).get("properties")
        if isinstance(inputs, Mapping):
            unknown = sorted(
                p for p in review.preview if not p.startswith("output.") and p not in inputs
            )
            if unknown:
                raise ValueError(
                    f"review.preview refers to {', '.join(unknown)}, "
                    "not declared in input_schema.properties"
                )
        return review

    @field_validator("tests")
    @classmethod
    def _test_names_unique(cls, tests: list[PromptTestCase]) -> list[PromptTestCase]:
        duplicates = _repeated([t.name for t in tests])
        if duplicates:
            raise ValueError(f"duplicate test names: {', '.join(duplicates)}")
        return tests


class PromptVersion(PromptSpec):
    """A validated prompt file plus what only the loader knows.

    ``content_hash`` identifies the behaviour (see ``pipeline.prompts.hashing``);
    ``code_files`` maps each local file covered by the hash to its own digest,
    so a lock violation can say which file to look at.
    """

    source_path: Path
    content_hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    code_files: dict[str, str] = Field(default_factory=dict)


def _repeated(values: list[str]) -> list[str]:
    """Each value listed more than once, sorted: the load error names every clash at once."""
    return sorted({v for v in values if values.count(v) > 1})


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _first_error(validator: Draft202012Validator, instance: Any) -> str | None:
    errors: list[SchemaValidationError] = list(validator.iter_errors(instance))
    if not errors:
        return None
    first = min(errors, key=lambda e: e.json_path)
    return f"{first.json_path}: {first.message}"


def _require_paths(info: ValidationInfo, paths: set[str], what: str) -> None:
    schema = info.data.get("output_schema")
    if schema is None:
        return
    missing = sorted(p for p in paths if not schema_has_path(schema, p))
    if missing:
        raise ValueError(f"{what} {', '.join(missing)}, not a property in output_schema")


def schema_has_path(schema: Mapping[str, Any], path: str) -> bool:
    """Whether some branch of ``schema`` declares the dotted property ``path``.

    Follows ``properties``, the combinators, ``if/then/else`` and local
    ``$ref``s, which covers the schemas prompts use. It exists so a typo in a
    rule's field name fails at load instead of the rule silently never firing.
    """
    visited: set[tuple[int, int]] = set()

    def walk(node: Any, parts: tuple[str, ...]) -> bool:
        if not isinstance(node, Mapping) or (id(node), len(parts)) in visited:
            return False
        if not parts:
            return True
        visited.add((id(node), len(parts)))
        branches: list[Any] = [node.get("then"), node.get("else")]
        for combinator in ("allOf", "anyOf", "oneOf"):
            branches.extend(node.get(combinator, []))
        reference = node.get("$ref")
        if isinstance(reference, str) and reference.startswith("#"):
            branches.append(_resolve_pointer(schema, reference))
        properties = node.get("properties")
        if isinstance(properties, Mapping) and walk(properties.get(parts[0]), parts[1:]):
            return True
        return any(walk(branch, parts) for branch in branches)

    return walk(schema, tuple(path.split(".")))


def _resolve_pointer(schema: Mapping[str, Any], reference: str) -> Any:
    node: Any = schema
    for token in reference.removeprefix("#").strip("/").split("/"):
        if not token:
            continue
        if not isinstance(node, Mapping):
            return None
        node = node.get(token.replace("~1", "/").replace("~0", "~"))
    return node
