"""Every code block of README.md and docs/*.md works as written.

- ```python blocks run, each in a fresh interpreter from the repository root (so a block that needs inputs must
  build them). A line `expression   # VALUE` whose comment starts with a Python literal (`# True`, `# [1.0, 0.0]`,
  `# False: the interval ends differ`) is checked: the expression must equal it.
- A block that cannot run on a CPU or offline is marked in the markdown by `<!-- docs-test: skip (reason) -->`
  on the line before it; it is skipped with that reason, but must still compile.
- `pacs ...` command lines in shell blocks (also `torchrun ... -m pacs ...` and `$ pacs ...` transcripts) are
  parsed by the CLI's own parser: every flag exists and takes the value given.
"""

from __future__ import annotations

import ast
import io
import os
import re
import shlex
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.+)\)\s*-->")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None

    @property
    def name(self) -> str:
        return f"{self.path.name}:{self.line}"


def blocks(path: Path) -> list[Block]:
    out, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.search(previous)
        out.append(Block(path, start + 1, match.group(1), "\n".join(body) + "\n", skip.group(1) if skip else None))
        i += 1
    return out


ALL = [b for path in DOCS for b in blocks(path)]
PYTHON = [b for b in ALL if b.lang == "python"]
SHELL = [b for b in ALL if b.lang in ("bash", "sh", "shell", "")]


def test_the_readme_is_a_front_door():
    """At most 250 lines; the two set-up commands, the main job and the fast tier are on it."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for needed in ("pip install", "pytest", 'pytest -m "not slow"', "pacs train"):
        assert needed in text, needed


def test_the_docs_have_code_blocks():
    assert len(PYTHON) >= 5 and len(SHELL) >= 5
    assert all(b.path.exists() for b in ALL)


def _comment_value(comment: str):
    """The Python literal a `# ...` comment starts with, or None: '# True', "# False: why", '# [1.0, 0.0]'."""
    text = comment.lstrip("#").strip()
    for candidate in (text, text.split(":")[0], text.split(",")[0], text.split(" ")[0]):
        try:
            return True, ast.literal_eval(candidate.strip())
        except (ValueError, SyntaxError):
            continue
    return False, None


def with_checked_comments(code: str) -> str:
    """`expr   # VALUE` -> `assert (expr) == VALUE`, for top-level expression statements with a literal comment."""
    comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(code).readline)
                if tok.type == tokenize.COMMENT}
    tree = ast.parse(code)
    lines = code.splitlines()
    for node in reversed(tree.body):
        if not isinstance(node, ast.Expr) or node.end_lineno not in comments:
            continue
        found, value = _comment_value(comments[node.end_lineno])
        if not found:
            continue
        expr = ast.get_source_segment(code, node)
        check = f"assert ({expr}) == {value!r}, ({expr!r}, {expr})"
        lines[node.lineno - 1:node.end_lineno] = [check]
    return "\n".join(lines) + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("block", PYTHON, ids=[b.name for b in PYTHON])
def test_python_block_runs(block, tmp_path):
    compile(block.code, block.name, "exec")  # a skipped block still compiles
    if block.skip:
        pytest.skip(block.skip)
    script = tmp_path / "block.py"
    script.write_text(with_checked_comments(block.code))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{block.name} failed:\n{block.code}\n{done.stderr[-3000:]}"


def test_comment_checks_can_fail(tmp_path):
    """The `# VALUE` checks are real: a wrong value fails, a prose comment is no check."""
    code = with_checked_comments('x = 2\nx + 1   # 3\nx * 2   # 5: wrong\nprint(x)   # prints two\n')
    assert code.count("assert") == 2
    with pytest.raises(AssertionError):
        exec(compile(code, "t", "exec"), {})


def pacs_commands(block: Block) -> list[list[str]]:
    """The argument lists of the `pacs` commands in a shell block (continuations joined, comments dropped)."""
    text = block.code.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        if not re.match(r"(pacs |torchrun |python -m pacs)", line):
            continue
        words = shlex.split(line, comments=True)
        if words[:1] == ["pacs"]:
            out.append(words[1:])
        elif "-m" in words and words[words.index("-m") + 1:][:1] == ["pacs"]:
            out.append(words[words.index("-m") + 2:])
    return out


COMMANDS = [(b, argv) for b in SHELL for argv in pacs_commands(b)]


def test_the_docs_show_pacs_commands():
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("block,argv", COMMANDS, ids=[f"{b.name}:{' '.join(a)[:60]}" for b, a in COMMANDS])
def test_pacs_command_parses(block, argv, capsys):
    from pacs.cli import build_parser
    from pacs.options import config_from_args

    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_info:  # --help exits 0; a bad flag exits 2
        assert exit_info.code == 0, f"{block.name}: pacs {' '.join(argv)}\n{capsys.readouterr().err}"
        return
    if args.command in ("train", "eval"):
        config_from_args(args)  # the values build a TrainConfig (files named in the docs need not exist here)


@pytest.mark.slow
def test_trl_example_runs_offline(tmp_path):
    """What the README offers for TRL without a download: `python examples/trl_pacs.py --tiny` (one step)."""
    pytest.importorskip("trl")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "trl_pacs.py"), "--tiny", "--max-steps", "1",
                           "--output-dir", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 1: loss" in done.stdout
