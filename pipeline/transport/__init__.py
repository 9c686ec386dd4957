"""Kafka wiring: moves envelopes between stages and commits offsets correctly. Thin on purpose."""
