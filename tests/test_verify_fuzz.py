"""Fuzz tests of pacs.verify: random strings never raise and never exceed the time limit."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacs.verify.extract import extract_answer, extract_gold
from pacs.verify.normalize import parse_answer, quick_equal
from pacs.verify import verify

LIMIT = 2.0
SLACK = 1.5

LATEX_PIECES = [
    "\\boxed{", "\\frac{", "\\sqrt{", "}", "{", "^", "_", "(", ")", "[", "]", "\\{", "\\}", ",", "=", "<", "\\le",
    "\\pi", "\\infty", "i", "e", "x", "y", "0", "1", "2", "9", ".", "-", "+", "\\cdot", "\\times", "%", "^\\circ",
    "\\text{cm}", "\\left(", "\\right)", "\\begin{pmatrix}", "\\end{pmatrix}", "&", "\\\\", "$", "\\cup", "!",
    "\\sin", "\\pm", " ", "answer is ", "10^{", ":",
]
latexish = st.lists(st.sampled_from(LATEX_PIECES), max_size=30).map("".join)
anything = st.text(max_size=200)


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response=st.one_of(anything, latexish), gold=st.one_of(anything, latexish))
def test_string_stages_never_raise(response: str, gold: str) -> None:
    """Extraction, normalization and the fast path run in-process on every call, so they must be total."""
    pred = extract_answer(response)
    ref = extract_gold(gold)
    if pred is not None and ref is not None:
        for g in parse_answer(ref):
            for p in parse_answer(pred):
                assert quick_equal(g, p) in (True, False, None)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response=st.one_of(latexish, anything), gold=latexish)
def test_verify_never_raises_nor_overruns(response: str, gold: str) -> None:
    start = time.perf_counter()
    assert verify(response, gold, timeout=LIMIT) in (True, False)
    assert time.perf_counter() - start < LIMIT + SLACK


@settings(max_examples=200, deadline=None)
@given(st.integers(-10**6, 10**6), st.integers(1, 999))
def test_fraction_and_decimal_agree(numerator: int, denominator: int) -> None:
    value = numerator / denominator
    gold = f"\\frac{{{numerator}}}{{{denominator}}}"
    assert verify(f"\\boxed{{{value!r}}}", gold) is True
    assert verify(f"\\boxed{{{numerator + denominator}/{denominator}}}", gold) is False
