"""The ``llmpipe`` command line: the root app and the command groups that belong to no one
package (the prompt commands span prompts, evaluation and control; ``trace`` reads every topic).

``pipeline.cli:app`` is the console script's entry point, so the app is re-exported here.
"""

from pipeline.cli.main import app

__all__ = ["app"]
