"""The test and benchmark harness: fake model server, scenarios, ledger, demo.

Shared by ``tests/`` and ``bench/``; the runtime never imports it (only the CLI's ``demo``
and ``fake-llm`` commands do).
"""
