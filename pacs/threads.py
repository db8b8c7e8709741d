"""How many CPU threads torch uses: `--threads auto | N`.

torch's CPU kernels run on an OpenMP pool, one thread per physical core by default. Every GEMM and elementwise pass
ends at a barrier where all threads wait for the slowest one, so when another process holds one of the cores, the
thread the scheduler parks there delays every barrier, and a run with one thread per core can become several times
slower than the same run with one thread fewer. `auto` therefore leaves the busy cores out:

    threads = max(1, min(torch's default, usable cores - busy cores))
    usable cores = len(os.sched_getaffinity(0))                (the cores this process may run on)
    busy cores   = round(1-minute load average x usable cores / all cores)

The load average counts runnable processes over the whole machine, so it is scaled to this process's share of the
cores. It describes the last minute, not the future: a job started beside a running one sees it, a job that starts
afterwards does not (set `--threads` or `OMP_NUM_THREADS` then). An explicit `OMP_NUM_THREADS` is the user's
choice and `auto` keeps it (torchrun sets it to 1 when it starts several processes on one machine).
"""

from __future__ import annotations

import os

import torch

_TORCH_DEFAULT = torch.get_num_threads()  # before anyone changed it: OMP_NUM_THREADS, else the physical cores


def parse_threads(text) -> int | None:
    """None for "auto", else the positive thread count; ValueError otherwise."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if isinstance(text, bool) or value < 1 or str(value) != str(text).strip():
        raise ValueError(f"--threads must be auto or an integer >= 1, got {text!r}")
    return value


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def auto_threads() -> tuple[int, str]:
    """(thread count, why) for `--threads auto` (see the module docstring)."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp), f"OMP_NUM_THREADS={omp}"
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return min(_TORCH_DEFAULT, cores), f"{cores} usable cores, load average unknown"
    busy = round(load * cores / max(os.cpu_count() or cores, cores))
    count = max(1, min(_TORCH_DEFAULT, cores - busy))
    return count, f"auto: {cores} usable cores, 1-minute load {load:.2f} -> {busy} busy"


def apply_threads(setting) -> tuple[int, str]:
    """torch.set_num_threads for `--threads` (auto or N); returns (count, why) for the log and config.json."""
    explicit = parse_threads(setting)
    count, why = (explicit, "--threads") if explicit is not None else auto_threads()
    torch.set_num_threads(count)
    return count, why
