"""``python -m pipeline.cli``: the ``llmpipe`` command (workers started by the demo, tests
and benchmarks run it this way so they use the same interpreter)."""

from pipeline.cli.main import app

app()
