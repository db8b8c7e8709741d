"""The worker processes of `--isolate impl` (the default on CPU), where each implementation's peak RSS must be its own.

Per group (runner.groups_of), one process per implementation runs its `prepare` (accuracy check, warm-up, one
memory-measured call) and writes its row fields; then one more process times every prepared implementation of the
group interleaved (so that the machine's load falls on all of them alike), appending each round's times as it goes.
A worker is `python -m benchmarks.suite --worker SPEC_FILE` (worker_main); the parent (run_isolated) puts the
fields and times into the group's rows (runner.finish_rows) and appends them to OUT/results.jsonl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path

from .runner import (Runner, Settings, Spec, base_row, configure_environment, error_note, finish_rows, groups_of,
                     row_summary, set_threads)

ROOT = Path(__file__).resolve().parent.parent


def _worker_env() -> dict:
    # A fixed mmap threshold: every block of 128 KiB or more is mapped on allocation and unmapped on free, so the
    # resident set follows the live allocations (glibc's default threshold grows to 32 MiB after the first large
    # free, and freed blocks below it stay resident, hiding later peaks).
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                MALLOC_MMAP_THRESHOLD_="131072")


def _run_worker(phase: str, specs: list[Spec], st: Settings, out: Path, timeout: float | None) -> str | None:
    """Run `python -m benchmarks.suite --worker` for one phase; None, or why it did not finish."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump({"settings": asdict(st), "specs": [asdict(s) for s in specs], "phase": phase, "out": str(out)},
                  handle)
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.suite", "--worker", handle.name], cwd=ROOT,
                            env=_worker_env())
    try:
        code = proc.wait(timeout=timeout)
        return None if code == 0 else f"worker exited with code {code}"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"stopped: its worker had not finished after {timeout:.0f} s (--worker-timeout)"
    except KeyboardInterrupt:
        proc.kill()
        proc.wait()
        raise
    finally:
        os.unlink(handle.name)


def run_isolated(specs: list[Spec], st: Settings, results_path: Path, worker_timeout: float | None = None) -> None:
    """CPU: per group, one process per implementation for its accuracy check and its memory call (so that its
    peak RSS is its own), then one process that times every prepared implementation of the group interleaved (so
    that the machine's load falls on all of them alike). A worker still running after `worker_timeout` seconds is
    killed (the timing worker after `worker_timeout` per implementation it times): an unprepared row is recorded
    as an error, a timing worker's finished rounds are kept (also on KeyboardInterrupt, which is re-raised once the
    group's rows are written)."""
    from .report import append_rows

    groups = groups_of(specs)
    for gi, group in enumerate(groups, 1):
        s0 = group[0]
        print(f"[{gi}/{len(groups)}] {s0.mode} {s0.shape} N={s0.n} {s0.dist} load={s0.load}"
              f"{f' threads={s0.threads}' if s0.threads else ''}: {len(group)} implementations, each prepared in "
              "its own process, then timed interleaved in one", file=sys.stderr, flush=True)
        rows = {s.impl: base_row(s, st) for s in group}
        ready, warm = [], {}
        timing_id = uuid.uuid4().hex[:12]
        times, repeat, loadavg, threads, why = {}, {}, os.getloadavg()[0], None, None
        interrupted = False
        with tempfile.TemporaryDirectory() as tmp:
            timing = Path(tmp) / "timing.jsonl"
            try:
                for i, spec in enumerate(group):
                    out = Path(tmp) / f"prepare_{i}.json"
                    failed = _run_worker("prepare", [spec], st, out, worker_timeout)
                    if out.exists():
                        result = json.loads(out.read_text())
                        rows[spec.impl].update(result["fields"])
                        warm[spec.impl] = result["warmup"]
                        if result["fields"].get("status") == "ok":
                            ready.append(spec)
                    else:
                        rows[spec.impl].update(status="error", note=failed or "its worker wrote nothing")
                if ready:  # the timing worker calls every implementation `reps` times: a prepare's time each
                    why = _run_worker("time", ready, st, timing,
                                      None if worker_timeout is None else worker_timeout * len(ready))
            except KeyboardInterrupt:
                interrupted = True
            records = [json.loads(line) for line in timing.read_text().splitlines()] if timing.exists() else []
        for record in records:
            times = record.get("times", times)
            repeat = record.get("repeat", repeat)
            loadavg = record.get("loadavg_1m", loadavg)
            threads = record.get("threads", threads)
        for spec in group:
            rows[spec.impl]["threads"] = threads
            if why and spec in ready:
                rows[spec.impl]["note"] = "; ".join(filter(None, [rows[spec.impl].get("note"), f"timing {why}"]))
        finish_rows(group, rows, times, repeat, warm, timing_id, loadavg, interrupted)
        append_rows(results_path, list(rows.values()))
        for row in rows.values():
            print(row_summary(row), file=sys.stderr, flush=True)
        if interrupted:
            raise KeyboardInterrupt


def worker_main(spec_file: str) -> None:
    """A worker of run_isolated: phase "prepare" (one spec: accuracy, warm-up, memory) writes {"fields", "warmup"};
    phase "time" (a group) appends {"times", "threads", "loadavg_1m"} after every round and {"repeat"} at the end."""
    from .report import append_rows

    payload = json.loads(Path(spec_file).read_text())
    st = Settings(**payload["settings"])
    configure_environment(st)
    specs = [Spec(**s) for s in payload["specs"]]
    out = Path(payload["out"])
    runner = Runner(st, None)
    threads = set_threads(specs[0].threads)
    if payload["phase"] == "prepare":
        spec = specs[0]
        try:
            fields, _ = runner.prepare(spec)
        except Exception as err:
            fields = {"status": "error", "note": error_note(err)}
        out.write_text(json.dumps({"fields": fields, "warmup": runner.warmup_calls(spec)}))
        return
    calls = {}
    for spec in specs:
        fields, call = runner.prepare(spec, memory=False, accuracy=False)
        if call is not None:
            calls[spec.impl] = call
    loadavg = os.getloadavg()[0]

    def on_round(r, times):
        append_rows(out, [{"round": r, "times": times, "threads": threads, "loadavg_1m": round(loadavg, 2)}])

    _, repeat = runner.time_group(specs, calls, on_round=on_round)
    if repeat:
        append_rows(out, [{"repeat": repeat}])


