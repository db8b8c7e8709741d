"""Tables, plot and the RESULTS.md section, rebuilt from the rows a run streamed into OUT/results.jsonl.

Files written into OUT (eight at most, so that a GPU machine's output folder comes back whole):
results.jsonl (the rows, with one `_meta` record per run), results.json (rows + machine/versions), results.csv,
results.md (the tables) and plot.png (time and peak extra memory against tokens, per implementation).

Derived columns, per (device, dtype, shape, mode, tokens):
- pct_gemm = time(bare GEMM) / time(row): the fraction of the bare matrix-multiply rate the row reaches;
- mem_vs_naive = peak extra memory / the naive path's, time_vs_naive = time / the naive path's.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
KEY = ("device", "dtype", "impl", "mode", "shape", "n")
GROUP = ("device", "dtype", "shape", "mode", "n")
MODE_ORDER = ["fwd_bwd", "fwd_bwd_entropy", "pacs_loss", "logprob", "logprob_entropy"]
CSV_FIELDS = [
    "device", "device_name", "dtype", "mode", "shape", "d", "v", "n", "impl", "label", "family", "status",
    "time_ms", "time_ms_min", "tflops", "pct_gemm", "peak_extra_mib", "output_mib", "mem_vs_naive",
    "time_vs_naive", "err_logprob", "err_entropy", "err_dh", "err_dw", "acc_tokens", "flops", "warmup", "reps",
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
    """The measured rows of a results.jsonl (not the `_meta` records), in file order."""
    return [r for r in _records(path) if "_meta" not in r]


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


def derive(rows: list[dict]) -> list[dict]:
    """Add pct_gemm, mem_vs_naive and time_vs_naive to the ok rows (see the module docstring)."""
    ok = {tuple(r[k] for k in GROUP) + (r["impl"],): r for r in rows if r.get("status") == "ok"}
    for row in rows:
        if row.get("status") != "ok":
            continue
        group = tuple(row[k] for k in GROUP)
        gemm, naive = ok.get(group + ("gemm",)), ok.get(group + ("naive",))
        row["pct_gemm"] = 100 * gemm["time_ms"] / row["time_ms"] if gemm and row["impl"] != "gemm" else None
        if naive and row["impl"] not in ("naive", "gemm"):
            row["naive_time_ms"], row["naive_peak_extra_mib"] = naive["time_ms"], naive["peak_extra_mib"]
            row["time_vs_naive"] = row["time_ms"] / naive["time_ms"]
            row["mem_vs_naive"] = row["peak_extra_mib"] / naive["peak_extra_mib"] if naive["peak_extra_mib"] else None
    return rows


def _order(rows: list[dict]) -> list[dict]:
    from .impls import IMPLS

    impl_rank = {name: i for i, name in enumerate(IMPLS)}
    mode_rank = {name: i for i, name in enumerate(MODE_ORDER)}
    return sorted(rows, key=lambda r: (r["device"], r["dtype"], mode_rank.get(r["mode"], 99), r["d"], r["v"],
                                       r["n"], impl_rank.get(r["impl"], 99)))


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


def headline(rows: list[dict]) -> list[str]:
    """Memory and time ratios of our backends to the naive path, at the largest V and N of each mode."""
    lines = []
    largest: dict[tuple, tuple] = {}  # (device, dtype, mode) -> the largest (V, N) with a naive row
    for row in rows:
        if row.get("naive_time_ms") is not None:
            key = (row["device"], row["dtype"], row["mode"])
            largest[key] = max(largest.get(key, (0, 0)), (row["v"], row["n"]))
    for row in rows:
        if (row.get("family") == "ours" and row.get("naive_time_ms") is not None
                and largest[(row["device"], row["dtype"], row["mode"])] == (row["v"], row["n"])):
            lines.append(
                f"- {row['label']} vs naive, {row['mode']}, D={row['d']} V={row['v']} N={row['n']} ({row['dtype']}): "
                f"peak extra memory {_sig(row['peak_extra_mib'])} MiB vs {_sig(row['naive_peak_extra_mib'])} MiB "
                f"(ratio {_sig(row.get('mem_vs_naive'))}), time {_sig(row['time_ms'])} ms vs "
                f"{_sig(row['naive_time_ms'])} ms (ratio {_sig(row['time_vs_naive'])})"
            )
    return lines


def markdown_tables(rows: list[dict]) -> str:
    """One table per (device, dtype, mode); skipped rows summarized underneath."""
    out = []
    shown = [r for r in rows if r.get("status") != "skipped"]
    header = ("| shape (D x V) | N | implementation | ms | TFLOPS | % bare GEMM | peak extra MiB | mem / naive "
              "| time / naive | err logprob | err entropy | err dH | err dW | note |")
    groups: dict[tuple, list[dict]] = {}
    for row in shown:
        groups.setdefault((row["device"], row["dtype"], row["mode"]), []).append(row)
    for (device, dtype, mode), group in groups.items():
        out += [f"#### {mode} ({device}, {dtype})", "", header, "|" + "---|" * 14]
        for r in group:
            ok = r["status"] == "ok"
            note = r.get("note", "") if ok else f"**{r['status']}**: {r.get('note', '')}"
            out.append("| " + " | ".join([
                f"{r['shape']} ({r['d']} x {r['v']})", str(r["n"]), r["label"],
                _sig(r.get("time_ms")) if ok else "–", _sig(r.get("tflops")) if ok else "–",
                _sig(r.get("pct_gemm"), 2) if ok else "–", _sig(r.get("peak_extra_mib")) if ok else "–",
                _ratio(r.get("mem_vs_naive")), _ratio(r.get("time_vs_naive")),
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


def describe_meta(meta: dict) -> list[str]:
    """Machine and versions lines of a run."""
    return [
        f"- machine: {meta.get('device_name')} ({meta.get('device')}, torch threads {meta.get('torch_threads')})",
        f"- versions: Python {meta.get('python')}, torch {meta.get('torch')}"
        + (f" (CUDA {meta['cuda']})" if meta.get("cuda") else "")
        + f", triton {meta.get('triton')}, liger-kernel {meta.get('liger-kernel')}, "
        f"cut-cross-entropy {meta.get('cut-cross-entropy')}, pacs {meta.get('pacs')}"
        + (f" (commit {meta['commit']})" if meta.get("commit") else ""),
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
    "Columns: ms = median time; TFLOPS = (2*N*D*V no-grad, 8*N*D*V forward+backward) / time; % bare GEMM = "
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
        panels.setdefault((r["device"], r["dtype"], r["mode"], r["shape"], r["d"], r["v"]), []).append(r)
    keys = sorted(panels, key=lambda k: (-len({r["n"] for r in panels[k]}), MODE_ORDER.index(k[2])
                                         if k[2] in MODE_ORDER else 99))[:max_panels]
    if not keys:
        return "no plot: no measured rows"
    fig, axes = plt.subplots(len(keys), 2, figsize=(12, 3.6 * len(keys)), squeeze=False)
    for (ax_t, ax_m), key in zip(axes, keys):
        device, dtype, mode, shape, d, v = key
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
        title = f"{mode}, {shape} D={d} V={v}, {dtype} ({device})"
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


def section_text(out_dir: Path, rows: list[dict], metas: list[dict], title: str, plot_note: str | None,
                 relative_to: Path) -> str:
    """The markdown of one run: machine, headline ratios, tables, plot."""
    lines = [f"### {title}", ""] + describe_runs(metas) + [""]
    heads = headline(rows)
    if heads:
        lines += ["Headline (our backends against the naive path in the same run):", ""] + heads + [""]
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


def replace_section(key: str, text: str, path: Path = RESULTS_MD) -> None:
    """Replace the section marked `key` in RESULTS.md (append it when new)."""
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


def write_all(out_dir: Path, update_results_md: bool = True, title: str | None = None) -> None:
    """Rebuild results.{json,csv,md} and plot.png in out_dir; replace the run's section of RESULTS.md."""
    out_dir = Path(out_dir)
    jsonl = out_dir / "results.jsonl"
    rows = _order(derive(latest(load_rows(jsonl))))
    metas = load_meta(jsonl)
    meta = metas[-1] if metas else {}
    title = title or f"{meta.get('device_name', '?')}: {meta.get('preset', '')} preset, {meta.get('date', '')}"
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "runs": metas, "rows": rows}, indent=1))
    write_csv(rows, out_dir / "results.csv")
    plot_note = plot(rows, out_dir / "plot.png")
    (out_dir / "results.md").write_text(section_text(out_dir, rows, metas, title, plot_note, out_dir) + "\n")
    print(f"wrote {out_dir}/results.{{jsonl,json,csv,md}}" + ("" if plot_note else " and plot.png"))
    if update_results_md:
        key = _slug(f"{meta.get('device', '')}-{meta.get('preset', '')}-{meta.get('device_name', '')}")
        replace_section(key, section_text(out_dir, rows, metas, title, plot_note, RESULTS_MD.parent))
        print(f"updated {RESULTS_MD.relative_to(ROOT)} section {key}")
