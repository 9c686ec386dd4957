"""Make llama-cpp-python's logprobs cost what the model costs: run by ``make model-server``.

Why: llama-cpp-python 0.3.36 answers ``logprobs`` (which llmpipe's confidence reads) by
log-softmaxing the logits of *every* token in the context, prompt included, and then, for
each generated token, sorting the whole 49,152-entry vocabulary in Python to pick the top
``top_logprobs`` entries, even when that number is 0. Measured here on SmolLM2-135M: about
0.1 s per generated token and 0.3 s per call, 4-8 times the model's own work (a 44-token
invoice answer: 0.6 s of CPU without logprobs, 3.6 s with them). The real-model tests and
``make demo-local`` spent most of their time in that sort.

What changes (the output is the same): the log-softmax runs over the generated tokens'
rows only (it is row-wise, so those rows are identical), and the top entries are chosen
with ``numpy.argpartition`` and sorted among themselves. Applied to the installed file of
the pinned version only (written anew, never in place: uv hard-links installed files to
its cache), idempotently (a marker says it is applied); if the expected code
is not found (another version), it fails loudly instead of serving slowly or wrongly.

Usage: ``.venv-model/bin/python infra/model/patch_logprobs.py`` (the model venv's Python).
"""

from __future__ import annotations

import sys
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

VERSION = "0.3.36"
MARKER = "# llmpipe: logprobs over the generated rows, top-k by argpartition"

ORIGINAL = """\
            all_logprobs = Llama.logits_to_logprobs(self._scores)[token_offset:]
"""
PATCHED = f"""\
            {MARKER}
            all_logprobs = Llama.logits_to_logprobs(self._scores[token_offset:])
"""
ORIGINAL_SORT = """\
                sorted_logprobs = list(
                    sorted(
                        zip(logprobs_token, range(len(logprobs_token))), reverse=True
                    )
                )
                token_logprobs.append(logprobs_token[int(token)])
"""
PATCHED_SORT = """\
                top_k = min(int(logprobs), len(logprobs_token))
                top_ids = (
                    np.argpartition(-logprobs_token, top_k - 1)[:top_k] if top_k else []
                )
                sorted_logprobs = sorted(
                    ((float(logprobs_token[i]), int(i)) for i in top_ids), reverse=True
                )
                token_logprobs.append(logprobs_token[int(token)])
"""


def main() -> int:
    installed = metadata.version("llama-cpp-python")
    spec = find_spec("llama_cpp.llama")
    if spec is None or spec.origin is None:
        print("patch_logprobs: llama_cpp.llama not found", file=sys.stderr)
        return 1
    path = Path(spec.origin)
    source = path.read_text(encoding="utf-8")
    if MARKER in source:
        print(f"patch_logprobs: {path} already patched")
        return 0
    if installed != VERSION:
        print(
            f"patch_logprobs: llama-cpp-python {installed} installed, the patch is for "
            f"{VERSION}: check whether that version still sorts the vocabulary per token, "
            "then update or drop this patch",
            file=sys.stderr,
        )
        return 1
    # The sorting block occurs in the streaming paths too (with a Python list per token);
    # only the non-streaming block that follows the all-rows log-softmax is replaced.
    head, found, tail = source.partition(ORIGINAL)
    if not found or tail.count(ORIGINAL_SORT) < 1:
        print(f"patch_logprobs: expected code not found in {path}", file=sys.stderr)
        return 1
    # A new file, then a rename: uv hard-links installed files to its cache, and writing
    # in place would patch the cache (and every other venv linked to it) as well.
    staged = path.with_name(path.name + ".llmpipe-patch")
    staged.write_text(head + PATCHED + tail.replace(ORIGINAL_SORT, PATCHED_SORT, 1), "utf-8")
    staged.replace(path)
    print(f"patch_logprobs: patched {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
