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
Time ratios of rows timed interleaved in one group (the same `timing_id`, runner.Runner) are the median of the
per-round ratios (measure.ratio_stats), with their minimum and maximum (`<name>_min`, `<name>_max`) and the number
of pairs (`<name>_pairs`); rows from different runs fall back to the ratio of their medians (`_pairs` 0).
The goals are checked on the measured rows, each PASS/FAIL with its numbers; the markdown is tables.py's.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

from .tables import NOTES, ceilings_lines, describe_runs, goal_table, headline, load_text, markdown_tables, sig

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
        spread = (f"[{sig(stats['min'])}, {sig(stats['max'])}], {stats['pairs']} rounds" if stats["pairs"]
                  else "ratio of medians, not interleaved")
        where = load_text(row.get("load"), row.get("threads")).lstrip(", ") or "as found"
        if row.get("loadavg_1m") is not None:
            where += f" (load average {row['loadavg_1m']:.2f})"
        out.append(f"| {row['mode']} | {row['shape']} ({row['d']} x {row['v']}) | {row['n']} | {where} | "
                   f"{row['label']} | {sig(stats['median'])}x {spread} | {sig(row['time_ms'])} / "
                   f"{sig(ref['time_ms'])} |")
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
