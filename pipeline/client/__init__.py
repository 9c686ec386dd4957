"""The typed client for services around the pipeline (``docs/client.md``)."""

from pipeline.client.client import Client, RequestDeadLettered, ResultTimeout
from pipeline.contract.envelopes import Result

__all__ = ["Client", "RequestDeadLettered", "Result", "ResultTimeout"]
