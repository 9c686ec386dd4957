"""The ``prompts`` sub-app: one-line errors, exit 1 for broken prompts, 2 for misuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli.prompts import prompts_app
from pipeline.config import REPO_ROOT
from pipeline.prompts.registry import PromptRegistry

EXAMPLES = REPO_ROOT / "prompts"
runner = CliRunner()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    copy = tmp_path / "prompts"
    shutil.copytree(EXAMPLES, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = runner.invoke(prompts_app, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def test_list(root: Path) -> None:
    code, out, _ = run("list", "--prompts-dir", str(root))
    assert code == 0
    assert "ticket_triage@2" in out and "released" in out


def test_prompts_dir_from_environment(root: Path) -> None:
    code, out, _ = run("list", env={"LLMPIPE_PROMPTS_DIR": str(root)})
    assert code == 0 and "cited_answer@1" in out


def test_show(root: Path) -> None:
    code, out, _ = run("show", "invoice_extract", "--version", "1", "--prompts-dir", str(root))
    assert code == 0
    assert out.startswith("# invoice_extract@1  sha256:")
    assert "policy: fallback" in out


def test_render_prints_messages_as_json(root: Path) -> None:
    variables = json.dumps({"subject": "Refund", "body": "Charged twice"})
    code, out, _ = run("render", "ticket_triage", "--vars", variables, "--prompts-dir", str(root))
    assert code == 0
    messages = json.loads(out)
    assert messages[-1]["content"].startswith("Customer tier: free")
    assert "OUTPUT_SCHEMA: " in messages[0]["content"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "nope"], "unknown prompt 'nope'"),
        (["show", "ticket_triage", "--version", "9"], "unknown version ticket_triage@9"),
        (["diff", "ticket_triage", "1", "9"], "unknown version ticket_triage@9"),
        (["render", "ticket_triage", "--vars", "{bad"], "--vars is not valid JSON"),
        (["render", "ticket_triage", "--vars", "[1]"], "--vars must be a JSON object"),
        (
            ["render", "ticket_triage", "--vars", '{"subject": "s"}'],
            "variables: 'body' is a required property",
        ),
    ],
)
def test_user_mistakes_exit_2_with_one_line(root: Path, args: list[str], message: str) -> None:
    code, out, err = run(*args, "--prompts-dir", str(root))
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in out + err


def test_missing_prompts_dir_is_a_user_mistake(tmp_path: Path) -> None:
    code, _, err = run("list", "--prompts-dir", str(tmp_path / "nowhere"))
    assert code == 2 and "does not exist" in err


def test_diff(root: Path) -> None:
    code, out, _ = run("diff", "cited_answer", "1", "2", "--prompts-dir", str(root))
    assert code == 0
    assert "+  - rules.py:numbers_are_cited" in out.splitlines()
    code, out, _ = run("diff", "cited_answer", "2", "2", "--prompts-dir", str(root))
    assert code == 0 and "do not differ" in out


def test_check_passes_on_the_examples(root: Path) -> None:
    code, out, err = run("check", "--prompts-dir", str(root))
    assert (code, err) == (0, "")
    assert out.startswith(f"ok: {len(list(PromptRegistry.load(root)))} prompt versions load")


def test_check_fails_after_editing_a_released_version(root: Path) -> None:
    path = root / "ticket_triage" / "v1.yaml"
    path.write_text(path.read_text().replace("max_tokens: 200", "max_tokens: 300"), "utf-8")
    code, _, err = run("check", "--prompts-dir", str(root))
    assert code == 1
    assert err.startswith("error: ticket_triage@1: released version changed")
    code, out, _ = run("list", "--prompts-dir", str(root))
    assert "CHANGED" in out


def test_broken_prompt_file_exits_1_naming_file_and_field(root: Path) -> None:
    path = root / "cited_answer" / "v2.yaml"
    path.write_text(path.read_text().replace("reask: 2", "reask: 7"), "utf-8")
    for command in ("check", "list", "lock"):
        code, out, err = run(command, "--prompts-dir", str(root))
        assert code == 1
        assert err == f"error: {path}: reask: Input should be less than or equal to 3 (got 7)\n"
        assert "Traceback" not in out


def test_new_version_warns_then_lock_adds_it(root: Path) -> None:
    source = (root / "invoice_extract" / "v2.yaml").read_text()
    (root / "invoice_extract" / "v9.yaml").write_text(source.replace("version: 2", "version: 9"))
    code, out, err = run("check", "--prompts-dir", str(root))
    assert code == 0 and err.startswith("warning: invoice_extract@9: not locked yet")
    code, out, _ = run("lock", "--prompts-dir", str(root))
    assert (code, out) == (0, "locked invoice_extract@9\n")
    code, out, _ = run("lock", "--prompts-dir", str(root))
    assert (code, out) == (0, "prompts.lock is up to date; nothing to add\n")
    code, _, err = run("check", "--prompts-dir", str(root))
    assert (code, err) == (0, "")


def test_malformed_lock_file_exits_1(root: Path) -> None:
    (root / "prompts.lock").write_text("- not a mapping\n", "utf-8")
    code, _, err = run("check", "--prompts-dir", str(root))
    assert code == 1 and "lock file must be a mapping" in err
