"""Loading prompt directories: the examples load, and every kind of broken file is refused whole."""

from __future__ import annotations

import copy
import operator
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import REPO_ROOT
from pipeline.prompts import (
    PromptLoadError,
    PromptRegistry,
    UnknownPromptError,
    UnknownPromptVersionError,
    UnknownReferenceError,
)

EXAMPLES = REPO_ROOT / "prompts"

MINIMAL: dict[str, Any] = {
    "name": "echo",
    "version": 1,
    "description": "Minimal prompt used to build broken variants.",
    "model": {"model": "fake-model"},
    "messages": [{"role": "user", "content": "Say {{ text }}"}],
    "input_schema": {
        "type": "object",
        "required": ["text"],
        "properties": {"text": {"type": "string"}},
    },
    "output_schema": {
        "type": "object",
        "required": ["reply"],
        "properties": {"reply": {"type": "string"}, "meta": {"type": "object"}},
    },
}


def write_prompt(root: Path, document: Any, name: str = "echo", version: int = 1) -> Path:
    path = root / name / f"v{version}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def variant(**changes: Any) -> dict[str, Any]:
    document = copy.deepcopy(MINIMAL)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = document
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return document


def load_error(root: Path) -> PromptLoadError:
    with pytest.raises(PromptLoadError) as caught:
        PromptRegistry.load(root)
    return caught.value


def test_examples_load_with_every_version_numbered_from_one() -> None:
    registry = PromptRegistry.load(EXAMPLES)
    assert registry.names() == ["cited_answer", "invoice_extract", "ticket_triage"]
    for name in registry.names():
        versions = [p.version for p in registry.versions(name)]
        assert len(versions) >= 3 and versions == list(range(1, len(versions) + 1))
        for prompt in registry.versions(name):
            assert prompt.ref == f"{name}@{prompt.version}"
            assert prompt.source_path == EXAMPLES / name / f"v{prompt.version}.yaml"
            assert prompt.content_hash.startswith("sha256:")
            assert prompt.model.temperature == 0
            assert len(prompt.tests) >= 3
            assert prompt.fallback.rule is not None
    assert any(p.model.logprobs for p in registry)


def test_get_defaults_to_newest_and_rejects_unknowns() -> None:
    registry = PromptRegistry.load(EXAMPLES)
    assert registry.get("ticket_triage").version == 3
    assert registry.get("ticket_triage", 1).version == 1
    with pytest.raises(UnknownPromptVersionError, match=r"ticket_triage@7 .*1, 2, 3"):
        registry.get("ticket_triage", 7)
    with pytest.raises(UnknownPromptError, match="nope"):
        registry.get("nope")
    with pytest.raises(UnknownPromptError):
        registry.versions("nope")


def test_checks_and_fallbacks_are_resolved_at_load() -> None:
    registry = PromptRegistry.load(EXAMPLES)
    prompt = registry.get("cited_answer", 1)
    check = registry.resolve_check(prompt, "rules.py:citations_exist")
    variables = {"question": "q?", "sources": [{"id": "a", "text": "t"}]}
    assert check({"answer": "x", "citations": ["a"]}, variables) == []
    assert check({"answer": "x", "citations": ["b"]}, variables) != []
    assert registry.resolve_check(prompt, "rules.py:citations_exist") is check
    with pytest.raises(UnknownReferenceError):
        registry.resolve_check(prompt, "rules.py:numbers_are_cited")


def test_fallback_uses_rule_then_default_then_review() -> None:
    registry = PromptRegistry.load(EXAMPLES)
    no_keywords = {"subject": "Hello", "body": "Is your office in Lisbon?"}
    billing = {"subject": "Refund", "body": "Please refund the duplicate charge on my invoice."}
    v1 = registry.resolve_fallback(registry.get("ticket_triage", 1))
    v2 = registry.resolve_fallback(registry.get("ticket_triage", 2))
    answer = v1(billing)
    assert answer is not None and answer["label"] == "billing"
    assert v2(billing) == answer
    assert v1(no_keywords) is None
    default = v2(no_keywords)
    assert default is not None and default["label"] == "other"
    default["label"] = "mutated"
    assert registry.get("ticket_triage", 2).fallback.default == v2(no_keywords)


def test_fallback_with_neither_rule_nor_default_always_reviews(tmp_path: Path) -> None:
    write_prompt(tmp_path, MINIMAL)
    registry = PromptRegistry.load(tmp_path)
    assert registry.resolve_fallback(registry.get("echo"))({"text": "x"}) is None


def test_package_module_references_resolve(tmp_path: Path) -> None:
    write_prompt(tmp_path, variant(rules__checks=["operator:add"], fallback__rule="copy:deepcopy"))
    registry = PromptRegistry.load(tmp_path)
    prompt = registry.get("echo")
    assert registry.resolve_check(prompt, "operator:add") is operator.add
    assert prompt.code_files == {}


def copy_examples(tmp_path: Path) -> Path:
    root = tmp_path / "prompts"
    shutil.copytree(EXAMPLES, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.mark.parametrize(
    ("document", "field", "message"),
    [
        (variant(model__temprature=0.2), "model.temprature", "unknown field"),
        ({k: v for k, v in MINIMAL.items() if k != "description"}, "description", "required"),
        (variant(model__temperature="0.2"), "model.temperature", "valid number"),
        (variant(reask=5), "reask", "less than or equal to 3"),
        (variant(name="other"), "name", "does not match its directory 'echo'"),
        (variant(version=2), "version", "does not match the file name v1.yaml"),
        (
            variant(output_schema={"type": "object", "properties": {"x": {"type": "strin"}}}),
            "output_schema",
            "not a valid JSON Schema at /properties/x/type",
        ),
        (variant(input_schema={"type": "array"}), "input_schema", "must describe an object"),
        (variant(messages=[]), "messages", "at least 1 item"),
        (variant(messages=[{"role": "tool", "content": "x"}]), "messages[0].role", "'system'"),
        (
            variant(messages=[{"role": "user", "content": "{{ text }"}]),
            "messages[0].content",
            "template syntax error on line 1",
        ),
        (
            variant(messages=[{"role": "user", "content": "{{ txet }}"}]),
            "messages",
            "txet, not declared in input_schema.properties",
        ),
        (variant(rules__regex={"reply": "("}), "rules.regex", "invalid regex for 'reply'"),
        (variant(rules__max_length={"replly": 3}), "rules", "replly, not a property"),
        (variant(rules__checks=["rules.py"]), "rules.checks", "not a function reference"),
        (variant(rules__checks=["../x.py:f"]), "rules.checks", "inside the prompt's directory"),
        (
            variant(confidence__policy="clarify"),
            "confidence",
            "policy 'clarify' needs clarify_field",
        ),
        (variant(fallback__default={"reply": 3}), "fallback", "default does not match"),
        (variant(model__fallback_models=["fake-model"]), "model", "repeats fake-model"),
        (variant(content_hash="sha256:" + "0" * 64), "content_hash", "unknown field"),
        (variant(source_path="/etc/passwd"), "source_path", "unknown field"),
    ],
)
def test_invalid_content_names_file_and_field(
    tmp_path: Path, document: Any, field: str, message: str
) -> None:
    path = write_prompt(tmp_path, document)
    error = load_error(tmp_path)
    assert [(p.path, p.field) for p in error.problems] == [(path, field)]
    assert message in error.problems[0].message
    assert str(path) in str(error) and field in str(error)


def test_rule_paths_follow_nested_properties_refs_and_combinators(tmp_path: Path) -> None:
    output_schema = {
        "type": "object",
        "$defs": {"party": {"type": "object", "properties": {"name": {"type": "string"}}}},
        "properties": {
            "buyer": {"$ref": "#/$defs/party"},
            "lines": {"type": "object", "properties": {"first": {"type": "string"}}},
        },
        "anyOf": [{"properties": {"note": {"type": "string"}}}],
    }
    rules = {"max_length": {"buyer.name": 5, "lines.first": 9, "note": 3}}
    write_prompt(tmp_path, variant(output_schema=output_schema, rules=rules))
    assert PromptRegistry.load(tmp_path).get("echo").rules.max_length["buyer.name"] == 5
    write_prompt(
        tmp_path, variant(output_schema=output_schema, rules={"enum": {"buyer.nmae": [1]}})
    )
    assert "buyer.nmae, not a property in output_schema" in str(load_error(tmp_path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: echo\nversion: [1\n", "invalid YAML"),
        ("name: echo\nname: echo\n", "duplicate key 'name'"),
        ("on: true\n", "is not a string"),
        ("- just\n- a list\n", "expected a mapping, found list"),
        ("", "expected a mapping, found an empty file"),
        ("x: !!binary aGVsbG8=\n", "not representable as JSON"),
    ],
)
def test_unparseable_files_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "echo" / "v1.yaml"
    path.parent.mkdir()
    path.write_text(text, encoding="utf-8")
    error = load_error(tmp_path)
    assert [p.path for p in error.problems] == [path]
    assert message in str(error)


def test_yaml_error_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "echo" / "v1.yaml"
    path.parent.mkdir()
    path.write_text("name: echo\nversion: 1\ndescription: [x\nmodel: y\n", encoding="utf-8")
    assert "(line 4, column 6)" in str(load_error(tmp_path))


def test_dates_stay_strings(tmp_path: Path) -> None:
    document = variant()
    document["tests"] = [
        {
            "name": "date",
            "variables": {"text": "2024-03-01"},
            "model_answer": "{}",
            "expect": {"output_equals": {"reply": "2024-03-01"}},
        }
    ]
    path = tmp_path / "echo" / "v1.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(document).replace("'2024-03-01'", "2024-03-01"), "utf-8")
    assert "2024-03-01" in path.read_text() and "'2024-03-01'" not in path.read_text()
    case = PromptRegistry.load(tmp_path).get("echo").tests[0]
    assert case.variables == {"text": "2024-03-01"}
    assert case.expect.output_equals == {"reply": "2024-03-01"}


@pytest.mark.parametrize(
    ("rules_py", "reference", "message"),
    [
        (None, "rules.py:check", "cannot read rules.py"),
        ("def check(output, variables):\n    return []\n", "rules.py:missing", "AttributeError"),
        ("def check(output, variables):\n  return [\n", "rules.py:check", "SyntaxError"),
        ("import not_a_module_xyz\n", "rules.py:check", "ModuleNotFoundError"),
        ("check = 3\n", "rules.py:check", "not callable"),
        ("def check(output):\n    return []\n", "rules.py:check", "f(output, variables)"),
        ("", "not_a_package_xyz.rules:check", "ModuleNotFoundError"),
    ],
)
def test_unresolvable_checks_are_load_errors(
    tmp_path: Path, rules_py: str | None, reference: str, message: str
) -> None:
    path = write_prompt(tmp_path, variant(rules__checks=[reference]))
    if rules_py is not None:
        (path.parent / "rules.py").write_text(rules_py, encoding="utf-8")
    error = load_error(tmp_path)
    assert [(p.path, p.field) for p in error.problems] == [(path, "rules.checks[0]")]
    assert message in str(error)


def test_fallback_rule_arity_is_checked(tmp_path: Path) -> None:
    path = write_prompt(tmp_path, variant(fallback__rule="rules.py:answer"))
    (path.parent / "rules.py").write_text("def answer(a, b):\n    return None\n", "utf-8")
    error = load_error(tmp_path)
    assert [(p.field, "f(variables)" in p.message) for p in error.problems] == [
        ("fallback.rule", True)
    ]


def test_one_broken_file_loads_nothing(tmp_path: Path) -> None:
    root = copy_examples(tmp_path)
    broken = root / "invoice_extract" / "v2.yaml"
    broken.write_text(broken.read_text().replace("reask: 2", "reask: lots"), "utf-8")
    error = load_error(root)
    assert [(p.path, p.field) for p in error.problems] == [(broken, "reask")]


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    write_prompt(tmp_path, variant(reask=9))
    write_prompt(tmp_path, variant(name="second", description=""), name="second")
    problems = load_error(tmp_path).problems
    assert {(p.path.parent.name, p.field) for p in problems} == {
        ("echo", "reask"),
        ("second", "description"),
    }


@pytest.mark.parametrize(
    ("relative", "message"),
    [
        ("echo/V2.yaml", "must be named v<N>.yaml"),
        ("echo/v02.yaml", "must be named v<N>.yaml"),
        ("echo/v3.yml", "must be named v<N>.yaml"),
        ("stray.yaml", "belong in <name>/v<N>.yaml"),
    ],
)
def test_misnamed_files_are_errors(tmp_path: Path, relative: str, message: str) -> None:
    write_prompt(tmp_path, MINIMAL)
    (tmp_path / relative).write_text("name: echo\n", "utf-8")
    error = load_error(tmp_path)
    assert [p.path for p in error.problems] == [tmp_path / relative]
    assert message in str(error)


def test_directory_without_versions_and_missing_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "has no v<N>.yaml files" in str(load_error(tmp_path))
    assert "does not exist" in str(load_error(tmp_path / "missing"))


def test_hidden_and_underscore_entries_and_lock_are_ignored(tmp_path: Path) -> None:
    write_prompt(tmp_path, MINIMAL)
    (tmp_path / "_drafts").mkdir()
    (tmp_path / "_drafts" / "v1.yaml").write_text("junk: [", "utf-8")
    (tmp_path / ".git").mkdir()
    (tmp_path / "prompts.lock").write_text("", "utf-8")
    assert PromptRegistry.load(tmp_path).names() == ["echo"]


def test_loading_does_not_write_bytecode_into_prompts(tmp_path: Path) -> None:
    root = copy_examples(tmp_path)
    PromptRegistry.load(root)
    assert not list(root.rglob("__pycache__"))
