"""Stage logic: plain typed Python, envelope in, decision out. No Kafka in here.

Every stage returns a :class:`~pipeline.stages.decisions.Decision`: the transport layer
turns it into produced messages and only then commits the input's offset.
"""
