"""The one real model server of a test session, shared by every real-model test.

Starting llama.cpp's server costs a few seconds and each test needs the CPU it has, so
one session-scoped fixture starts it once, on a free port, and stops it at the end.
Without ``make model-server`` the tests using it are skipped locally and fail in CI
(``CI`` is set by ``.ci/run``), the same rule as the browser test's Chromium.

Use it by naming the fixture (it is re-exported by ``tests/conftest.py``)::

    def test_something(local_model: LocalModelServer) -> None:
        settings = make_settings(..., model_base_url=local_model.url)
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pipeline.llm.local_server import (
    LocalModelServer,
    local_model_installed,
    model_venv,
    running_local_model,
)


@pytest.fixture(scope="session")
def local_model() -> Iterator[LocalModelServer]:
    if not local_model_installed():
        reason = f"no local model server in {model_venv()} (run `make model-server`)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    # One thread: the rest of the suite runs beside these tests (tests/run-suite.sh) and
    # keeps the other core busy; two threads would stall at llama.cpp's per-layer barrier.
    with running_local_model(threads=1) as server:
        yield server
