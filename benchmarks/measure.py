"""Timing, peak memory and error measures of one benchmark call.

Time: the median of the timed calls after discarded warm-up calls (CUDA events around each call on GPU,
perf_counter on CPU). Memory: the peak above what was allocated before the call, minus the bytes of the call's own
outputs (log-probs, entropies, gradients): what the implementation needs besides its inputs and outputs.
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before.
- CPU: the process's peak resident set (VmHWM in /proc/self/status, reset by writing 5 to /proc/self/clear_refs)
  minus its resident set before the call. The suite runs each implementation in its own process, so one
  implementation's allocator state never shows in another's number.
Determinism (bitwise_repeat): two more calls on the same inputs; whether their log-probs, dH and dW are bitwise equal.

Ratios on a shared machine (`interleaved_times`, `ratio_stats`): the implementations of one row are timed in rounds,
one call of each per round, the order reversed every other round (A B C, C B A, A B C, ...), so that a burst of
load from another process falls on neighbouring calls of every implementation alike, and no implementation always
runs first or last. A ratio between two implementations is the median of the per-round ratios (round i of A over
round i of B), reported with its minimum and maximum: a ratio of medians taken minutes apart, or from one call
each, moves with the machine's load, not with the code (measured: 0.86x then 4.11x naive for the same code).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence

import torch

MiB = 1 << 20


def tensor_bytes(tensors: Iterable) -> int:
    """Total bytes of the tensors among `tensors` (None and non-tensors ignored)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return _proc_status_kib("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set since the last reset_peak_rss() (or since the process started)."""
    return _proc_status_kib("VmHWM") * 1024


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_extra_bytes(call: Callable[[], tuple], device: str) -> tuple[int, int]:
    """(peak bytes above the pre-call allocation, minus the outputs' bytes; the outputs' bytes) of one call."""
    gc.collect()
    synchronize(device)
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = call()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated()
    else:
        base = rss_bytes()
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); run on Linux >= 4.0")
        out = call()
        peak = peak_rss_bytes()
    out_bytes = tensor_bytes(out)
    del out
    return max(0, peak - base - out_bytes), out_bytes


def time_call(call: Callable[[], tuple], device: str) -> float:
    """Seconds of one call (CUDA events around it on GPU, perf_counter on CPU); its outputs are freed."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = call()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        out = call()
        seconds = time.perf_counter() - t0
    del out
    return seconds


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """The call order of one round: `names` in even rounds, reversed in odd ones (A B, B A, A B, ...)."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def interleaved_times(calls: dict[str, Callable[[], tuple]], device: str, rounds: int, *,
                      timer: Callable[[Callable[[], tuple]], float] | None = None,
                      max_seconds: float = math.inf, slow_factor: float = math.inf, deadline: float = math.inf,
                      on_round: Callable[[int, dict[str, list[float]]], None] | None = None,
                      now: Callable[[], float] = time.time) -> dict[str, list[float]]:
    """Seconds of each call of each implementation, timed in `rounds` interleaved rounds (see the module docstring).

    times[name][i] is the call of round i, so that round i of two implementations pairs up (ratio_stats). Every
    implementation gets at least one call. Afterwards:
    - an implementation whose first call took more than `slow_factor` times the median first call of the round
      gets no more rounds (a baseline 20x slower than the rest is timed once, not `rounds` times: relative, so a
      loaded machine that slows every call alike changes nothing), nor does one whose timed seconds plus its last
      call would pass `max_seconds`; its list is then shorter, never gapped;
    - no round starts after `deadline` (`now()` seconds, time.time() by default).
    `timer(call)` times one call (default: time_call on `device`); `on_round(i, times)` sees the times after each
    round (the caller streams them, so an interrupted run keeps its finished rounds).
    """
    timer = timer or (lambda call: time_call(call, device))
    times: dict[str, list[float]] = {name: [] for name in calls}
    active = list(calls)
    for r in range(max(1, rounds)):
        if r > 0 and (not active or now() > deadline):
            break
        for name in round_order(active, r):
            times[name].append(timer(calls[name]))
        if on_round is not None:
            on_round(r, times)
        if r == 0 and math.isfinite(slow_factor):
            typical = statistics.median(times[name][0] for name in active)
            active = [name for name in active if times[name][0] <= slow_factor * typical]
        active = [name for name in active if sum(times[name]) + times[name][-1] <= max_seconds]
    return times


def ratio_stats(times_a: Sequence[float], times_b: Sequence[float]) -> dict | None:
    """Per-round ratios a_i / b_i of two interleaved series (pairs up to the shorter one): {"median", "min", "max",
    "q1", "q3", "pairs"}; None without a pair. The quartiles are the medians of the lower and upper halves."""
    ratios = sorted(a / b for a, b in zip(times_a, times_b) if b > 0)
    if not ratios:
        return None
    half = len(ratios) // 2
    lower, upper = ratios[:max(1, half)], ratios[len(ratios) - max(1, half):]
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1],
            "q1": statistics.median(lower), "q3": statistics.median(upper), "pairs": len(ratios)}


def timing_summary(times: Sequence[float]) -> dict:
    """time_ms (median), time_ms_min and time_ms_all of a series of seconds."""
    return {"time_ms": 1e3 * statistics.median(times), "time_ms_min": 1e3 * min(times),
            "time_ms_all": [round(1e3 * t, 4) for t in times]}


def bitwise_repeat(call: Callable[[], tuple]) -> dict:
    """Run `call` twice; {"bitwise_repeat": dH and dW (and the log-probs) of both calls bitwise equal, "repeat_equal":
    per output, "repeat_max_diff": the largest difference where they differ}."""
    first = call()
    second = call()
    equal, diff = {}, 0.0
    for name, a, b in zip(("logprob", "entropy", "dh", "dw"), first, second):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            equal[name] = bool(torch.equal(a, b))
            if not equal[name]:
                diff = max(diff, (a.detach().double() - b.detach().double()).abs().max().item())
    del first, second
    return {"bitwise_repeat": all(equal.values()), "repeat_equal": equal, "repeat_max_diff": diff}


def max_abs_err(x: torch.Tensor | None, ref: torch.Tensor | None) -> float | None:
    """max |x - ref| (absolute; for log-probs and entropies, in nats)."""
    if x is None or ref is None:
        return None
    return (x.detach().double() - ref.double()).abs().max().item()


def max_rel_err(x: torch.Tensor | None, ref: torch.Tensor | None) -> float | None:
    """max |x - ref| / max |ref| (for gradients, whose scale depends on the problem)."""
    if x is None or ref is None:
        return None
    scale = ref.double().abs().max().clamp_min(1e-300)
    return ((x.detach().double() - ref.double()).abs().max() / scale).item()
