"""Problems from files (JSONL / parquet) or the built-in synthetic tasks, and the prompts built from them.

File rows need a problem and an answer field (names configurable, e.g. ``--problem-key question``). Real-model
prompts follow the PACS authors: ``"{problem} Please reason step by step, and put your final answer within
\\boxed{}."`` inside the tokenizer's chat template when it has one.
"""

from __future__ import annotations

import json
from pathlib import Path

from .tasks import Problem, make_synthetic_split

PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."


def load_problems(path: str | Path, *, problem_key: str = "problem", answer_key: str = "answer",
                  limit: int | None = None) -> list[Problem]:
    """Rows of a .jsonl / .json / .parquet file as Problems; a missing key raises ValueError naming it."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError:
            raise ValueError("reading parquet needs pandas and pyarrow: pip install -e '.[hf]'") from None
        rows = pd.read_parquet(path).to_dict(orient="records")
    elif suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    else:
        raise ValueError(f"unsupported data file type {suffix!r} for {path}: use .jsonl, .json or .parquet")
    problems = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        missing = [k for k in (problem_key, answer_key) if k not in row]
        if missing:
            raise ValueError(f"{path} row {i}: missing key(s) {missing}; it has {sorted(row)}. "
                             f"Set --problem-key / --answer-key to the names used in the file.")
        problems.append(Problem(str(row[problem_key]), str(row[answer_key])))
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems


def load_dataset(spec: str, *, split_seed: int, level: int, n_train: int, n_test: int, problem_key: str,
                 answer_key: str, test_path: str | None = None):
    """(train, test) problems: `spec` is "synthetic:TASK" or a file path (test from `test_path`, else a 10% split)."""
    if spec.startswith("synthetic:"):
        return make_synthetic_split(spec.split(":", 1)[1], level=level, n_train=n_train, n_test=n_test,
                                    seed=split_seed)
    problems = load_problems(spec, problem_key=problem_key, answer_key=answer_key)
    if test_path:
        return problems, load_problems(test_path, problem_key=problem_key, answer_key=answer_key)
    n = max(1, len(problems) // 10)
    return problems[n:], problems[:n]


def format_prompt(tokenizer, problem: Problem, *, synthetic: bool, use_chat_template: bool = True) -> list[int]:
    """Token ids of the prompt for one problem."""
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
