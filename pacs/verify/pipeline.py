"""The verifier's pipeline in the calling process: extract -> normalize -> (quick verdict | compare).

`quick_verdict` decides plain numbers, letters and words without sympy (microseconds); `judge` runs the whole
pipeline, sympy included, without a time limit (the worker processes of `pool.py` call it under one).
"""

from __future__ import annotations

from .extract import extract_answer, extract_choice, extract_gold
from .normalize import Choice, parse_answer, quick_equal


def judge(response: str, gold: str, last_number: bool = True) -> bool:
    """The whole pipeline in the current process, without a time limit. Prefer ``pacs.verify.verify``."""
    from .compare import trees_equal

    golds, preds = answer_trees(response, gold, last_number)
    return bool(golds and preds) and trees_equal(golds, preds)


def answer_trees(response: str, gold: str, last_number: bool) -> tuple[list, list]:
    """(gold trees, predicted trees) of one pair; both empty when either side has no answer."""
    gold_answer = extract_gold(gold)
    pred_answer = extract_answer(response, last_number=last_number)
    if gold_answer is None:
        return [], []
    golds = parse_answer(gold_answer)
    preds = parse_answer(pred_answer) if pred_answer is not None else []
    if any(isinstance(g, Choice) for g in golds) and not any(isinstance(p, Choice) for p in preds):
        letter = extract_choice(response)  # a letter gold: find the letter the response picks
        if letter is not None:
            preds = [Choice(letter)]
    return (golds, preds) if preds else ([], [])


def quick_verdict(response: str, gold: str, last_number: bool) -> bool | None:
    """The verdict when the string/number fast path decides it, None when sympy is needed."""
    golds, preds = answer_trees(response, gold, last_number)
    if not golds or not preds:
        return False
    verdicts = [quick_equal(g, p) for g in golds for p in preds]
    if any(v is True for v in verdicts):
        return True
    return False if all(v is False for v in verdicts) else None
