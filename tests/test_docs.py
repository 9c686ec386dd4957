"""The README's configuration table is the one generated from the settings class."""

from __future__ import annotations

from pipeline.config import REPO_ROOT, settings_table

START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"


def test_readme_config_table_matches_settings() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == settings_table(), "regenerate with: python -m pipeline.config"


def test_readme_lists_exactly_the_reason_codes_the_cli_accepts() -> None:
    """`dlq --reason` checks names against pipeline.contract.reasons; the README is the list
    operators read, so the two must be the same."""
    import re

    from pipeline.contract.reasons import DEAD_LETTER_REASONS, ESCALATION_REASONS

    readme = (REPO_ROOT / "README.md").read_text()
    dead = readme.split("Dead-letter reasons:", 1)[1].split("Fallback and review reasons:", 1)
    listed_dead = set(re.findall(r"`([a-z_]+)`", dead[0]))
    escalation = dead[1].split("A risk rule that raises", 1)
    listed_escalation = set(re.findall(r"`([a-z_]+)`", escalation[0]))
    assert listed_dead | {"risk_rule_failed"} == set(DEAD_LETTER_REASONS)
    assert "`risk_rule_failed`" in escalation[1][:200]
    assert listed_escalation == set(ESCALATION_REASONS)


def test_fake_model_docs_cover_every_behaviour_and_route() -> None:
    """docs/fake-model.md is the only description of the fake server's knobs."""
    from pipeline.harness.fakellm.behaviors import BEHAVIORS

    doc = (REPO_ROOT / "docs" / "fake-model.md").read_text()
    table = doc.split("## Behaviours", 1)[1].split("##", 1)[0]
    import re

    documented = {m.split(":")[0].strip("[") for m in re.findall(r"^\| `([^`]+)`", table, re.M)}
    assert documented == set(BEHAVIORS)
    server = (REPO_ROOT / "pipeline" / "harness" / "fakellm" / "server.py").read_text()
    for route in re.findall(r"`(?:GET|POST|GET` / `POST) (/[a-z/_]+)`", doc):
        assert f'"{route}"' in server, route
    for directive in ("[[fake:NAME]]", "[[answer:JSON]]", "x-fake-behavior", "times=N"):
        assert directive in doc
