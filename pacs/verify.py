"""Math answer verification for RL with verifiable rewards: is a model's final answer equal to the gold answer?

Pipeline, one stage per module:

1. extract (``pacs._verify_extract``): the response's final answer (last ``\\boxed{}``, then a "final answer"
   phrase, then a short answer-like response, then the last math span, then optionally the last number); the gold
   may be bare text (``1/2``, ``x = 3``, ``(A)``, ``[2, 5)``) or a full solution;
2. normalize (``pacs._verify_normalize``): strip styling, spacing, units and delimiters, record percent and
   degree marks, split into an answer tree (choice, text, expression, list / set / tuple / interval, union, matrix);
3. parse (``pacs._verify_compare``): expressions become sympy objects through latex2sympy2_extended;
4. compare: structure first, then numbers, (in)equalities and symbolic equality with a random-point fallback.

Stages 1-2 and the comparison of plain numbers, letters and words run in the calling process (microseconds).
Everything that touches sympy runs in a persistent pool of worker processes: a call that overruns its timeout
gets its worker killed and replaced, so the limit holds from any thread and any process, with no signals.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

from pacs._verify_extract import extract_answer, extract_choice, extract_gold
from pacs._verify_normalize import Choice, parse_answer, quick_equal

__all__ = ["verify", "verify_batch", "extract_answer", "math_reward", "shutdown"]

DEFAULT_TIMEOUT = 5.0
WORKER_START_TIMEOUT = 60.0
MAX_POOL_WORKERS = max(8, 2 * (os.cpu_count() or 1))


def judge(response: str, gold: str, last_number: bool = True) -> bool:
    """The whole pipeline in the current process, without a time limit. Prefer ``verify``."""
    from pacs._verify_compare import trees_equal

    golds, preds = _trees(response, gold, last_number)
    return bool(golds and preds) and trees_equal(golds, preds)


def _trees(response: str, gold: str, last_number: bool) -> tuple[list, list]:
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


def _quick_verdict(response: str, gold: str, last_number: bool) -> bool | None:
    """The verdict when the string/number fast path decides it, None when sympy is needed."""
    golds, preds = _trees(response, gold, last_number)
    if not golds or not preds:
        return False
    verdicts = [quick_equal(g, p) for g in golds for p in preds]
    if any(v is True for v in verdicts):
        return True
    return False if all(v is False for v in verdicts) else None


def _worker_main(conn: Connection) -> None:
    """Worker process loop: answer (response, gold, last_number) requests with a bool until the pipe closes."""
    import pacs._verify_compare  # noqa: F401  (import sympy before reporting ready)

    conn.send("ready")
    while True:
        try:
            response, gold, last_number = conn.recv()
        except (EOFError, OSError):
            return
        try:
            verdict = judge(response, gold, last_number)
        except Exception:  # the contract is a bool for any input
            verdict = False
        conn.send(verdict)


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["pacs._verify_compare"])
        return ctx
    return multiprocessing.get_context("spawn")


class _Worker:
    def __init__(self, ctx: multiprocessing.context.BaseContext) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="pacs-verify")
        self.process.start()
        child.close()
        if not self.conn.poll(WORKER_START_TIMEOUT) or self.conn.recv() != "ready":
            self.kill()
            raise RuntimeError("verifier worker did not start")

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class _Pool:
    """Worker processes reused across calls; at most ``max_workers`` at once, extra callers wait for one."""

    def __init__(self, max_workers: int) -> None:
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_workers)
        self._ctx: multiprocessing.context.BaseContext | None = None
        self._pid = os.getpid()

    def run(self, request: tuple, timeout: float) -> bool | None:
        """The worker's verdict, or None when it overran ``timeout`` (the worker is then killed)."""
        with self._slots:
            worker = self._take()
            try:
                worker.conn.send(request)
                if worker.conn.poll(timeout):
                    verdict = worker.conn.recv()
                    self._give_back(worker)
                    return bool(verdict)
            except (EOFError, OSError):
                pass
            worker.kill()
            return None

    def _take(self) -> _Worker:
        with self._lock:
            if self._pid != os.getpid():  # a forked copy of this process: the workers belong to the parent
                self._idle, self._ctx, self._pid = [], None, os.getpid()
            if self._idle:
                return self._idle.pop()
            if self._ctx is None:
                self._ctx = _context()
            ctx = self._ctx
        return _Worker(ctx)

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            self._idle.append(worker)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()


_POOL = _Pool(MAX_POOL_WORKERS)
atexit.register(_POOL.close)


def shutdown() -> None:
    """Stop the idle worker processes (new ones start on the next call that needs them)."""
    _POOL.close()


def _in_thread(request: tuple, timeout: float) -> bool:
    """Fallback where no child process can start (e.g. inside a daemonic process): a daemon thread, abandoned on timeout."""
    result: list[bool] = []

    def target() -> None:
        try:
            result.append(judge(*request))
        except Exception:
            result.append(False)

    thread = threading.Thread(target=target, daemon=True, name="pacs-verify")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


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
        verdict = _quick_verdict(response, gold, last_number)
        if verdict is not None:
            return verdict
        request = (response, gold, last_number)
        try:
            result = _POOL.run(request, timeout)
        except (RuntimeError, OSError, AssertionError):  # cannot start processes here
            return _in_thread(request, timeout)
        return bool(result)
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
    workers = max(1, min(workers or os.cpu_count() or 1, MAX_POOL_WORKERS))
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
