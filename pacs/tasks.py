"""Built-in synthetic verifiable tasks and a character-level tokenizer for them.

The out-of-the-box job needs a task whose answers a verifier can check exactly, that a tiny model can learn on a
CPU in minutes, and that ships with the code (no download). A task family of integer arithmetic and linear
equations fits: each problem is a short string such as ``"47+385="`` or ``"3*x+5=26;x="`` whose answer is an
integer, with difficulty levels and a seeded train/test split that never share a problem.

    train, test = make_synthetic_split("arithmetic", level=2, n_train=1000, n_test=100, seed=0)
    train[0].prompt, train[0].answer      # e.g. ("47+38=", "85")
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

TASKS = ("arithmetic", "linear", "mixed")


@dataclass(frozen=True)
class Problem:
    prompt: str  # the text the model is conditioned on
    answer: str  # the gold answer, checked by the verifier


def _arithmetic(rng: random.Random, level: int) -> Problem:
    digits = {1: 1, 2: 2, 3: 3}.get(level, 4)
    hi = 10**digits - 1
    op = rng.choice("+-" if level < 3 else "+-*")
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    if op == "*":
        b = rng.randint(0, 9)
        return Problem(f"{a}*{b}=", str(a * b))
    if op == "-":
        a, b = max(a, b), min(a, b)  # non-negative results keep the first levels simple
        return Problem(f"{a}-{b}=", str(a - b))
    return Problem(f"{a}+{b}=", str(a + b))


def _linear(rng: random.Random, level: int) -> Problem:
    hi = {1: 9, 2: 20, 3: 50}.get(level, 99)
    x = rng.randint(0, hi)
    a = rng.randint(1, 9 if level < 3 else 20)
    b = rng.randint(0, hi)
    return Problem(f"{a}*x+{b}={a * x + b};x=", str(x))


def make_problem(task: str, rng: random.Random, level: int) -> Problem:
    if task == "arithmetic":
        return _arithmetic(rng, level)
    if task == "linear":
        return _linear(rng, level)
    if task == "mixed":
        return (_arithmetic if rng.random() < 0.5 else _linear)(rng, level)
    raise ValueError(f"unknown synthetic task {task!r}; choose one of {TASKS}")


def make_synthetic_split(task: str, *, level: int, n_train: int, n_test: int, seed: int):
    """Disjoint (train, test) lists of distinct problems, reproducible from `seed`."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {TASKS}")
    if level < 1:
        raise ValueError(f"level must be >= 1, got {level}")
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < n_train + n_test:
        attempts += 1
        if attempts > 50 * (n_train + n_test) + 1000:
            raise ValueError(f"task {task!r} level {level} has fewer than {n_train + n_test} distinct problems")
        p = make_problem(task, rng, level)
        if p.prompt not in seen:
            seen.add(p.prompt)
            problems.append(p)
    return problems[n_test:], problems[:n_test]


class CharTokenizer:
    """A character-level tokenizer with <pad>, <bos>, <eos>: enough for the synthetic tasks and HF `generate`."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")
    DEFAULT_CHARS = "0123456789+-*=x;()/., abcdefghijklmnopqrstuvwyz"

    def __init__(self, chars: str = DEFAULT_CHARS):
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer characters must be distinct")
        self.chars = chars
        self.itos = list(self.SPECIALS) + list(chars)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self.chat_template = None

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        unknown = sorted({c for c in text if c not in self.stoi})
        if unknown:
            raise ValueError(f"characters {unknown} are not in the tokenizer's alphabet {self.chars!r}")
        ids = [self.stoi[c] for c in text]
        return [self.bos_token_id] + ids if add_bos else ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i < len(self.SPECIALS):
                if skip_special_tokens:
                    continue
                out.append(self.itos[i])
            else:
                out.append(self.itos[i])
        return "".join(out)


# The tiny model's alphabet on data files: the synthetic tasks' characters (in their order, so the first ids agree),
# then the rest of printable ASCII, tab and newline included. The synthetic tasks keep DEFAULT_CHARS: their
# vocabulary, and so a seed's random initialization, stay as they were.
FILE_CHARS = CharTokenizer.DEFAULT_CHARS + "".join(
    c for c in string.printable if c not in CharTokenizer.DEFAULT_CHARS and c not in "\r\x0b\x0c")


def tiny_tokenizer(synthetic: bool) -> CharTokenizer:
    """The tiny model's tokenizer: the synthetic tasks' alphabet, or printable ASCII for data files."""
    return CharTokenizer() if synthetic else CharTokenizer(FILE_CHARS)
