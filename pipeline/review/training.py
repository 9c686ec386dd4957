"""What reviews teach: corrections as fine-tuning data.

It reads Kafka (the source of truth) rather than the review database, so it works from
any machine that can reach the cluster, and gives the same answer however often the
database was rebuilt. (Verdicts as a calibration check: :mod:`pipeline.review.calibration`.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

from pipeline.config import Settings
from pipeline.contract.envelopes import Correction
from pipeline.contract.topology import CORRECTIONS
from pipeline.prompts.errors import PromptError
from pipeline.prompts.registry import PromptRegistry
from pipeline.prompts.render import render_messages
from pipeline.review.kafka_io import read_to_end


def training_records(
    corrections: Iterable[Correction],
    registry: PromptRegistry,
    since: datetime | None = None,
    on_skip: Callable[[str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """One chat-format record per correction: the prompt as the model saw it, then the
    answer it should have given.

    The messages are re-rendered from the prompt version the request used, so a record
    is skipped (and reported) when that version is not loaded or its content hash
    differs: training on a prompt the model never saw would teach the wrong mapping.
    A request corrected twice (impossible by design, but topics can be replayed)
    contributes its first correction only.
    """
    seen: set[str] = set()
    for correction in corrections:
        if since is not None and correction.decided_at < since:
            continue
        if correction.request_id in seen:
            continue
        seen.add(correction.request_id)
        ref = correction.prompt
        try:
            prompt = registry.get(ref.name, ref.version)
            messages = render_messages(prompt, correction.variables)
        except PromptError as exc:
            if on_skip is not None:
                on_skip(f"{correction.request_id}: {exc}")
            continue
        if prompt.content_hash != ref.hash:
            if on_skip is not None:
                on_skip(
                    f"{correction.request_id}: {ref.ref} here has hash {prompt.content_hash}, "
                    f"the request used {ref.hash}"
                )
            continue
        answer = json.dumps(correction.corrected_output, ensure_ascii=False, separators=(",", ":"))
        yield {
            "messages": [*messages, {"role": "assistant", "content": answer}],
            "metadata": {
                "request_id": correction.request_id,
                "prompt": ref.ref,
                "prompt_hash": ref.hash,
                "reviewer": correction.reviewer,
                "decided_at": correction.decided_at.isoformat(),
                "original_output": correction.original_output,
            },
        }


def read_corrections(
    settings: Settings, on_skip: Callable[[str], None] | None = None
) -> Iterator[Correction]:
    for correction, _ in read_to_end(settings, CORRECTIONS, Correction, on_skip=on_skip):
        yield correction
