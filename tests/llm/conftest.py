"""Fixtures shared by the model-client tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No proxy variables and no ``~/.netrc``: what a test sets is all the client sees."""
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent-netrc"))
