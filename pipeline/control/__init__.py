"""Live control of the fleet: kill switches, flags and prompt pins on the compacted
``llm.control`` topic; the plain state every worker folds, the topic reader/writer, the
listener that keeps a worker's state current, and the ``llmpipe flags`` commands."""
