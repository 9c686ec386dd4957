"""Dead-letter operations: inspect, explain, replay and re-parse dead letters safely.

``llm.dlq`` keeps each refused message byte for byte with provenance headers
(:func:`pipeline.transport.headers.dead_letter_headers`), which is what makes a dead letter
replayable by construction: the original topic, partition and offset say where it came
from, the key, value and headers are what the stage saw, and the replay count travels
with the message. This package turns that into operator commands (``llmpipe dlq``):

* :mod:`~pipeline.dlq.stats` and ``inspect``: what failed, why, since when;
* :mod:`~pipeline.dlq.replay`: send a filtered slice back once its cause is fixed;
* :mod:`~pipeline.dlq.reparse`: apply today's parsing rules to answers already paid for;
* :mod:`~pipeline.dlq.engine`: the resumable, never-twice produce loop both rely on.
"""
