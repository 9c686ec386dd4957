"""The ``llmpipe`` command line: the root app (:mod:`~pipeline.cli.main`, the console
script's entry point), the command groups that belong to no one package (the prompt
commands span prompts, evaluation and control; ``trace`` reads every topic) and the console
helpers every command group uses (:mod:`~pipeline.cli.console`).

Nothing is imported here: command modules of other packages import the console helpers,
and the root app imports those modules.
"""
