"""Tables, plot and the RESULTS.md section, rebuilt from the rows a run streamed into OUT/results.jsonl.

Files written into OUT (eight at most, so that a GPU machine's output folder comes back whole):
results.jsonl (the rows, with one `_meta` record per run), results.json (rows + machine/versions), results.csv,
results.md (the tables) and plot.png (time and peak extra memory against tokens, per implementation). A
ceilings.json in OUT (benchmarks/ceilings.py) is shown in the section too.

Derived columns, per (device, dtype, shape, logit distribution, mode, tokens, load, threads):
- pct_gemm = time(bare GEMM) / time(row): the fraction of the bare matrix-multiply rate the row reaches;
- vs_anchor = time / the fastest anchor's (the fastest "baseline" row by median time, i.e. not pacs and not the
  bare GEMM);
- mem_vs_naive = peak extra memory / the naive path's, time_vs_naive = time / the naive path's;
- replay modes (kept-set log-probs): time_vs_plain, mem_vs_plain = time, peak extra memory / the plain op's over the
  whole vocabulary: the `*_plain` implementation of the same backend timed in the same group (ours_torch_plain
  beside ours_torch, ours_torch_gather, ...), else the same implementation's fwd_bwd row at the same shape and
  tokens (a ratio of medians).
Time ratios of rows timed interleaved in one group (the same `timing_id`, suite.Runner) are the median of the
per-round ratios (measure.ratio_stats), with their minimum and maximum (`<name>_min`, `<name>_max`) and the number
of pairs (`<name>_pairs`); rows from different runs fall back to the ratio of their medians (`_pairs` 0).
The goals (GOALS) are checked on the measured rows, each PASS/FAIL with its numbers (goal_table).
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# PACS_RESULTS_MD: another file to put the sections in (gpu_check.sh --dry-run keeps the tree's RESULTS.md untouched)
RESULTS_MD = Path(os.environ.get("PACS_RESULTS_MD") or ROOT / "benchmarks" / "RESULTS.md").resolve()
KEY = ("device", "dtype", "impl", "mode", "shape", "dist", "n", "load", "threads")
GROUP = ("device", "dtype", "shape", "dist", "mode", "n", "load", "threads")
MODE_ORDER = ["fwd_bwd", "replay_skewed", "replay_512", "replay_full", "fwd_bwd_entropy", "pacs_loss", "logprob",
              "logprob_entropy"]
CSV_FIELDS = [
    "device", "device_name", "dtype", "mode", "shape", "d", "v", "dist", "n", "load", "threads", "loadavg_1m",
    "impl", "label", "family", "status", "time_ms", "time_ms_min", "tflops", "pct_gemm", "pct_gemm_min",
    "pct_gemm_max", "vs_anchor", "vs_anchor_min", "vs_anchor_max", "fastest_anchor", "peak_extra_mib", "output_mib",
    "mem_vs_naive", "time_vs_naive", "time_vs_naive_min", "time_vs_naive_max", "time_vs_naive_pairs",
    "time_vs_plain", "time_vs_plain_min", "time_vs_plain_max", "time_vs_plain_pairs", "mem_vs_plain",
    "bitwise_repeat", "repeat_max_diff", "err_logprob", "err_entropy", "err_dh",
    "err_dw", "acc_tokens", "flops", "warmup", "reps",
    "version", "preset", "date", "note",
]


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows (or `_meta` records) to a JSON-lines file, flushed at once."""
    with open(path, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_rows(path: Path) -> list[dict]:
    """The measured rows of a results.jsonl (not the `_meta` records), in file order; rows written before the logit
    distribution was a dimension are "random"."""
    rows = [r for r in _records(path) if "_meta" not in r]
    for row in rows:
        row.setdefault("dist", "random")
        row.setdefault("load", "idle")
        row.setdefault("threads", None)
    return rows


def load_meta(path: Path) -> list[dict]:
    return [r["_meta"] for r in _records(path) if "_meta" in r]


def latest(rows: list[dict]) -> list[dict]:
    """One row per KEY, the last one written (a rerun replaces its earlier rows), except that a skipped row never
    replaces a measured one (a later run that ran out of time keeps the earlier measurement)."""
    keep = {}
    for row in rows:
        key = tuple(row.get(k) for k in KEY)
        if row.get("status") == "skipped" and keep.get(key, {}).get("status") == "ok":
            continue
        keep[key] = row
    return list(keep.values())


def time_ratio(row: dict, base: dict) -> dict:
    """row's time over base's: {"median", "min", "max", "pairs"}. Interleaved rows (the same timing_id): the
    per-round ratios' median and range (measure.ratio_stats); otherwise the ratio of the medians, pairs 0."""
    from .measure import ratio_stats

    if row.get("timing_id") and row.get("timing_id") == base.get("timing_id"):
        stats = ratio_stats(row.get("time_ms_all") or [], base.get("time_ms_all") or [])
        if stats:
            return stats
    ratio = row["time_ms"] / base["time_ms"]
    return {"median": ratio, "min": ratio, "max": ratio, "pairs": 0}


def _put_ratio(row: dict, name: str, stats: dict, scale: float = 1.0, invert: bool = False) -> None:
    """row[name], row[name + "_min"/"_max"/"_pairs"] from time_ratio stats (invert: base / row, e.g. pct_gemm)."""
    if invert:
        lo, mid, hi = 1 / stats["max"], 1 / stats["median"], 1 / stats["min"]
    else:
        lo, mid, hi = stats["min"], stats["median"], stats["max"]
    row[name], row[name + "_min"], row[name + "_max"] = scale * mid, scale * lo, scale * hi
    row[name + "_pairs"] = stats["pairs"]


def derive(rows: list[dict], pool: list[dict] | None = None) -> list[dict]:
    """Add pct_gemm, vs_anchor, mem_vs_naive and time_vs_naive to the ok rows (see the module docstring).

    `pool`: every row read, before `latest` kept one per key (default: `rows`). A row's ratio to the naive path,
    the bare GEMM or the fastest anchor pairs it with that implementation's row of the same interleaved group
    (`timing_id`) where the pool has one, even when a later run replaced the row shown (e.g. gpu_check.sh times
    naive again beside the anchors); otherwise with the row shown, as a ratio of medians."""
    ok = {tuple(r.get(k) for k in GROUP) + (r["impl"],): r for r in rows if r.get("status") == "ok"}
    timed = {(r["timing_id"], r["impl"]): r for r in (rows if pool is None else pool)
             if r.get("status") == "ok" and r.get("timing_id")}
    anchors: dict[tuple, dict] = {}  # group -> its fastest baseline row
    for row in ok.values():
        group = tuple(row.get(k) for k in GROUP)
        if row.get("family") == "baseline" and row["time_ms"] < anchors.get(group, {}).get("time_ms", float("inf")):
            anchors[group] = row

    def partner(row, base):
        return timed.get((row.get("timing_id"), base["impl"]), base)

    for row in rows:
        if row.get("status") != "ok":
            continue
        group = tuple(row.get(k) for k in GROUP)
        gemm, naive = ok.get(group + ("gemm",)), ok.get(group + ("naive",))
        row["pct_gemm"] = None
        if gemm and row["impl"] != "gemm":
            _put_ratio(row, "pct_gemm", time_ratio(row, partner(row, gemm)), scale=100.0, invert=True)
        anchor = anchors.get(group)
        if anchor and row["impl"] != "gemm":
            _put_ratio(row, "vs_anchor", time_ratio(row, partner(row, anchor)))
            row["fastest_anchor"] = anchor["label"]
        if naive and row["impl"] not in ("naive", "gemm"):
            naive = partner(row, naive)
            row["naive_time_ms"], row["naive_peak_extra_mib"] = naive["time_ms"], naive.get("peak_extra_mib")
            _put_ratio(row, "time_vs_naive", time_ratio(row, naive))
            row["mem_vs_naive"] = (row["peak_extra_mib"] / naive["peak_extra_mib"]
                                   if naive.get("peak_extra_mib") and row.get("peak_extra_mib") is not None else None)
        if row["mode"].startswith("replay_") and not row["impl"].endswith("_plain"):
            plain = _plain_row(ok, row)
            if plain:
                if plain["mode"] == row["mode"]:  # the *_plain row of the same group: its interleaved partner
                    plain = partner(row, plain)
                row["plain_time_ms"], row["plain_peak_extra_mib"] = plain["time_ms"], plain.get("peak_extra_mib")
                _put_ratio(row, "time_vs_plain", time_ratio(row, plain))
                row["mem_vs_plain"] = (row["peak_extra_mib"] / plain["peak_extra_mib"]
                                       if plain.get("peak_extra_mib") and row.get("peak_extra_mib") is not None
                                       else None)
    return rows


def _plain_row(ok: dict, row: dict) -> dict | None:
    """The plain op's row for a replay row: the `*_plain` implementation of its backend in the same group (timed
    interleaved beside it), else the fwd_bwd row of the same implementation (without its forced algorithm:
    ours_torch_gather -> ours_torch) at the same device, dtype, shape, logits, tokens, load and threads."""
    group = tuple(row.get(k) for k in GROUP)
    impl = row["impl"].partition("@")[0]
    backend = "ours_torch" if impl.startswith("ours_torch") else "ours_triton" if impl.startswith("ours_") else None
    if backend and group + (backend + "_plain",) in ok:
        return ok[group + (backend + "_plain",)]
    plain_group = tuple(row.get(k) if k != "mode" else "fwd_bwd" for k in GROUP)
    for name in (impl, impl.rsplit("_", 1)[0]):
        if plain_group + (name,) in ok:
            return ok[plain_group + (name,)]
    return None


def _order(rows: list[dict]) -> list[dict]:
    from .impls import IMPLS, impl_base

    impl_rank = {name: i for i, name in enumerate(IMPLS)}
    mode_rank = {name: i for i, name in enumerate(MODE_ORDER)}
    dist_rank = {"random": 0, "peaked": 1}
    return sorted(rows, key=lambda r: (r["device"], r["dtype"], mode_rank.get(r["mode"], 99),
                                       dist_rank.get(r["dist"], 9), r.get("load", "idle") != "idle",
                                       r.get("threads") or 0, r["d"], r["v"], r["n"],
                                       impl_rank.get(impl_base(r["impl"]), 99), _budget_of(r["impl"])))


def _budget_of(name: str) -> int:
    """Bytes of an `ours_torch@64M` variant's budget (0 for the plain implementation), to sort variants by it."""
    from pacs_kernels.dispatch import parse_bytes

    budget = name.partition("@")[2]
    try:
        return parse_bytes(budget) if budget else 0
    except ValueError:
        return 0


# ----------------------------------------------------------------------------------------------- formatting


def _sig(x, digits=3) -> str:
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
        return f"{_sig(x)}{unit}"
    if row[name + "_pairs"] == 1:
        return f"{_sig(x)}{unit} (1 pair)"
    return f"{_sig(x)}{unit} [{_sig(row[name + '_min'])}, {_sig(row[name + '_max'])}]"


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
            how = (f"the median of {pairs} interleaved rounds' ratios, range {_sig(row['time_vs_naive_min'])}-"
                   f"{_sig(row['time_vs_naive_max'])}" if pairs > 1 else
                   "one interleaved round" if pairs == 1 else "the ratio of medians, not interleaved")
            lines.append(
                f"- {row['label']} vs naive, {row['mode']}, D={row['d']} V={row['v']} N={row['n']} ({row['dtype']}, "
                f"{row['dist']} logits{load_text(row.get('load'), row.get('threads'))}): "
                f"peak extra memory {_sig(row.get('peak_extra_mib'))} MiB vs {_sig(row.get('naive_peak_extra_mib'))} "
                f"MiB (ratio {_sig(row.get('mem_vs_naive'))}); time ratio {_sig(row['time_vs_naive'])} ({how}; "
                f"median times {_sig(row['time_ms'])} ms vs {_sig(row['naive_time_ms'])} ms)"
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
                _sig(r.get("time_ms")) + reps if ok else "–", _sig(r.get("tflops")) if ok else "–",
                _spread(r, "pct_gemm", "%") if ok and r.get("pct_gemm") is not None else "–", anchor_text,
                _sig(r.get("peak_extra_mib")) if ok else "–",
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
    return f"{_sig(min(times))}-{_sig(max(times))} ({len(times)})" if len(times) > 1 else "–"


def replay_table(device: str, dtype: str, title: str, group: list[dict]) -> list[str]:
    """A replay mode's table: time with its range over the timed calls, memory, and both against the plain op
    (`_plain_row`), with the kept-set sizes of each problem (measured on it)."""
    out = [f"#### {title}; kept-set log-probs, forward + backward)", ""]
    sizes = {}
    for r in group:
        if r.get("kept_stats"):
            sizes[(r["shape"], r["n"])] = r["kept_stats"]
    for (shape, n), k in sizes.items():
        out.append(f"kept-set sizes at {shape}, N={n}: mean {_sig(k.get('mean'))}, p50 {_sig(k.get('p50'))}, "
                   f"p99 {_sig(k.get('p99'))}, singletons {_sig(k.get('singleton'))}  ")
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
            f"{r['shape']} ({r['d']} x {r['v']})", str(r["n"]), r["label"], _sig(r.get("time_ms")) if ok else "–",
            _time_range(r) if ok else "–", _spread(r, "time_vs_plain"),
            _sig(r.get("peak_extra_mib")) if ok else "–", _ratio(r.get("mem_vs_plain")),
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
        + ("" if "pacs_forward_impl" not in meta else
           f"; linear_logprob forward_impl option: {'yes' if meta['pacs_forward_impl'] else 'not in this checkout'}")
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


# -------------------------------------------------------------------------------------------------- the plot


def plot(rows: list[dict], path: Path, max_panels: int = 6) -> str | None:
    """Time and peak extra memory against tokens, one line per implementation; None or why no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        return f"no plot: {err}"
    ok = [r for r in rows if r.get("status") == "ok"]
    panels: dict[tuple, list[dict]] = {}
    for r in ok:
        panels.setdefault((r["device"], r["dtype"], r["mode"], r["shape"], r["d"], r["v"], r["dist"],
                           r.get("load"), r.get("threads")), []).append(r)
    keys = sorted(panels, key=lambda k: (-len({r["n"] for r in panels[k]}), MODE_ORDER.index(k[2])
                                         if k[2] in MODE_ORDER else 99))[:max_panels]
    if not keys:
        return "no plot: no measured rows"
    fig, axes = plt.subplots(len(keys), 2, figsize=(12, 3.6 * len(keys)), squeeze=False)
    for (ax_t, ax_m), key in zip(axes, keys):
        device, dtype, mode, shape, d, v, dist, load, threads = key
        by_impl: dict[str, list[dict]] = {}
        for r in sorted(panels[key], key=lambda r: r["n"]):
            by_impl.setdefault(r["label"], []).append(r)
        for label, series in by_impl.items():
            ns = [r["n"] for r in series]
            style = dict(marker="o", linewidth=2.5 if series[0]["family"] == "ours" else 1.2,
                         linestyle=":" if series[0]["family"] == "floor" else "-")
            ax_t.plot(ns, [r["time_ms"] for r in series], label=label, **style)
            if series[0]["family"] != "floor":
                ax_m.plot(ns, [max(r["peak_extra_mib"], 1e-2) for r in series], label=label, **style)
        title = f"{mode}, {shape} D={d} V={v}, {dtype}, {dist} logits ({device}{load_text(load, threads)})"
        for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "peak extra memory (MiB)")):
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------------------------ the files


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


VERSUS = ("trl_chunked",)  # baselines that get a table of every row's time against them (TRL: what RL users run)


def versus_lines(rows: list[dict], pool: list[dict] | None = None, base: str = "trl_chunked") -> list[str]:
    """A table of every row's time over `base`'s in the same row group (shape, mode, tokens, load, threads): the
    median of the interleaved rounds' ratios with its range (time_ratio); [] when no group has `base`."""
    timed = {(r["timing_id"], r["impl"]): r for r in (pool or rows)
             if r.get("status") == "ok" and r.get("timing_id")}
    bases = {tuple(r.get(k) for k in GROUP): r for r in rows if r.get("status") == "ok" and r["impl"] == base}
    out = []
    for row in rows:
        group = tuple(row.get(k) for k in GROUP)
        if row.get("status") != "ok" or row["impl"] in (base, "gemm") or group not in bases:
            continue
        ref = timed.get((row.get("timing_id"), base), bases[group])
        stats = time_ratio(row, ref)
        spread = (f"[{_sig(stats['min'])}, {_sig(stats['max'])}], {stats['pairs']} rounds" if stats["pairs"]
                  else "ratio of medians, not interleaved")
        where = load_text(row.get("load"), row.get("threads")).lstrip(", ") or "as found"
        if row.get("loadavg_1m") is not None:
            where += f" (load average {row['loadavg_1m']:.2f})"
        out.append(f"| {row['mode']} | {row['shape']} ({row['d']} x {row['v']}) | {row['n']} | {where} | "
                   f"{row['label']} | {_sig(stats['median'])}x {spread} | {_sig(row['time_ms'])} / "
                   f"{_sig(ref['time_ms'])} |")
    if not out:
        return []
    label = next(r["label"] for r in bases.values())
    return [f"Time against {label} in the same interleaved rounds (median of the per-round ratios, [min, max]):",
            "", "| mode | shape | N | conditions | implementation | time / " + label + " | median ms (row / "
            + label + ") |", "|---|---|---|---|---|---|---|"] + out + [""]


def section_text(out_dir: Path, rows: list[dict], metas: list[dict], title: str, plot_note: str | None,
                 relative_to: Path, ceilings: dict | None = None, pool: list[dict] | None = None) -> str:
    """The markdown of one run: machine, ceilings, goal verdicts, headline ratios, tables, plot."""
    lines = [f"### {title}", ""] + describe_runs(metas) + [""] + ceilings_lines(ceilings)
    lines += goal_table(rows)
    heads = headline(rows)
    if heads:
        lines += ["Headline (our backends against the naive path in the same run):", ""] + heads + [""]
    for base in VERSUS:
        lines += versus_lines(rows, pool, base)
    plot_path = out_dir / "plot.png"
    if plot_note is None and plot_path.exists():
        try:
            rel = os.path.relpath(plot_path, relative_to)
        except ValueError:
            rel = str(plot_path)
        lines += [f"![time and memory against tokens]({rel})", ""]
    elif plot_note:
        lines += [f"({plot_note})", ""]
    lines += NOTES + ["", markdown_tables(rows)]
    return "\n".join(lines)


def replace_section(key: str, text: str, path: Path | None = None) -> None:
    """Replace the section marked `key` in RESULTS.md (or `path`; append it when new)."""
    path = path or RESULTS_MD
    start, end = f"<!-- results:{key} -->", f"<!-- /results:{key} -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    current = path.read_text(encoding="utf-8") if path.exists() else (
        "# Benchmark results\n\nEvery number here was measured by `python -m benchmarks.suite` (see README.md in "
        "this folder) on the machine its section names; a rerun of the same preset on the same machine replaces "
        "its section.\n\n")
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _: block, current) if pattern.search(current) else current.rstrip() + "\n\n" + block
    path.write_text(new, encoding="utf-8")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_all(out_dir: Path, update_results_md: bool = False, title: str | None = None) -> None:
    """Rebuild results.{json,csv,md} and plot.png in out_dir; with update_results_md, replace the run's section of
    RESULTS.md (never with no measured row: an empty section would replace a real one)."""
    out_dir = Path(out_dir)
    jsonl = out_dir / "results.jsonl"
    every = load_rows(jsonl)
    rows = _order(derive(latest(every), pool=every))
    metas = load_meta(jsonl)
    meta = metas[-1] if metas else {}
    ceilings_path = out_dir / "ceilings.json"
    ceilings = json.loads(ceilings_path.read_text()) if ceilings_path.exists() else None
    title = title or f"{meta.get('device_name', '?')}: {meta.get('preset', '')} preset, {meta.get('date', '')}"
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "runs": metas, "rows": rows,
                                                      "ceilings": ceilings}, indent=1))
    write_csv(rows, out_dir / "results.csv")
    plot_note = plot(rows, out_dir / "plot.png")
    (out_dir / "results.md").write_text(section_text(out_dir, rows, metas, title, plot_note, out_dir, ceilings,
                                                     every) + "\n")
    print(f"wrote {out_dir}/results.{{jsonl,json,csv,md}}" + ("" if plot_note else " and plot.png"))
    if update_results_md and not any(r.get("status") == "ok" for r in rows):
        print(f"no measured rows in {jsonl}: {RESULTS_MD} left as it is")
    elif update_results_md:
        key = _slug(f"{meta.get('device', '')}-{meta.get('preset', '')}-{meta.get('device_name', '')}")
        replace_section(key, section_text(out_dir, rows, metas, title, plot_note, RESULTS_MD.parent, ceilings,
                                          every))
        print(f"updated {RESULTS_MD} section {key}")
