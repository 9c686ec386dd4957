"""``python -m pipeline.dlq``: the ``llmpipe dlq`` commands without the main CLI."""

from pipeline.dlq.cli import main

main()
