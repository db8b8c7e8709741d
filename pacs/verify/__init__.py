"""Math answer verification for RL with verifiable rewards: is a model's final answer equal to the gold answer?

    from pacs.verify import verify, verify_batch, math_reward
    verify("... so the answer is $\\boxed{\\dfrac{1}{2}}$.", "0.5")      # True

The pipeline, one stage per module of this package:

1. extract (``extract.py``): the response's final answer (last ``\\boxed{}``, then a "final answer" phrase, then a
   short answer-like response, then the last math span, then optionally the last number); the gold may be bare
   text (``1/2``, ``x = 3``, ``(A)``, ``[2, 5)``) or a full solution;
2. normalize (``normalize.py``): strip styling, spacing, units and delimiters, record percent and degree marks,
   split into an answer tree (choice, text, expression, list / set / tuple / interval, union, matrix);
3. parse (``parse.py``): expressions become sympy objects through latex2sympy2_extended, under size guards;
4. compare (``compare.py``): structure first, then numbers, (in)equalities and symbolic equality with a
   random-point fallback.

``pipeline.py`` strings the stages together. Stages 1-2 and the comparison of plain numbers, letters and words run
in the calling process (microseconds). Everything that touches sympy runs in a persistent pool of worker processes
(``pool.py``, ``worker.py``): a call that overruns its timeout gets its worker killed and replaced, so the limit
holds from any thread and any process, with no signals. Each worker is a separate interpreter, not a
multiprocessing child, so it never imports the caller's ``__main__``: a script needs no
``if __name__ == "__main__":`` guard. Importing this package imports neither sympy nor torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from . import pool
from .extract import extract_answer
from .pipeline import judge, quick_verdict
from .pool import shutdown

__all__ = ["verify", "verify_batch", "extract_answer", "math_reward", "shutdown", "judge"]

DEFAULT_TIMEOUT = 5.0


def verify(response: str, gold: str | float, *, timeout: float = DEFAULT_TIMEOUT, last_number: bool = True) -> bool:
    """Whether the final answer of ``response`` equals ``gold``. Never raises; False on any failure or timeout.

    ``gold`` may also be an int or float. ``timeout`` bounds the symbolic work on this pair (seconds); plain
    numbers, letters and words are decided in-process without it. ``last_number`` lets the last number of a
    response serve as its answer when nothing better (box, "final answer" phrase, math span) is found.

    >>> verify("... so the answer is $\\\\boxed{\\\\dfrac{1}{2}}$.", "0.5")
    True
    """
    try:
        if isinstance(gold, (int, float)) and not isinstance(gold, bool):
            gold = str(gold)
        verdict = quick_verdict(response, gold, last_number)
        if verdict is not None:
            return verdict
        return pool.run((response, gold, last_number), timeout)
    except Exception:
        return False


def verify_batch(
    pairs: Iterable[tuple[str, str]],
    *,
    workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    last_number: bool = True,
    progress: bool = True,
) -> list[bool]:
    """``verify`` over (response, gold) pairs with ``workers`` worker processes (default: the CPU count)."""
    pairs = list(pairs)
    workers = max(1, min(workers or os.cpu_count() or 1, pool.MAX_POOL_WORKERS))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc="verify", unit="pair")

    def one(pair: tuple[str, str]) -> bool:
        verdict = verify(pair[0], pair[1], timeout=timeout, last_number=last_number)
        if bar is not None:
            bar.update(1)
        return verdict

    try:
        with ThreadPoolExecutor(max_workers=workers) as executor:
            return list(executor.map(one, pairs))
    finally:
        if bar is not None:
            bar.close()


def _completion_text(completion) -> str:
    """Plain text of a completion: a string, or a chat message list / dict as TRL passes them."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, Sequence) and completion:
        return _completion_text(completion[-1])
    return ""


def math_reward(
    completions: Sequence, answers: Sequence[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT, **kwargs
) -> list[float]:
    """Reward 1.0 / 0.0 per completion, in the shape TRL-style trainers expect.

    ``answers`` may also arrive as the dataset column ``answer`` or ``solution`` (TRL passes columns as keywords).
    """
    if answers is None:
        answers = kwargs.get("answer", kwargs.get("solution"))
    if answers is None:
        raise ValueError("math_reward needs the gold answers (answers=, answer= or solution=)")
    pairs = [(_completion_text(c), str(a)) for c, a in zip(completions, answers)]
    return [float(v) for v in verify_batch(pairs, timeout=timeout, progress=False)]
