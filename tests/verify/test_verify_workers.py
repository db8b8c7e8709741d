"""Tests of the verifier's worker processes: they never import the caller's ``__main__``, and timeouts kill them.

The scripts below have no ``if __name__ == "__main__":`` guard on purpose: a worker that imported the caller's main
module would re-run its top level (the marker line would print again, or the calls would hang).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pacs.verify import pool as pool_module
from pacs.verify import verify

ROOT = Path(__file__).resolve().parents[2]
MARKER = "pacs-unguarded-top-level-marker"
RUN_LIMIT = 60  # seconds for a whole script run (the issue: a run that never finished in 15 minutes)

# Pairs that the in-process fast path cannot decide, so they go to a worker (the script asserts this).
PAIRS = [
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{(x+1)^2}", "x^2+1", False),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True),
    ("\\boxed{\\frac{x}{2}}", "x/3", False),
]

UNGUARDED = textwrap.dedent(
    f"""\
    import threading

    from pacs.verify import verify
    from pacs.verify.pipeline import quick_verdict

    print({MARKER!r}, flush=True)
    PAIRS = {PAIRS!r}
    assert all(quick_verdict(r, g, True) is None for r, g, _ in PAIRS)  # all of them need a worker
    serial = [verify(r, g) for r, g, _ in PAIRS]
    threaded = [None] * (4 * len(PAIRS))

    def run(k):
        for j, (r, g, _) in enumerate(PAIRS):
            threaded[k * len(PAIRS) + j] = verify(r, g)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print("serial", serial, flush=True)
    print("threaded", threaded, flush=True)
    print("boxed half", verify("\\\\boxed{{\\\\frac{{2}}{{4}}}}", "0.5"), flush=True)
    from pacs.verify.pool import POOL
    print("pooled", len(POOL._idle) > 0, flush=True)
    """
)


def _check_run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    """Run a caller in its own interpreter: it finishes in time, its top level runs once, its verdicts are right."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_LIMIT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines.count(MARKER) == 1, result.stdout
    expected = [e for _, _, e in PAIRS]
    assert f"serial {expected!r}" in lines, result.stdout
    assert f"threaded {(expected * 4)!r}" in lines, result.stdout
    assert "boxed half True" in lines, result.stdout
    assert "pooled True" in lines, result.stdout  # worker processes did the work, not the in-thread fallback


@pytest.mark.slow
def test_unguarded_script(tmp_path: Path) -> None:
    script = tmp_path / "score.py"
    script.write_text(UNGUARDED)
    _check_run([sys.executable, str(script)], cwd=tmp_path)


@pytest.mark.slow
def test_unguarded_python_c(tmp_path: Path) -> None:
    _check_run([sys.executable, "-c", UNGUARDED], cwd=tmp_path)


@pytest.mark.slow
def test_unguarded_script_run_by_runpy(tmp_path: Path) -> None:
    script = tmp_path / "score.py"
    script.write_text(UNGUARDED)
    runner = tmp_path / "runner.py"
    runner.write_text(f"import runpy\nrunpy.run_path({str(script)!r}, run_name='__main__')\n")
    _check_run([sys.executable, str(runner)], cwd=tmp_path)
    runner.write_text("import runpy\nrunpy.run_module('score', run_name='__main__')\n")
    _check_run([sys.executable, str(runner)], cwd=tmp_path)


@pytest.mark.slow
def test_pacs_importable_only_through_the_callers_path(tmp_path: Path) -> None:
    """A caller run with -S that finds pacs (and sympy) only through the sys.path it builds: its workers do too."""
    paths = [p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() != ROOT]
    script = tmp_path / "score.py"
    script.write_text(f"import sys\nsys.path[:0] = {[str(ROOT)] + paths!r}\n" + UNGUARDED)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check = subprocess.run([sys.executable, "-S", "-c", "import pacs"], cwd=tmp_path, env=env, capture_output=True)
    assert check.returncode != 0  # without the script's own sys.path, -S hides the installed pacs
    _check_run([sys.executable, "-S", str(script)], cwd=tmp_path, env=env)


SLOW = "\\boxed{\\sum_{n=1}^{10^{12}} n^{n}}"  # passes the size guards, then runs far past any timeout


@pytest.fixture
def one_worker_pool(monkeypatch: pytest.MonkeyPatch):
    pool = pool_module.Pool(1)
    monkeypatch.setattr(pool_module, "POOL", pool)
    yield pool
    pool.close()


@pytest.mark.slow
def test_timeout_kills_the_worker_from_a_thread(one_worker_pool) -> None:
    """A pair that overruns its timeout, sent from a non-main thread: False in time, and that worker is killed."""
    assert verify("\\boxed{(x+1)^2}", "x^2+2x+1") is True  # the pool's one worker, warm
    with one_worker_pool._lock:
        (worker,) = one_worker_pool._idle
    result: list = []

    def run() -> None:
        start = time.perf_counter()
        result.append(verify(SLOW, "1", timeout=0.5))
        result.append(time.perf_counter() - start)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert result[0] is False
    assert result[1] < 0.5 + 1.5
    with pytest.raises(ProcessLookupError):
        os.kill(worker.pid, 0)  # killed and reaped
    with one_worker_pool._lock:
        assert worker not in one_worker_pool._idle and one_worker_pool._count == 0
    assert verify("\\boxed{\\sqrt{8}}", "2\\sqrt{2}") is True  # a fresh worker replaces it
