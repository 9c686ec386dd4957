"""Content hashes that identify a prompt version's behaviour.

The hash is::

    sha256( canonical_json
            + for each referenced local file, sorted by relative path:
                0x00 + relative_path (UTF-8, POSIX separators) + 0x00 + sha256(file bytes) )

``canonical_json`` is the parsed YAML document serialised as JSON with sorted
keys, no whitespace, UTF-8 and no NaN/Infinity. Hashing the parsed document
rather than the file bytes means comments, quoting style, indentation and key
order do not change the hash, so tidying a released file is safe; any change
to a value (including writing ``0`` as ``0.0``, or spelling out a default)
does. The 0x00 separators cannot collide with the JSON, where a NUL character
is always escaped.

Local files named by ``rules.checks`` / ``fallback.rule`` (``rules.py:func``)
are part of the hash because editing them changes what a released version
does just as surely as editing its YAML. Only the referenced file itself is
covered, which is why such files may not import siblings (see
``pipeline.prompts.references``). ``package.module:func`` references are not
hashed: that code ships, is reviewed and is versioned with the pipeline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def canonical_json(document: Any) -> bytes:
    """Raises TypeError/ValueError for values JSON cannot represent (binary, NaN, sets)."""
    text = json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def file_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def content_hash(canonical: bytes, code_files: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256(canonical)
    for relative_path in sorted(code_files):
        digest.update(b"\0" + relative_path.encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(code_files[relative_path]).digest())
    return "sha256:" + digest.hexdigest()
