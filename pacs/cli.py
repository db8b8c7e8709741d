"""The `pacs` command line.

    pacs train --preset demo                 # the out-of-the-box CPU job (tiny model, synthetic task)
    pacs train --model Qwen/Qwen2.5-0.5B --data train.jsonl --algo pacs --beta 1.0
    pacs eval --run runs/demo --eval-n 16    # pass@k of a run's latest checkpoint
    pacs plot runs/demo                      # PNG curves
    pacs verify --gold '1/2' --response '... \\boxed{0.5}'
"""

from __future__ import annotations

import argparse
import sys


def _run_verify(args: argparse.Namespace) -> int:
    from pacs.verify import verify, verify_batch

    if args.file is None:
        if args.gold is None or args.response is None:
            raise SystemExit("pacs verify: give --gold and --response, or --file")
        verdict = verify(args.response, args.gold, timeout=args.timeout, last_number=not args.no_last_number)
        print(verdict)
        return 0 if verdict else 1

    import json

    with open(args.file, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    pairs = [(str(row[args.response_key]), str(row[args.gold_key])) for row in rows]
    verdicts = verify_batch(
        pairs, workers=args.workers, timeout=args.timeout, last_number=not args.no_last_number, progress=not args.quiet
    )
    correct = sum(verdicts)
    accuracy = correct / len(verdicts) if verdicts else 0.0
    print(f"accuracy: {accuracy:.4f} ({correct}/{len(verdicts)} correct, {len(verdicts) - correct} incorrect)")
    return 0


def _add_verify(subparsers: argparse._SubParsersAction) -> None:
    cmd = subparsers.add_parser(
        "verify",
        help="check math answers against gold answers",
        description="Print True/False for one pair (exit status 0/1), or the accuracy over a JSONL file.",
    )
    cmd.add_argument("--gold", help="gold answer, e.g. '1/2' or '\\frac{1}{2}'")
    cmd.add_argument("--response", help="model response (its final answer is extracted)")
    cmd.add_argument("--file", help="JSONL file with one response/gold pair per line")
    cmd.add_argument("--response-key", default="response", help="JSONL key of the response (default: response)")
    cmd.add_argument("--gold-key", default="gold", help="JSONL key of the gold answer (default: gold)")
    cmd.add_argument("--timeout", type=float, default=5.0, help="seconds allowed per pair (default: 5)")
    cmd.add_argument("--workers", type=int, default=None, help="worker processes for --file (default: CPU count)")
    cmd.add_argument("--no-last-number", action="store_true", help="do not fall back to the last number")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    cmd.set_defaults(func=_run_verify)


def _setup_logging(verbose: bool) -> None:
    import logging

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _run_train(args: argparse.Namespace) -> int:
    from pacs.config import config_from_args
    from pacs.trainer import train

    _setup_logging(args.verbose)
    run_dir = train(config_from_args(args))
    print(f"run directory: {run_dir}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from pacs.checkpoint import latest_checkpoint
    from pacs.config import TrainConfig, config_from_args
    from pacs.trainer import run_eval, setup

    _setup_logging(args.verbose)
    cfg = config_from_args(args)
    if args.run:
        run = Path(args.run)
        if not (run / "config.json").exists():
            raise SystemExit(f"pacs eval: {run} has no config.json (not a run directory)")
        saved = json.loads((run / "config.json").read_text())
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        explicit = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                    if getattr(args, f.name, None) is not None}
        ckpt = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(run)
        if ckpt is None:
            raise SystemExit(f"pacs eval: no checkpoint in {run}")
        # The run's config, its weights from the checkpoint, flags on top; results go into the run directory.
        cfg = TrainConfig(**{**{k: v for k, v in saved.items() if k in fields}, **explicit,
                             "init_checkpoint": str(ckpt), "out_dir": str(run)})
    result = run_eval(setup(cfg), args.tag, log=lambda row: None)
    print(f"wrote {Path(cfg.out_dir) / 'eval' / (args.tag + '.json')}")
    return 0 if result["problems"] else 1


def _run_plot(args: argparse.Namespace) -> int:
    from pacs.plot import compare_runs, plot_run

    for run_dir in args.run_dirs:
        for path in plot_run(run_dir):
            print(f"wrote {path}")
    if args.compare:
        print(f"wrote {compare_runs(args.run_dirs, args.compare)}")
    return 0


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    from pacs.config import add_train_arguments

    cmd = subparsers.add_parser("train", help="train with PACS (or GRPO / RLOO)",
                                description="Train a causal LM with PACS, GRPO or RLOO on verifiable rewards.")
    add_train_arguments(cmd)
    cmd.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    cmd.set_defaults(func=_run_train)


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    from pacs.config import add_train_arguments

    cmd = subparsers.add_parser("eval", help="pass@k of a model or of a run's checkpoint",
                                description="Sample --eval-n answers per held-out problem and report unbiased "
                                            "pass@k for k = 1, 2, 4, ..., n (table on screen, JSON on disk).")
    cmd.add_argument("--run", help="run directory: its config and latest checkpoint (flags override the config)")
    cmd.add_argument("--checkpoint", help="a specific checkpoint directory of --run")
    cmd.add_argument("--tag", default="pacs_eval", help="name of the result: OUT_DIR/eval/TAG.json (default: pacs_eval)")
    add_train_arguments(cmd)
    cmd.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    cmd.set_defaults(func=_run_eval)


def _add_plot(subparsers: argparse._SubParsersAction) -> None:
    cmd = subparsers.add_parser("plot", help="PNG curves of runs", description="Write RUN_DIR/plots/*.png for each "
                                "run, and with --compare one PNG of their pass@1 and reward curves side by side.")
    cmd.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
    cmd.add_argument("--compare", metavar="PNG", help="also write a comparison of the runs to this file")
    cmd.set_defaults(func=_run_plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pacs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_plot(subparsers)
    _add_verify(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
