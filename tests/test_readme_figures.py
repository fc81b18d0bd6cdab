"""Figures the README states about the shipped form are generated from the code: this test
fails when they drift; `python tests/test_readme_figures.py` rewrites them."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from gateway.coordination.bootstrap import shipped_questionnaire
from gateway.interview.engine import Rules, longest_path_screens
from gateway.interview.segments import interview_cost

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- generated:sms-cost -->)(.*?)(<!-- /generated:sms-cost -->)", re.S)


def sms_cost_text() -> str:
    """What an SMS interview of the shipped form costs at most, per language."""
    form = shipped_questionnaire()
    written, folded = [], []
    for lang in form.languages:
        written.append((lang.name, interview_cost(longest_path_screens(form, lang.key,
                                                                       Rules.sms()))))
        folded.append(interview_cost(longest_path_screens(form, lang.key,
                                                          Rules.sms(fold=True))))
    as_written = " and ".join(f"{n} in {name}" for name, n in written)
    return (f"{as_written} as written, or {' and '.join(map(str, folded))} with the "
            'channel\'s `"fold": true`')


def test_readme_sms_cost_matches_the_code() -> None:
    """The README's segment counts are the ones the code computes."""
    match = BLOCK.search(README.read_text(encoding="utf-8"))
    assert match, "README lost its generated sms-cost block"
    assert match.group(2) == sms_cost_text(), "run: python tests/test_readme_figures.py"


def test_no_stale_hand_written_segment_counts() -> None:
    """No other sentence of the README states a segment count of the shipped form."""
    text = BLOCK.sub("", README.read_text(encoding="utf-8"))
    assert not re.search(r"\b\d+ (?:segments )?in (?:English|Twi)\b", text)
    assert not re.search(r'"as_written": \d', text)


if __name__ == "__main__":
    source = README.read_text(encoding="utf-8")
    README.write_text(BLOCK.sub(lambda m: m.group(1) + sms_cost_text() + m.group(3), source),
                      encoding="utf-8")
    sys.exit(0)
