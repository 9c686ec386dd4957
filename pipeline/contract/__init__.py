"""The message contract: envelopes (mirroring ``schemas/*.avsc``) and the codec.

The lowest layer: it imports nothing else from ``pipeline`` except ``config``.
"""
