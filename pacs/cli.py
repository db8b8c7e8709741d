"""The `pacs` command line.

    pacs train --preset demo                 # the out-of-the-box CPU job (tiny model, synthetic task)
    pacs train --model Qwen/Qwen2.5-0.5B --data train.jsonl --algo pacs --beta 1.0
    pacs eval --run runs/demo-pacs --eval-n 16   # pass@k of a run's latest checkpoint
    pacs plot runs/demo-pacs                 # PNG curves
    pacs verify --gold '1/2' --response '... \\boxed{0.5}'

A user error (bad option, missing or malformed file, a configuration the losses reject, a run directory already
in use) ends in `pacs COMMAND: error: ...` and exit status 2, before any work; -v shows its traceback too.
Ctrl-C ends in one line too: during `pacs train` the first one stops after the current step with a checkpoint
(exit status 0), a second one stops at once (exit status 130, like Ctrl-C in the other commands).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

# What a subcommand raises for a user error: bad values, missing or malformed files, a missing optional package.
USER_ERRORS = (ValueError, OSError, ImportError)


def _run_verify(args: argparse.Namespace) -> int:
    from pacs.verify import verify, verify_batch

    if args.timeout is not None and not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.file is None:
        if args.gold is None or args.response is None:
            raise ValueError("give --gold and --response, or --file")
        verdict = verify(args.response, args.gold, timeout=args.timeout, last_number=not args.no_last_number)
        print(verdict)
        return 0 if verdict else 1

    import json
    from pathlib import Path

    if not Path(args.file).is_file():
        raise ValueError(f"--file {args.file} does not exist")
    pairs = []
    with open(args.file, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{args.file}:{lineno}: not valid JSON ({err.msg})") from None
            missing = [k for k in (args.response_key, args.gold_key) if not isinstance(row, dict) or k not in row]
            if missing:
                raise ValueError(f"{args.file}:{lineno}: missing key(s) {missing} (set --response-key / --gold-key)")
            pairs.append((str(row[args.response_key]), str(row[args.gold_key])))
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
    cmd.add_argument("-v", "--verbose", action="store_true", help="show the traceback of an error")
    cmd.set_defaults(func=_run_verify)


def _setup_logging(verbose: bool) -> None:
    import logging

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _run_train(args: argparse.Namespace) -> int:
    from pacs.checkpoint import latest_checkpoint
    from pacs.options import config_from_args
    from pacs.trainer import train

    cfg = config_from_args(args).validate()  # before logging, models or data: errors come first
    _setup_logging(args.verbose)
    try:
        run_dir = train(cfg)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one stops after a checkpoint)
        ckpt = latest_checkpoint(cfg.out_dir)
        raise KeyboardInterrupt(f"the last checkpoint is {ckpt} (continue with --resume)" if ckpt else
                                "no checkpoint was written") from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 only
        print(f"run directory: {run_dir}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from pacs.config import TrainConfig
    from pacs.evaluate import run_eval
    from pacs.metrics import RunLog
    from pacs.options import config_from_args
    from pacs.session import setup

    cfg = config_from_args(args)
    ckpt = None
    if args.run:
        run = Path(args.run)
        if not (run / "config.json").exists():
            raise ValueError(f"--run {run} has no config.json (not a run directory)")
        saved = json.loads((run / "config.json").read_text())
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        explicit = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                    if getattr(args, f.name, None) is not None}
        ckpt = _eval_checkpoint(run, args.checkpoint)
        # The run's config, its weights from the checkpoint, flags on top; results go into the run directory. A
        # LoRA run's checkpoint holds adapters: its base (the run's own --init-checkpoint) is named in lora.json.
        cfg = TrainConfig(**{**{k: v for k, v in saved.items() if k in fields}, **explicit,
                             "init_checkpoint": str(ckpt), "out_dir": str(run)})
    elif args.checkpoint:
        raise ValueError("--checkpoint needs --run (or use --init-checkpoint)")
    cfg.validate()
    if not args.tag or Path(args.tag).name != args.tag:
        raise ValueError(f"--tag must be a plain file name, got {args.tag!r}")
    _setup_logging(args.verbose)
    what = ckpt or cfg.init_checkpoint
    print(f"evaluating {what if what else f'--model {cfg.model} as it is (no checkpoint)'}", flush=True)
    session = setup(cfg)  # the results go into OUT_DIR/eval, no metrics rows
    result = run_eval(session, args.tag, RunLog(session, metrics=False),
                      meta={"checkpoint": str(what) if what else None})
    print(f"wrote {Path(cfg.out_dir) / 'eval' / (args.tag + '.json')}")
    return 0 if result["problems"] else 1


def _eval_checkpoint(run, checkpoint: str | None):
    """The checkpoint `pacs eval --run RUN [--checkpoint C]` evaluates: C (a directory, or a checkpoint's name in
    RUN/checkpoints), else RUN's latest."""
    from pathlib import Path

    from pacs.checkpoint import checkpoint_weights, latest_checkpoint

    if checkpoint is None:
        latest = latest_checkpoint(run)
        if latest is None:
            raise ValueError(f"--run {run} holds no checkpoint")
        return latest
    for candidate in (Path(checkpoint), run / "checkpoints" / checkpoint):
        if checkpoint_weights(candidate) is not None:
            return candidate
    names = sorted(p.name for p in (run / "checkpoints").glob("*_*") if checkpoint_weights(p) is not None)
    raise ValueError(f"--checkpoint {checkpoint}: no such checkpoint (no model.pt or adapters.pt there or in "
                     f"{run / 'checkpoints'}); {run} has {', '.join(names) if names else 'none'}")


def _run_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pacs.plot import compare_runs, plot_run

    for run_dir in args.run_dirs:  # all of them before any plot
        if not (Path(run_dir) / "metrics.jsonl").is_file():
            raise ValueError(f"{run_dir} has no metrics.jsonl: is it a run directory?")
    if args.compare and not Path(args.compare).resolve().parent.is_dir():
        raise ValueError(f"--compare {args.compare}: directory {Path(args.compare).parent} does not exist")
    for run_dir in args.run_dirs:
        for path in plot_run(run_dir):
            print(f"wrote {path}")
    if args.compare:
        print(f"wrote {compare_runs(args.run_dirs, args.compare)}")
    return 0


def _add_train(subparsers: argparse._SubParsersAction, preset: str | None) -> None:
    from pacs.options import add_train_arguments

    cmd = subparsers.add_parser("train", help="train with PACS (or GRPO / RLOO)",
                                description="Train a causal LM with PACS, GRPO or RLOO on verifiable rewards.")
    add_train_arguments(cmd, preset=preset)
    cmd.add_argument("-v", "--verbose", action="store_true", help="debug logging; the traceback of an error")
    cmd.set_defaults(func=_run_train)


def _add_eval(subparsers: argparse._SubParsersAction, preset: str | None) -> None:
    from pacs.options import add_train_arguments

    cmd = subparsers.add_parser("eval", help="pass@k of a model or of a run's checkpoint",
                                description="Sample --eval-n answers per held-out problem and report unbiased "
                                            "pass@k for k = 1, 2, 4, ..., n (table on screen, JSON on disk).")
    cmd.add_argument("--run", help="run directory: its config and latest checkpoint (flags override the config)")
    cmd.add_argument("--checkpoint", help="a checkpoint of --run: its directory or its name in RUN/checkpoints "
                     "(e.g. step_000100; default: the latest)")
    cmd.add_argument("--tag", default="pacs_eval", help="name of the result: OUT_DIR/eval/TAG.json (default: pacs_eval)")
    add_train_arguments(cmd, preset=preset, eval_only=True)
    cmd.add_argument("-v", "--verbose", action="store_true", help="debug logging; the traceback of an error")
    cmd.set_defaults(func=_run_eval)


def _add_plot(subparsers: argparse._SubParsersAction) -> None:
    cmd = subparsers.add_parser("plot", help="PNG curves of runs", description="Write RUN_DIR/plots/*.png for each "
                                "run, and with --compare one PNG of their pass@1 and reward curves side by side.")
    cmd.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
    cmd.add_argument("--compare", metavar="PNG", help="also write a comparison of the runs to this file")
    cmd.add_argument("-v", "--verbose", action="store_true", help="show the traceback of an error")
    cmd.set_defaults(func=_run_plot)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `pacs` parser; with the command line `argv` at hand, `--preset NAME --help` shows NAME's values as the
    defaults."""
    from pacs.options import preset_in

    preset = preset_in(argv)
    parser = argparse.ArgumentParser(prog="pacs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(subparsers, preset)
    _add_eval(subparsers, preset)
    _add_plot(subparsers)
    _add_verify(subparsers)
    return parser


def _close_progress_bars() -> None:
    tqdm_class = getattr(sys.modules.get("tqdm.std"), "tqdm", None)
    for bar in list(getattr(tqdm_class, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; its exit status (2 for a user error, reported like argparse reports bad flags)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if args.verbose:
            traceback.print_exc()
        print(f"{parser.prog} {args.command}: error: {str(err) or type(err).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        _close_progress_bars()  # the line below starts on a line of its own
        if args.verbose:
            traceback.print_exc()
        print(f"{parser.prog} {args.command}: interrupted" + (f"; {err}" if str(err) else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
