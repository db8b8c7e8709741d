"""The options of `pacs train` and `pacs eval`: one flag per TrainConfig field, and config files.

    pacs train --preset demo --config my.yaml --lr 3e-4     # defaults < preset < config file < flags

Each field NAME is the flag --NAME (underscores as dashes), in its help group, with the field's help and default; a
bool field takes --NAME [BOOL] and --no-NAME. A config file (YAML, TOML or JSON) maps field names to values.
Former names (config.ALIASES) work as flags and keys too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .config import ALIASES, PRESETS, TrainConfig, field_kind, flag

def load_config_file(path: str) -> dict:
    """A config file's {field: value}; ValueError for a missing or malformed file or an unknown key."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"config file {p} does not exist")
    if p.suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ValueError(f"config file must be .yaml, .yml, .toml or .json, got {p}")
    if not p.is_file():
        raise ValueError(f"config file {p} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {p}: not UTF-8 text (byte {err.start})") from None
    data = _parse_config_text(p, text)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of TrainConfig keys, got {type(data).__name__}")
    unknown = sorted(set(data) - known - set(ALIASES))
    if unknown:
        raise ValueError(f"unknown key(s) in {p}: {unknown}")
    for former, name in ALIASES.items():
        if former in data:
            value = data.pop(former)
            if name in data and data[name] != value:
                raise ValueError(f"config file {p} sets both {name} and {former} (its former name), to different "
                                 "values: keep one")
            data[name] = value
    for f in dataclasses.fields(TrainConfig):
        value = data.get(f.name)
        if isinstance(value, str) and field_kind(f) is float:  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                data[f.name] = float(value)
            except ValueError:
                pass  # validate() names it
        elif f.name == "threads" and isinstance(value, int) and not isinstance(value, bool):
            data[f.name] = str(value)  # threads: 2 in a file means --threads 2
    return data


def _parse_config_text(p: Path, text: str):
    """The YAML / TOML / JSON document of a config file; a syntax error is one ValueError line naming the file,
    the line and column, and what the parser expected."""
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            what = " ".join(str(getattr(err, "problem", None) or err).split())
            raise ValueError(f"config file {p}: not valid YAML ({where}{what}); expected 'key: value' lines with "
                             "TrainConfig keys") from None
    if p.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {p}: not valid TOML ({' '.join(str(err).split())}); expected "
                             "'key = value' lines with TrainConfig keys") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {p}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                         "expected an object of TrainConfig keys") from None


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


PRESET_SUMMARIES = {
    "demo": "the out-of-the-box CPU job: a tiny model, a supervised warm-up to 40% probe pass@1, then 200 RL steps "
            "on synthetic arithmetic (5 to 16 minutes on 2 CPU cores, by seed)",
    "smoke": "a few seconds: a very small model, 3 RL steps; for tests and torchrun checks",
}


def preset_in(argv: list[str] | None) -> str | None:
    """The --preset NAME (or --preset=NAME) of a command line, if it names a preset: help then shows its values."""
    argv = list(argv or [])
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--preset="):
            name = arg.split("=", 1)[1]
        else:
            continue
        if name in PRESETS:
            return name
    return None


def _shown_default(f: dataclasses.Field, preset: str | None) -> str:
    """' (default: X)' for a flag's help: the preset's value when --preset sets it; nothing where the help already
    says what an unset value means."""
    if preset is not None and f.name in PRESETS[preset]:
        return f" (default: {PRESETS[preset][f.name]}, from --preset {preset}; without it: {f.default})"
    if f.default is None or "default:" in f.metadata["help"]:
        return ""
    return f" (default: {f.default})"


def add_train_arguments(parser: argparse.ArgumentParser, *, preset: str | None = None,
                        eval_only: bool = False) -> None:
    """One flag per TrainConfig field (--snake-case), grouped; defaults left as None so precedence can apply.
    `preset`: the help shows that preset's values as the defaults; `eval_only`: the fields `pacs eval` uses."""
    presets = "; ".join(f"{name}: {text}" for name, text in PRESET_SUMMARIES.items())
    preset_help = f"start from a named preset ({presets}). `--preset NAME --help` shows its values as the defaults"
    parser.add_argument("--preset", choices=sorted(PRESETS), help=preset_help.replace("%", "%%"))
    parser.add_argument("--config", help="YAML, TOML or JSON file with TrainConfig keys (the flags' names with _)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        if eval_only and not f.metadata["eval"]:
            continue
        group = groups.setdefault(f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        kind = field_kind(f)
        # argparse %-formats help strings: a literal % must reach it as %%
        text = (f.metadata["help"] + _shown_default(f, preset)).replace("%", "%%")
        kwargs = dict(default=None, help=text, dest=f.name)
        if kind is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs.update(type=kind)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        group.add_argument(flag(f.name), **kwargs)
        if kind is bool:  # --no-NAME: the same as --NAME false
            group.add_argument("--no-" + flag(f.name)[2:], dest=f.name, action="store_const", const=False,
                               default=None, help=f"same as {flag(f.name)} false")
        for former in (a for a, name in ALIASES.items() if name == f.name):
            group.add_argument(flag(former), **{**kwargs, "help": f"the former name of {flag(f.name)}"})
            if kind is bool:
                group.add_argument("--no-" + flag(former)[2:], dest=f.name, action="store_const", const=False,
                                   default=None, help=f"the former name of --no-{flag(f.name)[2:]}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed flags: the preset's values, the config file's over them, the flags' over both."""
    values: dict = {}
    if getattr(args, "preset", None):
        values.update(PRESETS[args.preset])
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return TrainConfig(**values)
