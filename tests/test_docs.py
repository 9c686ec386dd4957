"""The README's configuration table is the one generated from the settings class."""

from __future__ import annotations

from pipeline.config import REPO_ROOT, settings_table

START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"


def test_readme_config_table_matches_settings() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == settings_table(), "regenerate with: python -m pipeline.config"
