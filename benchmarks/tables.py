"""The markdown of a run's section: the tables, the headline ratios, the goal verdicts, the machine and versions.

Everything here formats rows that report.derive has completed (their ratios to the bare GEMM, the fastest anchor,
the naive path and the plain op): markdown_tables (one table per device, dtype, mode, logit distribution, load and
threads; the replay modes' own columns in replay_table), headline (our backends against the naive path), the goal
verdicts (goal_table: stated at GOAL_SHAPE, PASS/FAIL computed from the rows), ceilings_lines (benchmarks/ceilings.py's
ceilings.json) and describe_runs (the `_meta` records: machine, versions, command). A `_meta` record written before
the `pacs_forward_impl` field was dropped still carries it; it is ignored.
"""

from __future__ import annotations

import json


# ----------------------------------------------------------------------------------------------- formatting


def sig(x, digits=3) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _exp(x) -> str:
    return "–" if x is None else f"{x:.1e}"


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.3g}x"


def _spread(row: dict, name: str, unit: str = "x") -> str:
    """'0.86x [0.82, 0.90]' (median of the per-round ratios and their range), or the bare ratio of medians where
    the rows were not timed interleaved."""
    x = row.get(name)
    if x is None:
        return "–"
    if not row.get(name + "_pairs"):
        return f"{sig(x)}{unit}"
    if row[name + "_pairs"] == 1:
        return f"{sig(x)}{unit} (1 pair)"
    return f"{sig(x)}{unit} [{sig(row[name + '_min'])}, {sig(row[name + '_max'])}]"


def load_text(load: str | None, threads) -> str:
    """', 1 busy process beside it, 2 threads' for a row's conditions ('' for idle with the process's threads)."""
    text = "" if (load or "idle") == "idle" else ", one busy CPU-bound process beside it"
    return text + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")


def headline(rows: list[dict]) -> list[str]:
    """Memory and time ratios of our backends to the naive path, at the largest V and N of each mode and load.
    Interleaved rows give the time ratio as the median of the per-round ratios with its range."""
    lines = []
    largest: dict[tuple, tuple] = {}  # (device, dtype, mode, dist, load, threads) -> the largest (V, N) with naive
    keyf = lambda r: (r["device"], r["dtype"], r["mode"], r["dist"], r.get("load"), r.get("threads"))  # noqa: E731
    for row in rows:
        if row.get("naive_time_ms") is not None:
            largest[keyf(row)] = max(largest.get(keyf(row), (0, 0)), (row["v"], row["n"]))
    for row in rows:
        if (row.get("family") == "ours" and row.get("naive_time_ms") is not None
                and largest[keyf(row)] == (row["v"], row["n"])):
            pairs = row.get("time_vs_naive_pairs") or 0
            how = (f"the median of {pairs} interleaved rounds' ratios, range {sig(row['time_vs_naive_min'])}-"
                   f"{sig(row['time_vs_naive_max'])}" if pairs > 1 else
                   "one interleaved round" if pairs == 1 else "the ratio of medians, not interleaved")
            lines.append(
                f"- {row['label']} vs naive, {row['mode']}, D={row['d']} V={row['v']} N={row['n']} ({row['dtype']}, "
                f"{row['dist']} logits{load_text(row.get('load'), row.get('threads'))}): "
                f"peak extra memory {sig(row.get('peak_extra_mib'))} MiB vs {sig(row.get('naive_peak_extra_mib'))} "
                f"MiB (ratio {sig(row.get('mem_vs_naive'))}); time ratio {sig(row['time_vs_naive'])} ({how}; "
                f"median times {sig(row['time_ms'])} ms vs {sig(row['naive_time_ms'])} ms)"
            )
    return lines


def _dist_line(dist: str, stats: dict | None) -> str:
    if not stats:
        return f"{dist} logits"
    return (f"{dist} logits: mean entropy {stats['entropy']:.3g} nats, top-1 probability {stats['top1']:.3g}, "
            f"top-100 mass {stats['top100_mass']:.3g}, probability of the target {stats['p_target']:.3g} "
            "(first 256 positions of the timing problem)")


def markdown_tables(rows: list[dict]) -> str:
    """One table per (device, dtype, mode, logit distribution); skipped rows summarized underneath."""
    out = []
    shown = [r for r in rows if r.get("status") != "skipped"]
    header = ("| shape (D x V) | N | implementation | ms | TFLOPS | % bare GEMM | / fastest anchor | peak extra MiB "
              "| mem / naive | time / naive | bitwise repeat | err logprob | err entropy | err dH | err dW | note |")
    groups: dict[tuple, list[dict]] = {}
    for row in shown:
        groups.setdefault((row["device"], row["dtype"], row["mode"], row["dist"], row.get("load"),
                           row.get("threads")), []).append(row)
    for (device, dtype, mode, dist, load, threads), group in groups.items():
        if mode.startswith("replay_"):
            out += replay_table(device, dtype, f"{mode} ({device}, {dtype}, {dist} logits{load_text(load, threads)}",
                                group)
            continue
        stats = next((r.get("dist_stats") for r in reversed(group) if r.get("dist_stats")), None)
        loads = sorted({r.get("loadavg_1m") for r in group if r.get("loadavg_1m") is not None})
        where = (f"; 1-minute load average {loads[0]:.2f}" + (f"-{loads[-1]:.2f}" if loads[-1] != loads[0] else "")
                 + " when timed") if loads else ""
        out += [f"#### {mode} ({device}, {dtype}, {dist} logits{load_text(load, threads)})", "",
                _dist_line(dist, stats) + where, "", header, "|" + "---|" * 16]
        for r in group:
            ok = r["status"] == "ok"
            note = r.get("note", "") if ok else f"**{r['status']}**: {r.get('note', '')}"
            anchor = r.get("vs_anchor")
            anchor_text = "–" if anchor is None else (
                _spread(r, "vs_anchor") + ("" if r.get("family") == "baseline" else f" ({r.get('fastest_anchor')})"))
            bitwise = r.get("bitwise_repeat")
            reps = f" ({r['reps']})" if ok and r.get("reps") else ""
            out.append("| " + " | ".join([
                f"{r['shape']} ({r['d']} x {r['v']})", str(r["n"]), r["label"],
                sig(r.get("time_ms")) + reps if ok else "–", sig(r.get("tflops")) if ok else "–",
                _spread(r, "pct_gemm", "%") if ok and r.get("pct_gemm") is not None else "–", anchor_text,
                sig(r.get("peak_extra_mib")) if ok else "–",
                _ratio(r.get("mem_vs_naive")), _spread(r, "time_vs_naive"),
                "–" if bitwise is None else ("yes" if bitwise else f"**no** ({r.get('repeat_max_diff', 0):.1e})"),
                _exp(r.get("err_logprob")), _exp(r.get("err_entropy")), _exp(r.get("err_dh")),
                _exp(r.get("err_dw")), note.replace("|", "/"),
            ]) + " |")
        out.append("")
    skipped: dict[tuple, set] = {}
    for r in rows:
        if r.get("status") == "skipped":
            skipped.setdefault((r["label"], r.get("note", "")), set()).add(r["mode"])
    if skipped:
        out.append("Not measured:")
        for (label, note), modes in sorted(skipped.items()):
            out.append(f"- {label} ({', '.join(sorted(modes))}): {note}")
        out.append("")
    return "\n".join(out)


def _time_range(row: dict) -> str:
    times = row.get("time_ms_all") or []
    return f"{sig(min(times))}-{sig(max(times))} ({len(times)})" if len(times) > 1 else "–"


def replay_table(device: str, dtype: str, title: str, group: list[dict]) -> list[str]:
    """A replay mode's table: time with its range over the timed calls, memory, and both against the plain op
    (`_plain_row`), with the kept-set sizes of each problem (measured on it)."""
    out = [f"#### {title}; kept-set log-probs, forward + backward)", ""]
    sizes = {}
    for r in group:
        if r.get("kept_stats"):
            sizes[(r["shape"], r["n"])] = r["kept_stats"]
    for (shape, n), k in sizes.items():
        out.append(f"kept-set sizes at {shape}, N={n}: mean {sig(k.get('mean'))}, p50 {sig(k.get('p50'))}, "
                   f"p99 {sig(k.get('p99'))}, singletons {sig(k.get('singleton'))}  ")
    loads = sorted({r.get("loadavg_1m") for r in group if r.get("loadavg_1m") is not None})
    if loads:
        out.append(f"1-minute load average {loads[0]:.2f}" + (f"-{loads[-1]:.2f}" if loads[-1] != loads[0] else "")
                   + " when timed")
    out += ["", "| shape (D x V) | N | implementation | ms (median) | ms min-max (calls) | time / plain op | "
            "peak extra MiB | mem / plain op | bitwise repeat | err logprob | err dH | err dW | note |",
            "|" + "---|" * 13]
    for r in group:
        ok = r["status"] == "ok"
        note = r.get("note", "") if ok else f"**{r['status']}**: {r.get('note', '')}"
        bitwise = r.get("bitwise_repeat")
        out.append("| " + " | ".join([
            f"{r['shape']} ({r['d']} x {r['v']})", str(r["n"]), r["label"], sig(r.get("time_ms")) if ok else "–",
            _time_range(r) if ok else "–", _spread(r, "time_vs_plain"),
            sig(r.get("peak_extra_mib")) if ok else "–", _ratio(r.get("mem_vs_plain")),
            "–" if bitwise is None else ("yes" if bitwise else f"**no** ({r.get('repeat_max_diff', 0):.1e})"),
            _exp(r.get("err_logprob")), _exp(r.get("err_dh")), _exp(r.get("err_dw")), note.replace("|", "/"),
        ]) + " |")
    out.append("")
    return out


# ------------------------------------------------------------------------------------------------- the goals

# The shape the goals are stated at (H100/H200, bf16): N=16384 tokens, D=4096, V=131072.
GOAL_SHAPE = {"d": 4096, "v": 131072, "n": 16384, "dtype": "bf16"}
GOAL_IMPLS = ("ours_triton", "ours_sliced", "ours_fused")
MIB = 1 << 20
GOAL_EXTRA_MIB = 1024  # extra memory allowed beyond the fp32 [N, D] dH and the per-token statistics
STATS_BYTES_PER_TOKEN = 16  # per-token statistics allowed on top: up to 4 float32 per token (lse, entropy, ...)
N_SPREAD_MIB = 64  # "independent of N": the excess at the largest N at most this much above that at the smallest


def memory_excess_mib(row: dict) -> float:
    """Peak extra memory beyond an fp32 [N, D] dH and STATS_BYTES_PER_TOKEN per token, MiB."""
    return row["peak_extra_mib"] - row["n"] * (4 * row["d"] + STATS_BYTES_PER_TOKEN) / MIB


def goal_rows(rows: list[dict]) -> tuple[dict, dict[tuple, dict]]:
    """(the shape the goals are checked at, {(impl, dist, mode): row}). The stated shape when it was measured, else
    (a CPU or dry run) the largest fwd_bwd shape with a pacs row, so that the checks still run end to end."""
    ok = [r for r in rows if r.get("status") == "ok" and r["impl"] in GOAL_IMPLS
          and r["mode"] in ("fwd_bwd", "logprob") and r.get("load", "idle") == "idle"]
    if not ok:
        return {}, {}
    stated = [r for r in ok if all(r[k] == v for k, v in GOAL_SHAPE.items())]
    if stated:
        shape = dict(GOAL_SHAPE, device=stated[0]["device"])
    else:
        top = max(ok, key=lambda r: (r["mode"] == "fwd_bwd", r["d"] * r["v"], r["n"]))
        shape = {k: top[k] for k in ("d", "v", "n", "dtype", "device")}
    picked = {}
    for r in ok:
        if all(r[k] == v for k, v in shape.items()):
            picked[(r["impl"], r["dist"], r["mode"])] = r
    return shape, picked


def _verdict(passed: bool | None, text: str) -> str:
    return {True: "PASS", False: "**FAIL**", None: "n/a"}[passed] + (f": {text}" if text else "")


def goal_table(rows: list[dict]) -> list[str]:
    """The goals, PASS/FAIL per pacs implementation and logit distribution, from the measured rows alone."""
    shape, picked = goal_rows(rows)
    if not picked:
        return []
    columns = sorted({(impl, dist) for impl, dist, _ in picked},
                     key=lambda c: (GOAL_IMPLS.index(c[0]), c[1] != "random"))
    labels = {impl: next(r["label"] for (i, _, _), r in picked.items() if i == impl) for impl, _ in columns}
    ok_rows = [r for r in rows if r.get("status") == "ok"]

    def memory(impl, dist):
        row = picked.get((impl, dist, "fwd_bwd"))
        if row is None:
            return None, "no fwd_bwd row"
        excess = memory_excess_mib(row)
        same = sorted((r for r in ok_rows if r["impl"] == impl and r["dist"] == dist and r["mode"] == "fwd_bwd"
                       and r["device"] == row["device"] and r["dtype"] == row["dtype"] and r["d"] == row["d"]
                       and r["v"] == row["v"]), key=lambda r: r["n"])
        text = f"{excess:,.0f} MiB beyond dH+stats at N={row['n']}"
        passed = excess <= GOAL_EXTRA_MIB
        if len(same) > 1:
            lo, hi = memory_excess_mib(same[0]), memory_excess_mib(same[-1])
            text += f"; {lo:,.0f} MiB at N={same[0]['n']}, {hi:,.0f} at N={same[-1]['n']}"
            passed = passed and hi <= lo + N_SPREAD_MIB
        else:
            text += "; one N measured, N-independence unchecked"
        return passed, text

    def pct(impl, dist, mode):
        row = picked.get((impl, dist, mode))
        if row is None or row.get("pct_gemm") is None:
            return None, f"no {mode} row with its bare GEMM"
        return row["pct_gemm"] >= 85, f"{row['pct_gemm']:.1f}% ({row['time_ms']:.4g} ms)"

    def anchor(impl, dist):
        row = picked.get((impl, dist, "fwd_bwd"))
        if row is None or row.get("vs_anchor") is None:
            return None, "no anchor measured"
        return row["vs_anchor"] <= 0.95, f"{row['vs_anchor']:.3g}x {row['fastest_anchor']}"

    def determinism(impl, dist):
        row = picked.get((impl, dist, "fwd_bwd"))
        if row is None or row.get("bitwise_repeat") is None:
            return None, "not run"
        eq = row.get("repeat_equal", {})
        passed = bool(eq.get("dh")) and bool(eq.get("dw"))
        return passed, "dH, dW bitwise equal" if passed else f"differ by up to {row.get('repeat_max_diff', 0):.2e}"

    goals = [
        ("fwd+bwd >= 85% of the bare-GEMM rate (8NDV)", lambda i, d: pct(i, d, "fwd_bwd")),
        ("fwd+bwd <= 0.95x the fastest anchor", anchor),
        ("forward >= 85% of the bare-GEMM rate (2NDV)", lambda i, d: pct(i, d, "logprob")),
        (f"extra memory beyond fp32 dH + per-token stats <= {GOAL_EXTRA_MIB} MiB, independent of N "
         f"(within {N_SPREAD_MIB} MiB)", memory),
        ("dH/dW bitwise equal across two runs", determinism),
    ]
    where = (f"D={shape['d']} V={shape['v']} N={shape['n']} {shape['dtype']} ({shape['device']})"
             + ("" if all(shape[k] == v for k, v in GOAL_SHAPE.items()) else
                ": not the stated shape (D=4096 V=131072 N=16384 bf16), so these verdicts prove nothing about it"))
    lines = [f"Goals at {where}; each verdict is computed from the rows below:", "",
             "| goal | " + " | ".join(f"{labels[i]}, {d} logits" for i, d in columns) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for name, check in goals:
        lines.append(f"| {name} | " + " | ".join(_verdict(*check(i, d)) for i, d in columns) + " |")
    return lines + [""]


def ceilings_lines(ceilings: dict | None) -> list[str]:
    """The ceilings measured by benchmarks/ceilings.py in the same session (GEMM rates, HBM copy, GEMM probe)."""
    if not ceilings:
        return []
    lines = [f"Ceilings measured in the same session (benchmarks/ceilings.py, {ceilings.get('device_name', '?')}):", ""]
    for item in ceilings.get("gemm", []):
        rate = (f"{item['tflops']:.4g} TFLOP/s ({item['ms']:.4g} ms)" if item.get("tflops") is not None
                else item.get("error", "not run"))
        lines.append(f"- GEMM {item['name']}: {item['shape']}, {item['dtype']}: {rate}")
    for item in ceilings.get("copy", []):
        rate = (f"{item['gbps']:.4g} GB/s ({item['ms']:.4g} ms, read + write)" if item.get("gbps") is not None
                else item.get("error", "not run"))
        lines.append(f"- copy {item['mib']:,} MiB: {rate}")
    probe = ceilings.get("probe")
    if probe is not None:
        lines.append(f"- pacs_kernels._gemm.probe: `{json.dumps(probe, default=str)[:1500]}`")
    return lines + [""]


def describe_meta(meta: dict) -> list[str]:
    """Machine and versions lines of a run."""
    return [
        f"- machine: {meta.get('device_name')} ({meta.get('device')}"
        + (f", compute capability {meta['capability']}, {meta.get('sms')} SMs, {meta.get('gpu_memory_gib')} GiB"
           if meta.get("capability") else "")
        + f", torch threads {meta.get('torch_threads')}"
        + (f", OMP_WAIT_POLICY={meta['omp_wait_policy']}" if meta.get("omp_wait_policy") else "")
        + (f", load average {' '.join(str(x) for x in meta['loadavg'])} at the start" if meta.get("loadavg") else "")
        + ")",
        f"- versions: Python {meta.get('python')}, torch {meta.get('torch')}"
        + (f" (CUDA {meta['cuda']})" if meta.get("cuda") else "")
        + f", triton {meta.get('triton')}, liger-kernel {meta.get('liger-kernel')}, "
        f"cut-cross-entropy {meta.get('cut-cross-entropy')}, "
        + (f"trl {meta['trl']}, " if meta.get("trl") else "") + f"pacs {meta.get('pacs')}"
        + (f" (commit {meta['commit']})" if meta.get("commit") else "")
        + (f"; PACS_KERNELS_MEMORY_BUDGET={meta['memory_budget']}" if meta.get("memory_budget") else ""),
        f"- date: {meta.get('date')}; dtype {meta.get('dtype')}; {meta.get('warmup')} warm-up call(s) discarded, "
        f"median of {meta.get('reps')} timed calls; errors on {meta.get('acc_tokens')} tokens against float64",
        f"- command: `{meta.get('command')}`",
    ]


def describe_runs(metas: list[dict]) -> list[str]:
    """Machine/versions of the last run, and every run's command when rows come from several."""
    lines = describe_meta(metas[-1]) if metas else []
    commands = list(dict.fromkeys(m.get("command") for m in metas))
    if len(commands) > 1:
        lines[-1] = "- commands (rows from each, the later replacing the earlier): " + "; ".join(
            f"`{c}`" for c in commands)
    return lines


NOTES = [
    "Columns: ms = median time (number of timed calls); the implementations of a table's row group are timed in "
    "interleaved rounds (one call each per round, the order reversed every other round), and each time ratio (% "
    "bare GEMM, / fastest anchor, time / naive) is the median of the per-round ratios, [min, max] over the rounds; "
    "TFLOPS = (2*N*D*V no-grad, 8*N*D*V forward+backward) / time; % bare GEMM = "
    "time of the same matrix products alone (bare GEMM row) / time; peak extra = peak memory above inputs and "
    "outputs (CUDA: max_memory_allocated; CPU: peak RSS of the implementation's own process); err logprob/entropy "
    "= max absolute error in nats, err dH/dW = max error / max |reference|, against float64 materialized "
    "log_softmax on a separate problem of the same D and V.",
]
