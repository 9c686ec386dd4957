"""Prompt evaluation: run prompt tests and shadow runs through the real stage code.

It sits above ``stages`` and ``resilience`` so that the prompt core (``pipeline.prompts``)
imports neither.
"""
