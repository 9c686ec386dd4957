"""``ascii_int``: the one reading of whole numbers from untrusted text."""

from __future__ import annotations

import re

from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.digits import MAX_DIGITS, ascii_int


@given(st.text(max_size=25) | st.from_regex(r"[0-9]{1,25}", fullmatch=True))
@example("¹")
@example("²³")
@example("٣")
@example("①")
@example("1" * MAX_DIGITS)
@example("1" * (MAX_DIGITS + 1))
@example("+1")
@example(" 1")
@example("")
def test_a_number_only_from_one_to_max_digits_ascii_digits_and_never_an_error(text: str) -> None:
    expected = int(text) if re.fullmatch(rf"[0-9]{{1,{MAX_DIGITS}}}", text) else None
    assert ascii_int(text) == expected


def test_none_reads_as_none_and_the_bound_is_the_callers() -> None:
    assert ascii_int(None) is None
    assert ascii_int("12345", max_digits=4) is None
    assert ascii_int("1234", max_digits=4) == 1234
