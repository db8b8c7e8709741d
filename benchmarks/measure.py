"""Timing, peak memory and error measures of one benchmark call.

Time: the median of `reps` calls after `warmup` discarded calls (CUDA events around each call on GPU, perf_counter
on CPU). Memory: the peak above what was allocated before the call, minus the bytes of the call's own outputs
(log-probs, entropies, gradients): what the implementation needs besides its inputs and outputs.
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before.
- CPU: the process's peak resident set (VmHWM in /proc/self/status, reset by writing 5 to /proc/self/clear_refs)
  minus its resident set before the call. The suite runs each implementation in its own process, so one
  implementation's allocator state never shows in another's number.
Determinism (bitwise_repeat): two more calls on the same inputs; whether their log-probs, dH and dW are bitwise equal.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable

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


def median_time_s(call: Callable[[], tuple], device: str, reps: int) -> list[float]:
    """Seconds of each of `reps` calls (outputs freed between calls)."""
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - t0)
        del out
    return times


def measure(call: Callable[[], tuple], device: str, warmup: int, reps: int) -> dict:
    """Warm-up calls (discarded), one memory-measured call (not timed), then `reps` timed calls."""
    for _ in range(warmup):
        del_out = call()
        del del_out
    synchronize(device)
    extra, out_bytes = peak_extra_bytes(call, device)
    times = median_time_s(call, device, reps)
    return {
        "time_ms": 1e3 * statistics.median(times),
        "time_ms_min": 1e3 * min(times),
        "time_ms_all": [round(1e3 * t, 4) for t in times],
        "peak_extra_mib": extra / MiB,
        "output_mib": out_bytes / MiB,
    }


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
