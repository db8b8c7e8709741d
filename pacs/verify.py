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
gets its worker killed and replaced, so the limit holds from any thread and any process, with no signals. Each
worker is a separate interpreter (``pacs._verify_worker``) talking over its stdin and stdout, not a multiprocessing
child, so it never imports the caller's ``__main__``: a script needs no ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
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


# Run by the worker interpreter before anything else: take the parent's import path, then serve. Only the builtin
# ``sys`` is imported before the path is set, so nothing of the caller's (its ``__main__`` included) is imported.
_BOOTSTRAP = "import sys; sys.path[:] = sys.argv[1:]; from pacs._verify_worker import main; main()"


def _command() -> list[str]:
    """The worker's command line: this interpreter, its flags (-S, -E, -I, ...), and this process's ``sys.path``."""
    if not sys.executable or getattr(sys, "frozen", False):  # a frozen app would run itself, not Python
        raise RuntimeError("no Python interpreter to start verifier workers with")
    try:
        flags = subprocess._args_from_interpreter_flags()  # what multiprocessing's spawn passes as well
    except Exception:
        flags = []
    try:
        cwd = os.getcwd()
    except OSError:  # a deleted working directory: relative entries stay relative
        cwd = ""
    paths = [os.path.join(cwd, p) if cwd and not os.path.isabs(p) else p for p in sys.path if isinstance(p, str)]
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if package_root not in paths:  # pacs imported by some other means (a meta-path hook): import this copy
        paths.append(package_root)
    return [sys.executable, *flags, "-c", _BOOTSTRAP, *paths]


class _Worker:
    """One worker interpreter (``pacs._verify_worker``) and the two pipes to its stdin and from its stdout."""

    def __init__(self) -> None:
        command = _command()
        to_child, self._to_worker = os.pipe()
        self._from_worker, from_child = os.pipe()
        try:
            self.process = subprocess.Popen(
                command, stdin=to_child, stdout=from_child, stderr=subprocess.DEVNULL, close_fds=True
            )
        except BaseException:
            os.close(self._to_worker)
            os.close(self._from_worker)
            raise
        finally:
            os.close(to_child)
            os.close(from_child)
        self.pid = self.process.pid
        self.requests = Connection(self._to_worker, readable=False)
        self.replies = Connection(self._from_worker, writable=False)
        try:
            ready = self.replies.poll(WORKER_START_TIMEOUT) and self.replies.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError("verifier worker did not start")

    def alive(self) -> bool:
        return self.process.poll() is None

    def ask(self, request: tuple, timeout: float) -> bool | None:
        """The worker's verdict, or None when it has not answered within ``timeout`` seconds or has died."""
        try:
            self.requests.send(request)
            if self.replies.poll(timeout):
                return bool(self.replies.recv())
        except (EOFError, OSError):
            pass
        return None

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.requests.close()
        self.replies.close()


class _Pool:
    """Worker processes reused across calls, at most ``max_workers`` of them (busy, idle or starting).

    A caller takes an idle worker; when there is none it starts one in the background (if under the limit) and
    takes whichever worker is free first, its own or one given back by another caller, so a burst of callers is
    served by the warm workers while new ones start. Waiting for a worker does not count against ``timeout``.
    """

    def __init__(self, max_workers: int) -> None:
        self._max_workers = max_workers
        self._idle: list[_Worker] = []
        self._count = 0  # workers alive or starting
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pid = os.getpid()

    def run(self, request: tuple, timeout: float) -> bool | None:
        """The worker's verdict, or None when it overran ``timeout`` (the worker is then killed)."""
        worker = self._take()
        verdict = worker.ask(request, timeout)
        if verdict is None:
            worker.kill()
            with self._changed:
                if self._pid == os.getpid():
                    self._count -= 1
                    self._changed.notify_all()
        else:
            self._give_back(worker)
        return verdict

    def _forget_if_forked(self) -> None:
        """In a forked copy of this process the workers belong to the parent: drop them (the caller holds the lock)."""
        if self._pid != os.getpid():
            for worker in self._idle:
                worker.requests.close()  # this copy's ends of the pipes only
                worker.replies.close()
            self._idle, self._count, self._pid = [], 0, os.getpid()

    def _after_fork_in_child(self) -> None:
        """A fork taken while another thread held the lock would leave it held forever: a new lock, no workers."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._forget_if_forked()

    def _take(self) -> _Worker:
        """An idle worker, waiting for one; RuntimeError when none is idle and the one this call started failed."""
        failed: list[bool] = []
        started = False
        with self._changed:
            self._forget_if_forked()
            while True:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.alive():
                        return worker
                    worker.kill()  # died while idle (killed from outside): reap it, use another
                    self._count -= 1
                if failed:
                    raise RuntimeError("verifier worker did not start")
                if not started and self._count < self._max_workers:
                    starter = threading.Thread(target=self._start, args=(failed,), daemon=True, name="pacs-verify")
                    starter.start()  # RuntimeError when no thread can start (interpreter shutdown)
                    self._count += 1
                    started = True
                self._changed.wait()

    def _start(self, failed: list[bool]) -> None:
        try:
            worker = _Worker()
        except Exception:
            with self._changed:
                if self._pid == os.getpid():
                    self._count -= 1
                failed.append(True)
                self._changed.notify_all()
            return
        self._give_back(worker)

    def _give_back(self, worker: _Worker) -> None:
        with self._changed:
            if self._pid == os.getpid():
                self._idle.append(worker)
                self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._forget_if_forked()
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for worker in idle:
            worker.kill()


_POOL = _Pool(MAX_POOL_WORKERS)
atexit.register(_POOL.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL._after_fork_in_child)


def shutdown() -> None:
    """Stop the idle worker processes (new ones start on the next call that needs them)."""
    _POOL.close()


def _in_thread(request: tuple, timeout: float) -> bool:
    """Fallback where no worker process can start (no interpreter, a sandbox): a daemon thread, abandoned on timeout."""
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
        except (RuntimeError, OSError, subprocess.SubprocessError):  # cannot start a worker here
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
