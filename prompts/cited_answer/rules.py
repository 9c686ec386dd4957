"""Deterministic code for cited_answer: citation checks and an extractive fallback.

Both v1 and v2 reference this file, so it is part of both content hashes:
once either version is released, any edit here fails `llmpipe prompts check`.
That is intended, since this code is how released versions behave. A later
version that needs different rules gets its own file (e.g. ``rules_v3.py``).

The fallback is extractive rather than a fixed "I could not find an answer":
the output schema requires at least one citation, and citing a source for a
non-answer would be a false claim. When no single sentence clearly answers
the question, it returns None and a human reviews the question instead.
"""

from __future__ import annotations

import re
from typing import Any

_WORD = re.compile(r"[a-z0-9]+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Words of three letters or more that carry no topic; shorter words are ignored anyway.
_STOPWORDS = frozenset(
    {
        "about",
        "and",
        "any",
        "are",
        "can",
        "could",
        "did",
        "does",
        "for",
        "from",
        "have",
        "how",
        "into",
        "not",
        "our",
        "that",
        "the",
        "their",
        "there",
        "they",
        "this",
        "was",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
    }
)
_MIN_OVERLAP = 2
_ANSWER_LIMIT = 400


def citations_exist(output: dict[str, Any], variables: dict[str, Any]) -> list[str]:
    """A citation to a source the model was not given is a fabricated citation."""
    known = [str(source["id"]) for source in variables["sources"]]
    return [
        f"citation {cited!r} is not one of the provided source ids ({', '.join(known)})"
        for cited in output.get("citations", [])
        if cited not in known
    ]


def numbers_are_cited(output: dict[str, Any], variables: dict[str, Any]) -> list[str]:
    """Every figure in the answer must appear in a cited source; invented figures do most harm."""
    cited = set(output.get("citations", []))
    cited_text = " ".join(str(s["text"]) for s in variables["sources"] if s["id"] in cited)
    printed = set(_NUMBER.findall(cited_text))
    missing = [n for n in _NUMBER.findall(str(output.get("answer", ""))) if n not in printed]
    if missing:
        return [f"the answer states {', '.join(missing)}, which no cited source contains"]
    return []


def extractive_answer(variables: dict[str, Any]) -> dict[str, Any] | None:
    """The source sentence sharing the most content words with the question, or None."""
    question = _content_words(str(variables["question"]))
    best: tuple[int, str, str] | None = None
    for source in variables["sources"]:
        for sentence in _SENTENCE_END.split(str(source["text"]).strip()):
            overlap = len(question & _content_words(sentence))
            if overlap >= _MIN_OVERLAP and (best is None or overlap > best[0]):
                best = (overlap, sentence, str(source["id"]))
    if best is None:
        return None
    _, sentence, source_id = best
    answer = sentence if len(sentence) <= _ANSWER_LIMIT else sentence[: _ANSWER_LIMIT - 3] + "..."
    return {"answer": answer, "citations": [source_id]}


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS and len(w) > 2}
