"""Benchmarks and chaos runs for llmpipe: proof that it is fast enough and loses nothing.

Every benchmark is one command (``python -m bench.<name>``), runs against a real broker,
measures its own baseline in the same run (the machine is small and shared, so absolute
numbers from another run mean little) and writes ``bench/out/<name>.json``, a markdown
summary and plots. ``python -m bench.all --quick`` runs them all and rewrites
``bench/README.md``. None of this is part of the test suite's pass/fail; the short chaos
and fuzz versions that CI runs live in ``tests/e2e/test_chaos.py`` and
``tests/e2e/test_fuzz_pipeline.py`` and call the same code.
"""
