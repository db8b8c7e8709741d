"""Agreement of pacs.verify and math-verify with the expected labels of a gold/response pairs file.

    python studies/verifier_agreement.py [--pairs tests/data/verify_pairs.jsonl] [--show]

Prints a markdown table (agreement, exceptions, slowest pair) and a per-source breakdown (``--show`` also lists the
pairs pacs disagrees on). math-verify is called
as its users call it: ``verify(parse(gold), parse(response))`` with default configurations, and once more with
bare gold answers wrapped in ``$...$`` (its documented requirement); it is needed only here
(``pip install pacs[bench]``), never by pacs at runtime.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PAIRS = ROOT / "tests" / "data" / "verify_pairs.jsonl"
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def load_pairs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _math_verify_judge(wrap_gold: bool = False) -> Callable[[str, str], bool] | None:
    """math-verify as documented; with ``wrap_gold``, a bare gold is first put in ``$...$`` so that it is found."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None

    def judge(response: str, gold: str) -> bool:
        if wrap_gold and "$" not in gold and "\\boxed" not in gold:
            gold = f"${gold}$"
        return bool(verify(parse(gold), parse(response)))

    return judge


def _pacs_judge() -> Callable[[str, str], bool]:
    from pacs.verify import verify

    return lambda response, gold: verify(response, gold)


def score(judge: Callable[[str, str], bool], rows: list[dict]) -> dict:
    """Agreement with the expected labels, exceptions (counted as wrong), slowest pair and per-source agreement."""
    agree, exceptions, slowest = 0, 0, 0.0
    by_source: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    start = time.perf_counter()
    for row in rows:
        t0 = time.perf_counter()
        try:
            ok = judge(row["response"], row["gold"]) == row["expected"]
        except Exception:
            exceptions += 1
            ok = False
        slowest = max(slowest, time.perf_counter() - t0)
        agree += ok
        by_source[row["source"]][0] += ok
        by_source[row["source"]][1] += 1
    return {
        "agree": agree,
        "n": len(rows),
        "exceptions": exceptions,
        "slowest": slowest,
        "total": time.perf_counter() - start,
        "by_source": dict(by_source),
    }


def agreement_table(rows: list[dict]) -> tuple[str, dict[str, dict]]:
    results = {"pacs.verify": score(_pacs_judge(), rows)}
    mv = _math_verify_judge()
    if mv is not None:
        from importlib.metadata import version

        name = f"math-verify {version('math-verify')}"
        results[name] = score(mv, rows)
        results[f"{name}, gold wrapped in $...$"] = score(_math_verify_judge(wrap_gold=True), rows)
    lines = [
        "| verifier | agreement | agreeing / pairs | exceptions | slowest pair (s) | total (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {100 * r['agree'] / r['n']:.1f}% | {r['agree']} / {r['n']} | {r['exceptions']} "
            f"| {r['slowest']:.2f} | {r['total']:.1f} |"
        )
    lines += ["", "| source | pairs | " + " | ".join(results) + " |", "| --- | --- |" + " --- |" * len(results)]
    for source in sorted(results["pacs.verify"]["by_source"]):
        n = results["pacs.verify"]["by_source"][source][1]
        cells = [f"{r['by_source'][source][0]}" for r in results.values()]
        lines.append(f"| {source} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS)
    parser.add_argument("--show", action="store_true", help="list the pairs pacs.verify disagrees on")
    args = parser.parse_args()
    rows = load_pairs(args.pairs)
    table, _ = agreement_table(rows)
    print(table)
    if args.show:
        judge = _pacs_judge()
        print("\npacs.verify disagrees with the expected label on:")
        for k, row in enumerate(rows, 1):
            if judge(row["response"], row["gold"]) != row["expected"]:
                print(f"- line {k} ({row['source']}): expected {row['expected']}, gold {row['gold'][:80]!r}, "
                      f"response {row['response'][-80:]!r}")


if __name__ == "__main__":
    main()
