"""The runner: one group of rows (the implementations of one problem, mode, load and threads) at a time.

A group is measured in two phases: `prepare`, per implementation (the float64 accuracy check on `acc_tokens` tokens,
warm-up, one memory-measured call), then `time_group`: every prepared implementation timed together in `reps`
interleaved rounds, one call of each per round, the order reversed every other round (measure.interleaved_times),
then the bitwise repeat check. `--load busy` runs the timing with one busy CPU-bound process beside it (a shared
machine, busy_process), a row's `threads` sets torch's threads for its group, `deadline` (the suite's
--time-budget) stops new rows and timing rounds.

Runner does both phases in this process (the suite's `--isolate none`, the default on CUDA, where the caching
allocator's peak statistics give each call's memory); workers.run_isolated runs them in worker processes (CPU).
A group's rows are appended to OUT/results.jsonl when it is done, or interrupted (they keep the rounds timed).
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .problems import MODES, PACS_GROUP, Problem, make_problem, pacs_from_logprob, problem_stats, reference_outputs


@dataclass
class Settings:
    """Everything a worker needs to run rows the same way the parent would."""

    device: str
    dtype: str
    warmup: int
    reps: int
    acc_tokens: int
    seed: int = 0
    deadline: float = math.inf  # time.time() after which no new row starts
    interpret: bool = False  # CPU with TRITON_INTERPRET=1 (dry runs of the Triton path)
    preset: str = "custom"
    determinism: str = "none"  # "ours" | "all" | "none": whose gradient rows are run twice and compared bitwise
    max_row_seconds: float = math.inf  # an implementation gets no more timed rounds once its calls took this long
    slow_factor: float = math.inf  # ... nor one whose first call took this many times the row's median first call


@dataclass
class Spec:
    """One row to measure."""

    impl: str
    mode: str
    shape: str
    n: int
    d: int
    v: int
    extra: dict = field(default_factory=dict)
    dist: str = "random"  # the logit distribution of the problem (DISTS)
    load: str = "idle"  # "busy": timed with one CPU-bound process beside it (LOADS, busy_process)
    threads: int = 0  # torch's intra-op threads for the row (0: as the process has them)


def configure_environment(st: Settings) -> None:
    """Set TRITON_INTERPRET before pacs_kernels' Triton modules are imported, when asked to interpret on CPU."""
    if st.device == "cpu" and st.interpret:
        os.environ["TRITON_INTERPRET"] = "1"


def device_name(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' or the CPU's model name with its core count (pacs.runinfo, as `pacs train` records)."""
    import torch

    from pacs import runinfo

    return runinfo.device_name(torch.device(device))


# ------------------------------------------------------------------------------------------------ the calls


def make_call(fn, mode, prob: Problem):
    """A zero-argument callable running `fn` in `mode` on `prob`; returns (logprob, entropy, dH, dW)."""
    import torch

    h, w, y = prob.hidden, prob.weight, prob.targets

    if not mode.grad:
        def call():
            with torch.no_grad():
                lp, ent = fn(h, w, y, mode.entropy)
            return lp, ent, None, None
        return call

    fused_pacs = False
    if mode.pacs and hasattr(fn, "pacs_backend"):
        import inspect

        from pacs_kernels import pacs_loss

        # pacs_loss with the same options where it takes them; it takes no forward_impl or memory_budget, so the
        # rows that set one (ours_sliced, ours_fused, NAME@BUDGET) run our log-prob, then pacs_loss_from_logprobs
        fused_pacs = set(getattr(fn, "pacs_kwargs", {})) <= set(inspect.signature(pacs_loss).parameters)

    def call():
        old = prob.old_logprob
        if mode.on_policy and not (fused_pacs and not getattr(fn, "pacs_two_pass", False)):
            with torch.no_grad():  # on-policy without a one-pass path: the old-log-prob pass first
                old = fn(h, w, y, False)[0].float()
        if fused_pacs:
            from pacs_kernels import pacs_loss

            if mode.on_policy and not fn.pacs_two_pass:
                old = None  # the one-pass path
            out = pacs_loss(h, w, y, old, prob.rewards, prob.cu_seqlens, group_size=PACS_GROUP,
                            backend=fn.pacs_backend, **getattr(fn, "pacs_kwargs", {}))
            loss, lp, ent = out.loss, out.logprob, None
        elif mode.pacs:
            lp, ent = fn(h, w, y, False)
            loss = pacs_from_logprob(lp, prob, old=old).loss
        else:
            lp, ent = fn(h, w, y, mode.entropy, kept=prob.kept) if prob.kept is not None else fn(h, w, y, mode.entropy)
            loss = (lp * prob.grad_lp).sum()
            if mode.entropy:
                loss = loss + (ent * prob.grad_ent).sum()
        dh, dw = torch.autograd.grad(loss, (h, w))
        return lp.detach(), None if ent is None else ent.detach(), dh, dw

    return call


def gemm_call(mode, prob: Problem):
    """The matrix products of the op and nothing else (cuBLAS / the CPU BLAS), in the input dtype.

    Forward: Z = H @ W^T. Forward+backward: Z, Z again (the recompute), dH = Z @ W, dW = Z^T @ H: 8*N*D*V FLOPs
    (on-policy: Z once, 6*N*D*V, the one pass's products).
    Z stands in for dZ; it is [N x V], so this row's memory is not comparable with the others'.
    """
    import torch

    h, w = prob.hidden.detach(), prob.weight.detach()

    def call():
        with torch.no_grad():
            z = h @ w.T
            if not mode.grad:
                return z, None, None, None
            if not mode.on_policy:  # on-policy: the one pass's three products (Z once)
                z = h @ w.T
            return None, None, z @ w, z.T @ h

    return call


# ------------------------------------------------------------------------------------------------ the groups

LOADS = ("idle", "busy")  # the load a row is timed under: as found, or with one busy CPU-bound process beside it


@contextlib.contextmanager
def busy_process(load: str):
    """With load "busy": one CPU-bound process (a Python loop) runs beside the block, the load that made torch's
    2 threads collapse on a 2-core machine; "idle" runs the block as the machine is."""
    if load not in LOADS:
        raise ValueError(f"unknown load {load!r}; known: {', '.join(LOADS)}")
    if load == "idle":
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.2)  # the interpreter is up and spinning before the first timed call
        yield
    finally:
        proc.kill()
        proc.wait()


def set_threads(threads: int) -> int:
    """torch's intra-op threads for a group (0: leave them as they are); the number in effect."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def group_key(spec: Spec) -> tuple:
    """Rows timed together, interleaved: the same problem, mode, load and threads."""
    return (spec.shape, spec.d, spec.v, spec.mode, spec.dist, spec.n, spec.load, spec.threads)


def groups_of(specs: list[Spec]) -> list[list[Spec]]:
    """Consecutive specs with the same group_key (build_specs puts them together)."""
    out: list[list[Spec]] = []
    for spec in specs:
        if out and group_key(out[-1][0]) == group_key(spec):
            out[-1].append(spec)
        else:
            out.append([spec])
    return out


def timing_fields(seconds: list[float], timing_id: str, mode, spec: Spec, warmup: int) -> dict:
    """The timing columns of a row from its interleaved calls (measure.interleaved_times)."""
    from .measure import timing_summary

    out = timing_summary(seconds)
    out["tflops"] = mode.flops(spec.n, spec.d, spec.v) / (out["time_ms"] * 1e-3) / 1e12
    out.update(reps=len(seconds), warmup=warmup, timing_id=timing_id)
    return out


class Runner:
    """Runs specs in one process, a group at a time (group_key): loads implementations once, caches problems and
    float64 references.

    A group is measured in two phases: `prepare` (per implementation: the float64 accuracy check, warm-up, one
    memory-measured call) and `time_group` (every prepared implementation timed in interleaved rounds, then the
    bitwise repeat check). With --isolate impl the parent runs `prepare` in one process per implementation and
    `time_group` in one more (workers.run_isolated); otherwise this process does both (run)."""

    def __init__(self, st: Settings, results_path: Path | None):
        self.st = st
        self.results_path = results_path
        self.loaded: dict[str, tuple] = {}
        self.problem_key, self.problem = None, None
        self.ref_key, self.ref = None, None
        self.accuracy: dict[tuple, dict] = {}
        self.stats: dict[tuple, dict] = {}  # (n, d, v, dist) -> problem_stats of the timing problem

    def get_problem(self, spec: Spec, mode) -> Problem:
        key = (spec.n, spec.d, spec.v, mode.grad, mode.pacs, spec.dist, mode.kept)
        if key != self.problem_key:
            self.problem = None  # free the previous inputs first
            self.problem = make_problem(spec.n, spec.d, spec.v, self.st, self.st.seed, grad=mode.grad,
                                        pacs=mode.pacs, dist=spec.dist, kept=mode.kept)
            self.problem_key = key
            stats_key = (spec.n, spec.d, spec.v, spec.dist)
            if stats_key not in self.stats:
                p = self.problem
                self.stats[stats_key] = problem_stats(p.hidden, p.weight, p.targets)
        return self.problem

    def errors(self, fn, spec: Spec, mode) -> dict:
        """Errors of `fn` against the float64 reference on `acc_tokens` tokens (cached per impl/shape/mode)."""
        from .measure import max_abs_err, max_rel_err

        key = (spec.impl, spec.d, spec.v, spec.mode, spec.dist)
        if key in self.accuracy:
            return self.accuracy[key]
        n = self.st.acc_tokens
        prob = make_problem(n, spec.d, spec.v, self.st, self.st.seed + 1, grad=mode.grad, pacs=mode.pacs,
                            old_from_reference=True, dist=spec.dist, kept=mode.kept)
        ref_key = (spec.d, spec.v, spec.mode, spec.dist)
        if ref_key != self.ref_key:
            self.ref = None
            self.ref, self.ref_key = reference_outputs(mode, prob), ref_key
        out = make_call(fn, mode, prob)()
        names = ("err_logprob", "err_entropy", "err_dh", "err_dw")
        measures = (max_abs_err, max_abs_err, max_rel_err, max_rel_err)
        result = {k: m(o, r) for k, m, o, r in zip(names, measures, out, self.ref)}
        result["acc_tokens"] = n
        self.accuracy[key] = result
        return result

    def load(self, impl):
        from .impls import load_impl

        if impl.name not in self.loaded:
            self.loaded[impl.name] = load_impl(impl)
        return self.loaded[impl.name]

    def call_of(self, spec: Spec):
        """(call, fn, None) for a spec that runs here, or (None, None, row fields saying why it does not)."""
        from .impls import get_impl, skip_reason

        impl, mode = get_impl(spec.impl), MODES[spec.mode]
        reason = skip_reason(impl, mode, self.st.device, self.st.interpret)
        if reason:
            return None, None, {"status": "skipped", "note": reason}
        if time.time() > self.st.deadline:
            return None, None, {"status": "skipped", "note": "time budget spent"}
        if impl.family == "floor":
            return gemm_call(mode, self.get_problem(spec, mode)), None, None
        fn, reason = self.load(impl)
        if fn is None:
            return None, None, {"status": "skipped", "note": reason}
        return make_call(fn, mode, self.get_problem(spec, mode)), fn, None

    def warmup_calls(self, spec: Spec) -> int:
        """Discarded calls before measuring: st.warmup on CUDA and for compiled implementations; on the CPU the
        others need none (the accuracy call or the first memory call has imported and initialized everything)."""
        from .impls import get_impl

        return self.st.warmup if (self.st.device == "cuda" or get_impl(spec.impl).compiled) else 0

    def prepare(self, spec: Spec, memory: bool = True, accuracy: bool = True):
        """(row fields, call or None): the accuracy check, warm-up and one memory-measured call of a spec (the
        timing worker of workers.run_isolated skips the accuracy check and the memory call: its prepare workers did
        them)."""
        from .impls import get_impl
        from .measure import MiB, peak_extra_bytes

        call, fn, why = self.call_of(spec)
        if call is None:
            return why, None
        row = {}
        # (a *_plain row on a replay problem ignores the kept sets: the kept-set reference is not its spec)
        if fn is not None and self.st.acc_tokens and accuracy and not spec.impl.partition("@")[0].endswith("_plain"):
            row.update(self.errors(fn, spec, MODES[spec.mode]))  # also the first call: imports, compilation
        for _ in range(self.warmup_calls(spec)):
            out = call()
            del out
        if memory:
            if self.st.device == "cuda":
                import torch

                torch.cuda.empty_cache()
            extra, out_bytes = peak_extra_bytes(call, self.st.device)
            row.update(peak_extra_mib=extra / MiB, output_mib=out_bytes / MiB)
        row["dist_stats"] = self.stats.get((spec.n, spec.d, spec.v, spec.dist))
        if MODES[spec.mode].kept:
            row["kept_stats"] = self.problem.kept_stats
        note = getattr(fn, "state", {}).get("note", "") if fn is not None else ""
        if get_impl(spec.impl).family == "floor":
            note = "matrix products only; holds [N x V]"
        row.update(status="ok", note=note)
        return row, call

    def time_group(self, specs: list[Spec], calls: dict, on_round=None) -> tuple[dict, dict]:
        """({impl: seconds of its interleaved calls}, {impl: bitwise-repeat fields}) of one group's prepared calls,
        under the group's load; the timing stops early after the deadline or past st.max_row_seconds per
        implementation (measure.interleaved_times)."""
        from .impls import get_impl
        from .measure import bitwise_repeat, interleaved_times

        spec0, mode = specs[0], MODES[specs[0].mode]
        with busy_process(spec0.load):
            times = interleaved_times(calls, self.st.device, self.st.reps, max_seconds=self.st.max_row_seconds,
                                      slow_factor=self.st.slow_factor, deadline=self.st.deadline, on_round=on_round)
        repeat = {}
        det = self.st.determinism
        for spec in specs:
            impl = get_impl(spec.impl)
            if (spec.impl in calls and mode.grad and impl.family != "floor"
                    and (det == "all" or (det == "ours" and impl.family == "ours"))):
                repeat[spec.impl] = bitwise_repeat(calls[spec.impl])  # two more calls: bitwise equal?
        return times, repeat

    def run_group(self, specs: list[Spec], progress_bar=None) -> None:
        """Prepare and time one group in this process; its rows are appended when it is done, or interrupted
        (KeyboardInterrupt, e.g. `timeout -s INT`: the rows keep the rounds already timed, then it is re-raised)."""
        import torch

        threads = set_threads(specs[0].threads)
        rows = {s.impl: base_row(s, self.st) | {"threads": threads} for s in specs}
        calls, warm = {}, {}
        partial: dict[str, list[float]] = {}
        timing_id = uuid.uuid4().hex[:12]
        times, repeat, loadavg = {}, {}, os.getloadavg()[0]
        interrupted = False
        try:
            for spec in specs:
                if progress_bar is not None:
                    progress_bar.set_postfix_str(f"{spec.impl} {spec.mode} {spec.shape} N={spec.n} {spec.load}")
                try:
                    fields, call = self.prepare(spec)
                except torch.cuda.OutOfMemoryError as err:
                    fields, call = {"status": "oom", "note": str(err).split("\n")[0][:200]}, None
                except Exception as err:  # a failing baseline must not stop the others
                    fields, call = {"status": "error", "note": error_note(err)}, None
                rows[spec.impl].update(fields)
                if call is not None:
                    calls[spec.impl], warm[spec.impl] = call, self.warmup_calls(spec)
            if calls:
                loadavg = os.getloadavg()[0]

                def keep(_, t):
                    partial.update({k: list(v) for k, v in t.items()})

                try:
                    times, repeat = self.time_group(specs, calls, on_round=keep)
                except Exception as err:  # e.g. out of memory in a later round: keep the rounds timed so far
                    times = partial
                    for name in calls:
                        rows[name]["note"] = "; ".join(filter(None, [rows[name].get("note"),
                                                                     f"timing stopped: {error_note(err)}"]))
        except KeyboardInterrupt:
            interrupted, times = True, partial
        finish_rows(specs, rows, times, repeat, warm, timing_id, loadavg, interrupted)
        self._write(rows)
        if self.st.device == "cuda":
            torch.cuda.empty_cache()
        if interrupted:
            raise KeyboardInterrupt

    def _write(self, rows: dict) -> None:
        from tqdm import tqdm

        from .report import append_rows

        append_rows(self.results_path, list(rows.values()))
        for row in rows.values():
            tqdm.write(row_summary(row), file=sys.stderr)

    def run(self, specs: list[Spec], progress: bool = True) -> None:
        from tqdm import tqdm

        groups = groups_of(specs)
        bar = tqdm(groups, desc=f"{self.st.device} rows", disable=not (progress and sys.stderr.isatty()),
                   file=sys.stderr)
        for group in bar:
            self.run_group(group, bar)


def error_note(err: BaseException) -> str:
    text = str(err).splitlines()[0][:300] if str(err) else ""
    return f"{type(err).__name__}: {text}"


def finish_rows(specs: list[Spec], rows: dict, times: dict, repeat: dict, warm: dict, timing_id: str,
                loadavg: float, interrupted: bool = False) -> None:
    """Put the timing columns into the prepared rows of a group (in place); a prepared row without a timed call
    (interrupted) becomes skipped."""
    for spec in specs:
        row = rows[spec.impl]
        if row.get("status") != "ok":
            if interrupted and "status" not in row:
                row.update(status="skipped", note="stopped (time limit) before it was measured")
            continue
        seconds = times.get(spec.impl) or []
        if not seconds:
            row.update(status="skipped" if interrupted else "error",
                       note="stopped (time limit) before its timed calls" if interrupted else "no timed call")
            continue
        row.update(timing_fields(seconds, timing_id, MODES[spec.mode], spec, warm.get(spec.impl, 0)))
        row["loadavg_1m"] = round(loadavg, 2)
        row.update(repeat.get(spec.impl, {}))
        if interrupted:
            row["note"] = "; ".join(filter(None, [row.get("note", ""), "timing cut short (time limit)"]))


def row_summary(row: dict) -> str:
    """One progress line per measured row."""
    where = (f"{row['impl']:>16} {row['mode']:<15} {row['shape']} N={row['n']} {row.get('dist', 'random')}"
             + ("" if row.get("load", "idle") == "idle" else f" load={row['load']}")
             + (f" threads={row['threads']}" if row.get("threads") else ""))
    if row["status"] != "ok":
        return f"{where}: {row['status']} ({row.get('note', '')[:120]})"
    det = "" if "bitwise_repeat" not in row else f", bitwise repeatable {row['bitwise_repeat']}"
    mem = "" if row.get("peak_extra_mib") is None else f", peak extra {row['peak_extra_mib']:.4g} MiB"
    return (f"{where}: {row['time_ms']:.4g} ms (median of {row['reps']} interleaved), {row['tflops']:.3g} TFLOPS"
            f"{mem}{det}")


def base_row(spec: Spec, st: Settings) -> dict:
    """The identifying fields of a row."""
    from pacs import runinfo

    from .impls import get_impl

    impl = get_impl(spec.impl)
    return {
        "device": st.device, "device_name": device_name(st.device), "impl": spec.impl, "label": impl.label,
        "family": impl.family, "mode": spec.mode, "shape": spec.shape, "n": spec.n, "d": spec.d, "v": spec.v,
        "dist": spec.dist, "dtype": st.dtype, "load": spec.load, "flops": MODES[spec.mode].flops(spec.n, spec.d,
                                                                                                  spec.v),
        "version": (runinfo.package_version(impl.package) or "") if impl.package else "", "preset": st.preset,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
