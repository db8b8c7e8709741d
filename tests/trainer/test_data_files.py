"""The user's own files: the tiny model trains on a JSONL file; every malformed data or config file and every
missing model path ends in one `pacs train: error: ...` line (exit status 2) naming the file, the row and what
was expected, before anything is built."""

from __future__ import annotations

import json
import time

import pytest

import pacs.config
import pacs.session
from pacs.cli import main
from pacs.data import load_problems
from pacs.tasks import FILE_CHARS, CharTokenizer

SMALL = ["--tiny-hidden", "32", "--tiny-layers", "1", "--tiny-heads", "2", "--tiny-intermediate", "64",
         "--max-new-tokens", "3", "--prompts-per-step", "2", "--group-size", "2", "--eval-n", "1", "--no-plot",
         "--kernel-backend", "torch"]


def run_cli(argv, capsys):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_error_line(status, err, command="train"):
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pacs {command}: error: "), err
    return lines[0]


@pytest.fixture
def nothing_built(monkeypatch):
    """A model built, or the run directory created, before the data error is a test failure."""
    monkeypatch.setattr(pacs.session, "build_tiny_model", lambda *a, **k: pytest.fail("model built"))
    monkeypatch.setattr(pacs.session, "load_pretrained", lambda *a, **k: pytest.fail("model loaded"))


# --------------------------------------------------------------------------------------------------------------
# The tiny model on a data file


def test_tiny_model_trains_on_a_jsonl_file(tmp_path, capsys):
    data = tmp_path / "my.jsonl"
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(6) for b in range(6)]
    rows[3] = {"question": "What is 12+30?", "answer": 42}  # capitals, '?', a numeric answer
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    status, out, err = run_cli(["train", "--model", "tiny", "--data", data, "--problem-key", "question", *SMALL,
                                "--steps", "2", "--sft-steps", "3", "--sft-batch", "4", "--out-dir", run], capsys)
    assert status == 0, err
    rows_out = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_out if r["phase"] == "train"] == [1, 2]
    assert sum(r["phase"] == "sft" for r in rows_out) >= 1
    config = json.loads((run / "config.json").read_text())
    assert config["train_problems"] + config["test_problems"] == len(rows)


def test_tiny_prompts_are_the_problem_text_in_a_printable_ascii_alphabet(tmp_path):
    """The tiny model's file prompts carry no instruction suffix, and its alphabet extends the synthetic one (so
    the synthetic tasks' vocabulary, and a seed's initialization, are unchanged)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"problem": p, "answer": "1"}) + "\n" for p in ("Why? {x}", "a\\b", "c")))
    cfg = pacs.config.TrainConfig(data=str(data), out_dir=str(tmp_path / "run"), tiny_hidden=32, tiny_layers=1,
                                  tiny_heads=2, tiny_intermediate=64)
    session = pacs.session.setup(cfg)
    tok = session.tokenizer
    assert tok.chars == FILE_CHARS and FILE_CHARS.startswith(CharTokenizer.DEFAULT_CHARS)
    for problem, ids in zip(session.train + session.test, session.train_prompts + session.test_prompts):
        assert ids == [tok.bos_token_id] + [tok.stoi[c] for c in problem.prompt]
    import string

    assert set(string.printable) - set(FILE_CHARS) == set("\r\x0b\x0c")


# --------------------------------------------------------------------------------------------------------------
# Malformed data files


def _parquet(path, frame):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    pd.DataFrame(frame).to_parquet(path)


GOOD = json.dumps({"problem": "1+1=", "answer": "2"})
DATA_CASES = {
    "bare number row": ("d.jsonl", f"{GOOD}\n5\n", r"d\.jsonl:2: expected an object with keys 'problem' and "
                                                   r"'answer', got a number \(5\)"),
    "string in a json array": ("d.json", json.dumps([json.loads(GOOD), "oops"]),
                               r"d\.json\[1\]: expected an object .*, got a string 'oops'"),
    "null answer": ("d.jsonl", f'{GOOD}\n{{"problem": "2+2=", "answer": null}}\n',
                    r"d\.jsonl:2: 'answer' is null; expected a non-empty string or a number"),
    "empty problem": ("d.jsonl", f'{{"problem": " ", "answer": 3}}\n{GOOD}\n',
                      r"d\.jsonl:1: 'problem' is an empty string; expected a non-empty string or a number"),
    "list answer": ("d.jsonl", f'{GOOD}\n{{"problem": "x", "answer": [1, 2]}}\n', r"d\.jsonl:2: 'answer' is an array"),
    "boolean answer": ("d.jsonl", f'{{"problem": "x", "answer": true}}\n{GOOD}\n', r"'answer' is true \(a boolean\)"),
    "object answer": ("d.json", json.dumps([json.loads(GOOD), {"problem": "x", "answer": {"v": 1}}]),
                      r"d\.json\[1\]: 'answer' is an object"),
    "not json": ("d.jsonl", f"{GOOD}\n{{problem: 1}}\n", r"d\.jsonl:2: not valid JSON .*one JSON object per line"),
    "broken json array": ("d.json", '[{"problem": "1", "answer": "2"},\n {"problem": }]',
                          r"d\.json: not a valid JSON array \(line 2, column"),
    "json object document": ("d.json", json.dumps({"data": [json.loads(GOOD)]}, indent=1),
                             r"d\.json: expected a JSON array of problem objects .*keys \['data'\]"),
    "missing key": ("d.jsonl", '{"question": "1+1=", "answer": "2"}\n',
                    r"d\.jsonl:1: missing key\(s\) \['problem'\]; it has \['answer', 'question'\]"),
    "not utf-8": ("d.jsonl", GOOD.encode() + b'\n{"problem": "\xff", "answer": "1"}\n', r"d\.jsonl:2: not UTF-8"),
    "empty file": ("d.jsonl", "\n\n", r"d\.jsonl holds no problems"),
    "one problem": ("d.jsonl", GOOD + "\n", r"holds 1 problem: at least 2 are needed .*--test-data"),
    "not in the tiny alphabet": ("d.jsonl", f'{GOOD}\n{{"problem": "12×3=", "answer": "36"}}\n',
                                 r"d\.jsonl:2: 'problem' has characters the tiny model's tokenizer cannot encode: "
                                 r"\['×'\]"),
    "answer not in the tiny alphabet": ("d.jsonl", f'{GOOD}\n{{"problem": "pi", "answer": "π"}}\n',
                                        r"d\.jsonl:2: 'answer' has characters .*\['π'\]"),
    "corrupt parquet": ("d.parquet", b"PAR1 this is not parquet", r"d\.parquet: not a readable parquet file"),
    "parquet null answer": ("d.parquet", {"problem": ["1+1=", "2+2="], "answer": ["2", None]},
                            r"d\.parquet row 1: 'answer' is null"),
    "parquet nan answer": ("d.parquet", {"problem": ["1+1=", "2+2="], "answer": [2.0, float("nan")]},
                           r"d\.parquet row 1: 'answer' is null"),
    "parquet missing column": ("d.parquet", {"question": ["1+1="], "answer": ["2"]},
                               r"d\.parquet row 0: missing key\(s\) \['problem'\]"),
}


def write_case(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, dict):
        _parquet(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize("case,flag", [(case, flag) for case in sorted(DATA_CASES) for flag in ("--data", "--test-data")
                                       if (case, flag) != ("one problem", "--test-data")])  # one held-out problem: fine
def test_bad_data_files_get_one_line(case, flag, tmp_path, capsys, nothing_built):
    name, content, pattern = DATA_CASES[case]
    path = write_case(tmp_path, name, content)
    good = tmp_path / "good.jsonl"
    good.write_text(f"{GOOD}\n" * 3)
    data = ["--data", path] if flag == "--data" else ["--data", good, "--test-data", path]
    status, _, err = run_cli(["train", "--model", "tiny", *data, *SMALL, "--out-dir", tmp_path / "run"], capsys)
    import re

    line = one_error_line(status, err)
    assert re.search(pattern, line), line
    assert not (tmp_path / "run").exists()


def test_numbers_are_accepted_as_problems_and_answers(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text('{"problem": 12, "answer": 0.5}\n{"problem": "x", "answer": -3}\n')
    assert [(p.prompt, p.answer) for p in load_problems(path)] == [("12", "0.5"), ("x", "-3")]


# --------------------------------------------------------------------------------------------------------------
# Malformed config files


CONFIG_CASES = {
    "yaml syntax": ("c.yaml", "lr: 1e-3\nsteps: [1, 2\n", r"c\.yaml: not valid YAML \(line \d+, column \d+: .*\)"),
    "yaml tab": ("c.yaml", "lr: 1\n\tsteps: 2\n", r"c\.yaml: not valid YAML"),
    "yaml list": ("c.yaml", "- lr\n- steps\n", r"c\.yaml must hold a mapping of TrainConfig keys, got list"),
    "toml syntax": ("c.toml", "lr = \n", r"c\.toml: not valid TOML \(.*line 1.*\)"),
    "json syntax": ("c.json", '{"lr": 1e-3,}', r"c\.json: not valid JSON \(line 1, column \d+: .*\)"),
    "not utf-8": ("c.yaml", b"lr: \xff\n", r"c\.yaml: not UTF-8 text"),
    "directory": ("c.yaml/", None, r"c\.yaml is not a file"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_files_get_one_line(case, tmp_path, capsys, nothing_built):
    import re

    name, content, pattern = CONFIG_CASES[case]
    path = tmp_path / name.rstrip("/")
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    status, _, err = run_cli(["train", "--config", path, "--out-dir", tmp_path / "run"], capsys)
    line = one_error_line(status, err)
    assert re.search(pattern, line), line


# --------------------------------------------------------------------------------------------------------------
# Model paths


@pytest.mark.parametrize("model", ["/nonexistent/model", "./missing-model", "../missing-model", "~/missing-model-xyz",
                                   "models/qwen-typo", "a/b/c", "my model"])
def test_a_missing_model_path_is_named_at_once(model, tmp_path, capsys, monkeypatch, nothing_built):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # models/qwen-typo: a path inside an existing folder, not a hub id
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("the hub was asked"))
    started = time.perf_counter()
    status, _, err = run_cli(["train", "--model", model, "--out-dir", tmp_path / "run"], capsys)
    elapsed = time.perf_counter() - started
    line = one_error_line(status, err)
    assert f"--model {model}: no such directory" in line
    assert elapsed < 1.0, elapsed
    assert not (tmp_path / "run").exists()


def test_model_directory_checks(tmp_path, capsys, nothing_built):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_text("x")
    status, _, err = run_cli(["train", "--model", tmp_path / "empty"], capsys)
    assert "has no config.json (not a Hugging Face model directory)" in one_error_line(status, err)
    status, _, err = run_cli(["train", "--model", tmp_path / "weights.bin"], capsys)
    assert "is a file: give the model's directory" in one_error_line(status, err)


class _Unreachable(Exception):
    pass


def test_an_unreachable_hub_is_said_at_once(tmp_path, capsys, monkeypatch, nothing_built):
    """A hub id that is neither local nor cached: one metadata request (no retries); when it fails, one line."""
    import huggingface_hub

    calls = []

    def no_network(self, repo_id, timeout=None, **kwargs):
        calls.append((repo_id, timeout))
        raise _Unreachable("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.jsonl"
    data.write_text(f"{GOOD}\n" * 3)
    status, _, err = run_cli(["train", "--model", "some-org/some-model", "--data", data, "--out-dir",
                              tmp_path / "run"], capsys)
    line = one_error_line(status, err)
    assert "no local directory some-org/some-model, not in the Hugging Face cache, and the hub" in line
    assert "is unreachable ([Errno -2] Name or service not known)" in line
    assert calls == [("some-org/some-model", 5.0)]


def test_model_source_decisions(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import RepositoryNotFoundError

    from pacs import modeling

    (tmp_path / "local").mkdir()
    assert modeling.model_source(str(tmp_path / "local")) == (str(tmp_path / "local"), False)
    cached = {"yes": False}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name: "/cache/config.json" if cached["yes"] else None)

    def missing(self, repo_id, timeout=None, **kwargs):
        err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # the hub's 404, without an HTTP response
        Exception.__init__(err, "404 Client Error: Repository Not Found")
        raise err

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", missing)
    with pytest.raises(ValueError, match="no model org/x on the Hugging Face hub"):
        modeling.model_source("org/x")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda self, repo_id, timeout=None, **k: (_ for _ in ()).throw(_Unreachable("down")))
    cached["yes"] = True
    assert modeling.model_source("org/x") == ("org/x", True)  # cached: loads offline instead of retrying
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, timeout=None, **k: object())
    assert modeling.model_source("org/x") == ("org/x", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert modeling.model_source("org/x") == ("org/x", True)
    cached["yes"] = False
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        modeling.model_source("org/x")
