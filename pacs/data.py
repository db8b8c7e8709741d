"""Problems from files (JSONL / JSON / parquet) or the built-in synthetic tasks, and the prompts built from them.

File rows are objects with a problem and an answer field (names configurable, e.g. ``--problem-key question``),
each a non-empty string or a number: ``{"question": "12+30=", "answer": "42"}``. A malformed file stops the run
before anything is built, with one line naming the file, the row (``file:LINE`` for JSON lines, ``file[i]`` for a
JSON array, ``file row i`` for parquet) and what was expected there.

Prompts: real models follow the PACS authors, ``"{problem} Please reason step by step, and put your final answer
within \\boxed{}."`` inside the tokenizer's chat template when it has one. The tiny model (``--model tiny``,
random-init with a character tokenizer) is trained from scratch and has no use for an instruction: its prompt is
the problem text alone, for the synthetic tasks and data files alike. With a data file its alphabet is printable
ASCII (`tasks.FILE_CHARS`); a problem or answer with any other character is refused by name.

Training draws its prompts from an endless stream of seeded per-epoch permutations (`batch_indices`), so a resumed
run continues the stream where it stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .tasks import FILE_CHARS, Problem, make_synthetic_split

PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."


def _kind(value) -> str:
    """A JSON-style name of a value for an error message: 'a number (5)', "a string 'oops'", 'null', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string {value[:40]!r}"
    if isinstance(value, (list, tuple)):
        return f"an array of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _plain(value):
    """numpy / pandas scalars (parquet cells) as Python values; missing cells (NaN, pd.NA, NaT) as None."""
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) == 0:  # numpy scalar
        value = value.tolist()
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "tolist"):  # an array cell
        return value.tolist()
    return value


def _field_text(where: str, key: str, value) -> str:
    """A problem / answer cell as text: a non-empty string or a finite number; anything else is a ValueError."""
    value = _plain(value)
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    got = "an empty string" if isinstance(value, str) else _kind(value)
    raise ValueError(f"{where}: {key!r} is {got}; expected a non-empty string or a number")


def _read_rows(path: Path) -> list[tuple[str, object]]:
    """(location, row) of every row of a .jsonl / .json / .parquet file; syntax errors as one-line ValueErrors."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError:
            raise ValueError("reading parquet needs pandas and pyarrow: pip install -e '.[hf]'") from None
        try:
            frame = pd.read_parquet(path)
        except ImportError as err:
            raise ValueError(f"reading parquet needs pyarrow: pip install -e '.[hf]' ({err})") from None
        except Exception as err:  # pyarrow's errors for a corrupt or non-parquet file
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path}: not a readable parquet file ({first})") from None
        return [(f"{path} row {i}", row) for i, row in enumerate(frame.to_dict(orient="records"))]
    if suffix not in (".jsonl", ".json"):
        raise ValueError(f"unsupported data file type {suffix!r} for {path}: use .jsonl, .json or .parquet")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {err.start})") from None
    if suffix == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as err:
            if text.lstrip().startswith("["):
                raise ValueError(f"{path}: not a valid JSON array (line {err.lineno}, column {err.colno}: "
                                 f"{err.msg})") from None
            document = None  # perhaps one object per line: read as JSON lines below
        if isinstance(document, list):
            return [(f"{path}[{i}]", row) for i, row in enumerate(document)]
        if isinstance(document, dict):
            raise ValueError(f"{path}: expected a JSON array of problem objects (or one object per line), got one "
                             f"object with keys {sorted(document)[:8]}")
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}); expected one JSON object per "
                                 "line") from None
    return rows


def _check_alphabet(where: str, key: str, text: str, alphabet: str) -> None:
    unknown = sorted({c for c in text if c not in alphabet})
    if unknown:
        raise ValueError(f"{where}: {key!r} has characters the tiny model's tokenizer cannot encode: {unknown} (its "
                         "alphabet is printable ASCII); use a Hugging Face model (--model) for other text")


def load_problems(path: str | Path, *, problem_key: str = "problem", answer_key: str = "answer",
                  limit: int | None = None, alphabet: str | None = None) -> list[Problem]:
    """Rows of a .jsonl / .json / .parquet file as Problems. A malformed file raises one ValueError naming the
    file, the row and what was expected (an object with both keys, each a non-empty string or a number).
    `alphabet`: the characters a character tokenizer can encode; a problem or answer with others is refused."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    problems = []
    rows = _read_rows(path)
    for where, row in rows[:limit] if limit else rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with keys {problem_key!r} and {answer_key!r}, got "
                             f"{_kind(row)}")
        missing = [k for k in (problem_key, answer_key) if k not in row]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}; it has {sorted(row)}. "
                             f"Set --problem-key / --answer-key to the names used in the file.")
        problem, answer = (_field_text(where, k, row[k]) for k in (problem_key, answer_key))
        if alphabet is not None:
            _check_alphabet(where, problem_key, problem, alphabet)
            _check_alphabet(where, answer_key, answer, alphabet)
        problems.append(Problem(problem, answer))
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems


def load_dataset(spec: str, *, split_seed: int, level: int, n_train: int, n_test: int, problem_key: str,
                 answer_key: str, test_path: str | None = None, alphabet: str | None = None):
    """(train, test) problems: `spec` is "synthetic:TASK" or a file path (test from `test_path`, else a 10% split)."""
    if spec.startswith("synthetic:"):
        return make_synthetic_split(spec.split(":", 1)[1], level=level, n_train=n_train, n_test=n_test,
                                    seed=split_seed)
    keys = dict(problem_key=problem_key, answer_key=answer_key, alphabet=alphabet)
    problems = load_problems(spec, **keys)
    if test_path:
        return problems, load_problems(test_path, **keys)
    if len(problems) < 2:
        raise ValueError(f"{spec} holds {len(problems)} problem: at least 2 are needed (the first 10%, at least one, "
                         "is held out), or give the held-out problems with --test-data")
    n = max(1, len(problems) // 10)
    return problems[n:], problems[:n]


def load_data(cfg):
    """The (train, test) problems of a TrainConfig, every row checked (for the tiny model, against its alphabet)."""
    alphabet = FILE_CHARS if cfg.model == "tiny" and not cfg.synthetic else None
    return load_dataset(cfg.data, split_seed=cfg.split_seed, level=cfg.level, n_train=cfg.n_train, n_test=cfg.n_test,
                        problem_key=cfg.problem_key, answer_key=cfg.answer_key, test_path=cfg.test_data,
                        alphabet=alphabet)


def format_prompt(tokenizer, problem: Problem, *, synthetic: bool, use_chat_template: bool = True) -> list[int]:
    """Token ids of the prompt for one problem. `synthetic`: the prompt is the problem text alone (the synthetic
    tasks, and the tiny model on any data); otherwise the problem and the PACS authors' instruction, in the chat
    template when `use_chat_template` and the tokenizer has one."""
    if synthetic:
        return tokenizer.encode(problem.prompt)
    text = f"{problem.prompt} {PROMPT_SUFFIX}"
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer.encode(text)


def batch_indices(n_items: int, batch: int, position: int, seed: int) -> list[int]:
    """Items position..position+batch of an endless stream of seeded per-epoch permutations (resumable)."""
    out = []
    while len(out) < batch:
        epoch, offset = divmod(position, n_items)
        order = np.random.default_rng(seed + epoch).permutation(n_items)
        take = min(batch - len(out), n_items - offset)
        out.extend(order[offset:offset + take].tolist())
        position += take
    return out
