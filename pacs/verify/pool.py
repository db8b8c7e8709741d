"""The verifier's worker pool: everything that touches sympy runs here, under a time limit that holds.

Each worker is a separate interpreter (``pacs.verify.worker``) started with this interpreter's flags and import path
and talking over its stdin and stdout, not a multiprocessing child, so it never imports the caller's ``__main__``.
A call that overruns its timeout gets its worker killed and replaced, so the limit holds from any thread and any
process, with no signals. Where no worker can start (no interpreter, a sandbox), a daemon thread runs the pipeline
and is abandoned on timeout.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

from .pipeline import judge

WORKER_START_TIMEOUT = 60.0
MAX_POOL_WORKERS = max(8, 2 * (os.cpu_count() or 1))


# Run by the worker interpreter before anything else: take the parent's import path, then serve. Only the builtin
# ``sys`` is imported before the path is set, so nothing of the caller's (its ``__main__`` included) is imported.
_BOOTSTRAP = "import sys; sys.path[:] = sys.argv[1:]; from pacs.verify.worker import main; main()"


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
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if package_root not in paths:  # pacs imported by some other means (a meta-path hook): import this copy
        paths.append(package_root)
    return [sys.executable, *flags, "-c", _BOOTSTRAP, *paths]


class Worker:
    """One worker interpreter (``pacs.verify.worker``) and the two pipes to its stdin and from its stdout."""

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


class Pool:
    """Worker processes reused across calls, at most ``max_workers`` of them (busy, idle or starting).

    A caller takes an idle worker; when there is none it starts one in the background (if under the limit) and
    takes whichever worker is free first, its own or one given back by another caller, so a burst of callers is
    served by the warm workers while new ones start. Waiting for a worker does not count against ``timeout``.
    """

    def __init__(self, max_workers: int) -> None:
        self._max_workers = max_workers
        self._idle: list[Worker] = []
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

    def _take(self) -> Worker:
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
            worker = Worker()
        except Exception:
            with self._changed:
                if self._pid == os.getpid():
                    self._count -= 1
                failed.append(True)
                self._changed.notify_all()
            return
        self._give_back(worker)

    def _give_back(self, worker: Worker) -> None:
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


POOL = Pool(MAX_POOL_WORKERS)
atexit.register(POOL.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=POOL._after_fork_in_child)


def shutdown() -> None:
    """Stop the idle worker processes (new ones start on the next call that needs them)."""
    POOL.close()


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


def run(request: tuple, timeout: float) -> bool:
    """The verdict of ``judge(*request)`` within ``timeout`` seconds (False when it overruns), in a worker
    process, or in a thread where no worker process can start."""
    try:
        result = POOL.run(request, timeout)
    except (RuntimeError, OSError, subprocess.SubprocessError):  # cannot start a worker here
        return _in_thread(request, timeout)
    return bool(result)
