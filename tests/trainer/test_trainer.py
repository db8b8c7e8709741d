"""The trainer's pieces: packing, pass@k, data loading, checkpoints, resume, fused-vs-reference convergence, CLI, plots."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

import pacs.plot
from pacs.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from pacs.config import TrainConfig
from pacs.data import batch_indices, load_problems
from pacs.evaluate import ks_for, pass_at_k
from pacs.modeling import pack_sequences, packed_hidden_states, packed_logprobs
from pacs.options import config_from_args
from pacs.rollout import Rollout
from pacs.stats import auc_score
from pacs.tasks import CharTokenizer, make_synthetic_split
from pacs.trainer import train
from pacs.update import make_optimizer, update_on_rollouts
from tests.helpers import DEVICE, fixed_rollouts, random_sequences, small_run_config, tiny_model

# --------------------------------------------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_padded(attn):
    """Log-probs from the padding-free packed pass equal those of an ordinary padded batch (on the test device:
    the attention kernels that must keep packed sequences apart differ between CPU and CUDA)."""
    model = tiny_model(attn=attn).eval().to(DEVICE)
    vocab = model.config.vocab_size
    prompts, responses = random_sequences(7, seed=1, vocab=vocab)
    batch = pack_sequences(prompts, responses).to(DEVICE)
    with torch.no_grad():
        packed = packed_logprobs(model, batch, temperature=0.7, backend="torch").logprob
        # Padded reference: right-padded batch with an attention mask, materialized logits.
        seqs = [p + r for p, r in zip(prompts, responses)]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        logits = model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), use_cache=False).logits
        logp = torch.log_softmax(logits.double() / 0.7, -1).cpu()
    expected = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        s = seqs[i]
        for t in range(len(s)):
            if len(p) - 1 <= t < len(s) - 1:
                expected.append(logp[i, t, s[t + 1]].item())
            else:
                expected.append(0.0)
    torch.testing.assert_close(packed.double().cpu(), torch.tensor(expected, dtype=torch.float64), atol=1e-5,
                               rtol=1e-5)


def test_packing_without_position_restart_would_leak():
    """Negative control: with positions running on across sequences, the states differ (the test above can fail)."""
    model = tiny_model().eval().to(DEVICE)
    prompts, responses = random_sequences(4, seed=2, vocab=model.config.vocab_size)
    batch = pack_sequences(prompts, responses).to(DEVICE)
    with torch.no_grad():
        good = packed_hidden_states(model, batch)
        batch.position_ids = torch.arange(batch.n_tokens, device=DEVICE)[None]
        leaky = packed_hidden_states(model, batch)
    first = int(batch.cu_seqlens[1])
    torch.testing.assert_close(good[:first], leaky[:first])  # the first sequence is unaffected
    assert (good[first:] - leaky[first:]).abs().max() > 1e-3


def test_pack_sequences_layout():
    batch = pack_sequences([[1, 5], [1]], [[7, 8, 2], [9]])
    assert batch.input_ids.tolist() == [[1, 5, 7, 8, 2, 1, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert batch.targets.tolist() == [-100, 7, 8, 2, -100, 9, -100]
    assert batch.cu_seqlens.tolist() == [0, 5, 7]
    with pytest.raises(ValueError, match="non-empty prompt"):
        pack_sequences([[]], [[3]])


# --------------------------------------------------------------------------------------------------------------
# pass@k and metrics


def test_pass_at_k_matches_closed_form():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
    assert ks_for(8) == [1, 2, 4, 8] and ks_for(6) == [1, 2, 4, 6] and ks_for(1) == [1]
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


def test_auc_score():
    assert auc_score([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert auc_score([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert auc_score([0.5, 0.5], [1, 0]) == 0.5
    assert auc_score([0.3, 0.4], [1, 1]) is None


def test_near_miss_is_a_different_nonnegative_integer():
    from pacs.warmup import near_miss

    rng = random.Random(0)
    for answer in ("0", "1", "85", "1000"):
        for _ in range(20):
            slip = near_miss(answer, rng)
            assert slip != answer and 0 <= int(slip) and abs(int(slip) - int(answer)) <= 2
    assert near_miss("x+1", rng) == "x+1"


def test_batch_indices_are_resumable():
    full = batch_indices(10, 25, 0, seed=3)
    assert full[:10] != list(range(10)) and sorted(full[:10]) == list(range(10))
    assert batch_indices(10, 12, 13, seed=3) == full[13:25]


# --------------------------------------------------------------------------------------------------------------
# Data


def test_load_problems_and_errors(tmp_path):
    good = tmp_path / "train.jsonl"
    good.write_text('{"question": "1+1", "solution": "2"}\n\n{"question": "2*3", "solution": 6}\n')
    problems = load_problems(good, problem_key="question", answer_key="solution")
    assert [(p.prompt, p.answer) for p in problems] == [("1+1", "2"), ("2*3", "6")]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['problem', 'answer'\].*question"):
        load_problems(good)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x"\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        load_problems(bad)
    (tmp_path / "x.csv").write_text("problem,answer\n")
    with pytest.raises(ValueError, match="unsupported data file type"):
        load_problems(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="does not exist"):
        load_problems(tmp_path / "missing.jsonl")
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    pq = tmp_path / "train.parquet"
    pd.DataFrame({"problem": ["3+4"], "answer": ["7"]}).to_parquet(pq)
    assert load_problems(pq)[0].answer == "7"


def test_synthetic_split_is_disjoint_and_seeded():
    train, test = make_synthetic_split("mixed", level=2, n_train=500, n_test=50, seed=7)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert make_synthetic_split("mixed", level=2, n_train=500, n_test=50, seed=7) == (train, test)
    for p in train[:50]:
        if ";x=" not in p.prompt:
            assert str(eval(p.prompt[:-1])) == p.answer
    tok = CharTokenizer()
    ids = tok.encode(train[0].prompt)
    assert tok.decode(ids) == train[0].prompt
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_synthetic_split("poetry", level=1, n_train=1, n_test=1, seed=0)
    with pytest.raises(ValueError, match="not in the tokenizer"):
        tok.encode("1+1=?")


def test_config_file_and_precedence(tmp_path):
    from pacs.cli import build_parser

    path = tmp_path / "cfg.yaml"
    path.write_text("lr: 0.001\nsteps: 7\nalgo: grpo\n")
    args = build_parser().parse_args(["train", "--preset", "demo", "--config", str(path), "--steps", "9"])
    cfg = config_from_args(args)
    assert (cfg.lr, cfg.steps, cfg.algo, cfg.model) == (0.001, 9, "grpo", "tiny")
    (tmp_path / "bad.toml").write_text('learning_rate = 1\n')
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "bad.toml")])
    with pytest.raises(ValueError, match="unknown key"):
        config_from_args(args)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and resume


def test_killed_save_leaves_last_good_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    cfg = TrainConfig()
    optimizer, scheduler = make_optimizer(model, cfg)
    save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler,
                    trainer_state={"data_position": 4}, config={})
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        if str(f).endswith("training.pt"):
            raise KeyboardInterrupt("killed during save")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler,
                        trainer_state={"data_position": 8}, config={})
    monkeypatch.setattr(torch, "save", real_save)
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_000001"
    fresh = tiny_model(seed=5)
    opt2, sch2 = make_optimizer(fresh, cfg)
    state = load_checkpoint(latest, model=fresh, optimizer=opt2, scheduler=sch2)
    assert state == {"step": 1, "data_position": 4}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, good[k])


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["pacs", "grpo"])
def test_resume_continues_exactly(tmp_path, algo):
    straight = train(small_run_config(tmp_path / "a", steps=4, algo=algo))
    train(small_run_config(tmp_path / "b", steps=2, algo=algo))
    resumed = train(small_run_config(tmp_path / "b", steps=4, algo=algo, resume=True))
    a = torch.load(latest_checkpoint(straight) / "model.pt")
    b = torch.load(latest_checkpoint(resumed) / "model.pt")
    assert latest_checkpoint(resumed).name == "step_000004"
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    loss_a = [r["loss"] for r in rows_a if r.get("phase") == "train"]
    loss_b = [r["loss"] for r in rows_b if r.get("phase") == "train"]
    assert loss_a == loss_b and len(loss_a) == 4


# --------------------------------------------------------------------------------------------------------------
# Convergence: fused loss vs materialized reference


@pytest.mark.parametrize("algo", ["pacs", "grpo"])
def test_fused_and_reference_losses_give_the_same_curve(algo):
    """20 optimizer-step pairs on the same fixed rollouts, on the test device: the loss curves agree within float32
    tolerance."""
    batches = fixed_rollouts(10, 16, seed=100, reward_seed=0)
    curves = {}
    for impl in ("fused", "reference"):
        torch.manual_seed(0)
        model = tiny_model(seed=3).to(DEVICE)
        cfg = TrainConfig(algo=algo, group_size=4, minibatches_per_rollout=2, lr=3e-3, weight_decay=0.0,
                          loss_impl=impl, kernel_backend="torch", temperature=0.9)
        optimizer, scheduler = make_optimizer(model, cfg)
        losses = []
        for rollouts, rewards in batches:
            losses += update_on_rollouts(model, optimizer, scheduler, rollouts, rewards, cfg,
                                         torch.device(DEVICE)).loss
        curves[impl] = losses
    assert len(curves["fused"]) == 20
    torch.testing.assert_close(torch.tensor(curves["fused"]), torch.tensor(curves["reference"]), atol=1e-5,
                               rtol=1e-4)
    assert max(curves["fused"]) - min(curves["fused"]) > 1e-3  # the model did move


@pytest.mark.parametrize("algo,k,score", [("pacs", 1, "logratio_sum"), ("pacs", 2, "logratio_sum"),
                                          ("pacs", 2, "logprob_mean"), ("grpo", 2, None), ("rloo", 3, None)])
def test_on_policy_shortcut_gives_the_same_curve(monkeypatch, algo, k, score):
    """The first mini-batch of each rollout skips its old pass (old_logprob=None; logprob_mean reads none at all);
    the curve does not change."""
    import pacs.update

    batches = fixed_rollouts(4, 12, seed=200, reward_seed=1)
    real_old = pacs.update.old_logprobs
    old_passes = []
    monkeypatch.setattr(pacs.update, "old_logprobs", lambda *a: old_passes.append(1) or real_old(*a))
    curves, norms, params, counts = {}, {}, {}, {}
    for shortcut in (True, False):
        old_passes.clear()
        torch.manual_seed(0)
        model = tiny_model(seed=4)
        cfg = TrainConfig(algo=algo, group_size=4, minibatches_per_rollout=k, lr=3e-3, weight_decay=0.0,
                          kernel_backend="torch", temperature=0.9, entropy_coef=0.01,
                          on_policy_shortcut=shortcut, loss_type="dapo" if algo == "rloo" else "grpo",
                          score=score or "logratio_sum")
        optimizer, scheduler = make_optimizer(model, cfg)
        stats = [update_on_rollouts(model, optimizer, scheduler, rollouts, rewards, cfg, torch.device("cpu"))
                 for rollouts, rewards in batches]
        curves[shortcut] = [x for st in stats for x in st.loss]
        norms[shortcut] = [x for st in stats for x in st.grad_norm]
        params[shortcut] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        counts[shortcut] = len(old_passes)
    assert counts == {True: 0 if score == "logprob_mean" else 4 * (k - 1), False: 4 * k}
    torch.testing.assert_close(torch.tensor(curves[True]), torch.tensor(curves[False]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(norms[True]), torch.tensor(norms[False]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(params[True], params[False], atol=1e-4, rtol=1e-4)  # Adam amplifies rounding of ~0 grads
    moved = params[True] - torch.cat([p.detach().reshape(-1) for p in tiny_model(seed=4).parameters()])
    assert moved.abs().max() > 1e-3  # the model did move
    if score == "logratio_sum":  # the first mini-batch's BCE is ln 2 by construction (the entropy bonus aside)
        assert all(abs(x - math.log(2)) < 0.05 for x in curves[True][::k])


def test_on_policy_shortcut_same_run(tmp_path, monkeypatch):
    """`train` with and without the shortcut (and the warm-up's one-pass NLL): the same metrics within float
    tolerance.

    Rewards are a fixed function of the text (mixed labels: a real gradient; the tiny model never answers right,
    and with all-equal labels the PACS gradient is 0 up to rounding, which Adam would amplify into noise)."""
    import pacs.trainer

    monkeypatch.setattr(pacs.trainer, "math_reward",
                        lambda texts, answers: [float(sum(map(ord, t)) % 2) for t in texts])
    rows = {}
    for shortcut in (True, False):
        run = train(small_run_config(tmp_path / str(shortcut), steps=3, sft_steps=3, sft_batch=8, save_every=0,
                                     on_policy_shortcut=shortcut, sft_one_pass=shortcut))
        rows[shortcut] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(0 < r["reward"] < 1 for r in rows[True] if r.get("phase") == "train")
    for key in ("loss", "nll", "reward", "psi_mean", "grad_norm"):
        a = [r[key] for r in rows[True] if r.get(key) is not None]
        b = [r[key] for r in rows[False] if r.get(key) is not None]
        assert len(a) == len(b) > 0, key
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo", "grpo"])
def test_grpo_and_rloo_get_trls_normalizers(monkeypatch, algo, loss_type):
    """dr_grpo divides by max_new_tokens (TRL's max_completion_length); dapo by the rollout batch's response tokens
    over its mini-batches (TRL's num_items_in_batch / steps_per_generation), the same for every mini-batch."""
    import pacs_kernels

    calls = []
    real = getattr(pacs_kernels, f"{algo}_loss")

    def spy(*args, **kwargs):
        calls.append((int((args[2] != -100).sum()), kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(pacs_kernels, f"{algo}_loss", spy)
    prompts, responses = random_sequences(16, seed=9, vocab=CharTokenizer().vocab_size)
    rollouts = [Rollout(p, r + [2], False) for p, r in zip(prompts, responses)]
    rewards = [float(i % 3 == 0) for i in range(16)]
    model = tiny_model()
    cfg = TrainConfig(algo=algo, loss_type=loss_type, group_size=4, minibatches_per_rollout=3, max_new_tokens=12,
                      kernel_backend="torch")
    optimizer, scheduler = make_optimizer(model, cfg)
    update_on_rollouts(model, optimizer, scheduler, rollouts, rewards, cfg, torch.device("cpu"))
    assert len(calls) == 3
    counts = [n for n, _ in calls]
    assert sum(counts) == sum(len(r.response_ids) for r in rollouts) and len(set(counts)) > 1
    for _, kwargs in calls:
        assert kwargs["max_len"] == 12 and kwargs["loss_type"] == loss_type
        if loss_type == "dapo":
            assert kwargs["normalizer"] == sum(counts) / 3
        else:
            assert "normalizer" not in kwargs


@pytest.mark.gpu
@pytest.mark.parametrize("algo", ["pacs", "grpo"])
def test_train_on_cuda_in_bf16_with_the_triton_kernels(tmp_path, algo):
    """The trainer on a GPU: a 2-step warm-up and 2 RL steps of the tiny model in bf16, the losses on the Triton
    kernels; finite losses and gradients, a checkpoint of finite bf16 weights, the card in config.json."""
    run = train(small_run_config(tmp_path, algo=algo, steps=2, device="cuda", dtype="bfloat16",
                                 kernel_backend="triton", sft_steps=2, sft_batch=4))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("phase") == "train"]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in steps)
    assert all(r["peak_memory_mb"] > 0 for r in steps)
    assert latest_checkpoint(run).name == "step_000002"
    weights = torch.load(latest_checkpoint(run) / "model.pt")
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert json.loads((run / "config.json").read_text())["hardware"]["gpu"]


def test_train_validates_before_building_anything(tmp_path, monkeypatch):
    import pacs.session

    monkeypatch.setattr(pacs.session, "build_tiny_model", lambda *a, **k: pytest.fail("model built"))
    for bad, message in ((dict(group_size=1), "--group-size must be >= 2"), (dict(lr=-1.0), "--lr must be"),
                         (dict(data=str(tmp_path / "missing.jsonl")), "does not exist")):
        with pytest.raises(ValueError, match=message):
            train(small_run_config(tmp_path / "run", **bad))
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------------------
# CLI end to end (tiny)


@pytest.mark.slow
def test_cli_train_eval_plot(tmp_path, capsys):
    from pacs.cli import main

    out = tmp_path / "run"
    common = ["--device", "cpu", "--model", "tiny", "--tiny-hidden", "32", "--tiny-layers", "1", "--tiny-heads", "2",
              "--tiny-intermediate", "64", "--level", "1", "--n-train", "40", "--n-test", "4", "--eval-n", "2",
              "--max-new-tokens", "3"]
    assert main(["train", *common, "--steps", "2", "--prompts-per-step", "2", "--group-size", "2",
                 "--sft-steps", "3", "--sft-batch", "4", "--out-dir", str(out), "--plot", "true"]) == 0
    assert (out / "plots" / "training.png").exists() and (out / "plots" / "pass_at_k.png").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["phase"] == "train"]
    assert len(train_rows) == 2
    for key in ("reward", "loss", "psi_mean", "psi_std", "critic_brier", "entropy", "grad_norm", "truncation_rate",
                "gen_tokens_per_s", "peak_memory_mb", "response_length"):
        assert key in train_rows[0]
    assert {r["tag"] for r in rows if r["phase"] == "eval"} == {"init", "step_000000", "step_000002"}
    assert main(["eval", "--run", str(out), "--eval-n", "2"]) == 0
    assert (out / "eval" / "pacs_eval.json").exists()
    assert main(["plot", str(out), str(out), "--compare", str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").exists()
    assert "pass@k" in capsys.readouterr().out


def _save_local_hf_model(path):
    """A tiny Qwen2 model and a character-level Hugging Face tokenizer saved like a hub checkpoint (no download)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = string.ascii_letters + string.digits + string.punctuation + " "
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + list(chars))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                     unk_token="<unk>")
    config = Qwen2Config(vocab_size=len(specials) + len(chars), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    hf_tok.save_pretrained(path)


def test_train_a_local_hugging_face_model_on_a_jsonl_file(tmp_path):
    """The real-model path: AutoModel/AutoTokenizer from a directory, file data with custom keys, the PACS prompt."""
    model_dir = tmp_path / "model"
    _save_local_hf_model(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{b}", "solution": str(a + b)}) + "\n"
                            for a in range(4) for b in range(4)))
    cfg = TrainConfig(model=str(model_dir), data=str(data), problem_key="question", answer_key="solution",
                      steps=2, prompts_per_step=2, group_size=2, minibatches_per_rollout=1, max_new_tokens=3,
                      eval_n=1, eval_problems=2, lr=1e-3, plot=False, out_dir=str(tmp_path / "run"), device="cpu")
    run = train(cfg)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "train"] == [1, 2]
    assert latest_checkpoint(run).name == "step_000002"
    from transformers import AutoTokenizer

    from pacs.data import PROMPT_SUFFIX, format_prompt
    from pacs.tasks import Problem

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = format_prompt(tok, Problem("1+2", "3"), synthetic=False)
    assert ids == tok.encode(f"1+2 {PROMPT_SUFFIX}")  # no chat template: the problem and the authors' suffix
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    ids = format_prompt(tok, Problem("1+2", "3"), synthetic=False)
    assert ids == tok.encode(f"<s>1+2 {PROMPT_SUFFIX}</s>A:", add_special_tokens=False)
    assert format_prompt(tok, Problem("1+2", "3"), synthetic=False, use_chat_template=False) == tok.encode(
        f"1+2 {PROMPT_SUFFIX}")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    """SIGTERM mid-run: the current step ends, a checkpoint is written, the process exits cleanly; --resume ends it."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "pacs.cli", "train", "--model", "tiny", "--tiny-hidden", "32", "--tiny-layers",
            "1", "--tiny-heads", "2", "--tiny-intermediate", "64", "--level", "1", "--n-train", "40", "--n-test", "2",
            "--eval-n", "1", "--max-new-tokens", "3", "--prompts-per-step", "2", "--group-size", "2",
            "--save-every", "0", "--plot", "false", "--out-dir", str(out), "--device", "cpu"]
    proc = subprocess.Popen([*args, "--steps", "100000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"phase": "train"' in metrics.read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    ckpt = latest_checkpoint(out)
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"phase": "train"' in x]
    assert ckpt is not None and ckpt.name == f"step_{steps[-1]:06d}"
    resumed = subprocess.run([*args, "--steps", str(steps[-1] + 1), "--resume", "true"], capture_output=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert latest_checkpoint(out).name == f"step_{steps[-1] + 1:06d}"


# --------------------------------------------------------------------------------------------------------------
# `pacs plot`: the headline figure (held-out pass@k against the RL step), distinct colours per evaluation, and the
# on-policy ln 2 loss of PACS marked as designed (from a synthetic run directory: the figures' data are checked).


def fake_run(run_dir, algo="pacs", n_evals=13, warmup=True):
    """metrics.jsonl and eval/*.json of a run with `n_evals` RL-step evaluations (values made up for the plot)."""
    (run_dir / "eval").mkdir(parents=True)
    rows = [{"phase": "train", "step": s, "loss": math.log(2) + 0.001 * (s % 3), "reward": s / 100} for s in
            range(1, 31)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "config.json").write_text(json.dumps({"algo": algo, "score": "logratio_sum"}))
    tags = (["init"] if warmup else []) + [f"step_{25 * i:06d}" for i in range(n_evals)]
    for i, tag in enumerate(tags):
        p1 = 0.02 + 0.05 * i
        result = {"tag": tag, "n": 8, "problems": 200, "pass@k": {"1": p1, "2": p1 + 0.05, "4": p1 + 0.1,
                                                                  "8": p1 + 0.15}}
        (run_dir / "eval" / f"{tag}.json").write_text(json.dumps(result))
    (run_dir / "eval" / "pacs_eval.json").write_text(json.dumps({"n": 8, "pass@k": {"1": 0.9}}))  # not a step
    return run_dir


@pytest.fixture
def figures(monkeypatch):
    """The figures plot_run makes, by file name (still written to disk)."""
    made = {}
    real = pacs.plot.save_figure

    def save(fig, path, dpi=110):
        made[path.name] = fig
        return real(fig, path, dpi=30)

    monkeypatch.setattr(pacs.plot, "save_figure", save)
    return made


def test_headline_is_pass_at_k_against_the_rl_step(tmp_path, figures):
    run = fake_run(tmp_path / "run")
    written = pacs.plot.plot_run(run)
    assert [p.name for p in written] == ["pass_at_k_by_step.png", "training.png", "pass_at_k.png"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    ax = figures["pass_at_k_by_step.png"].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"pass@1", "pass@2", "pass@4", "pass@8", "pass@1 before\nthe warm-up"}
    steps = [25 * i for i in range(13)]
    assert list(lines["pass@1"].get_xdata()) == steps
    assert list(lines["pass@1"].get_ydata()) == pytest.approx([100 * (0.07 + 0.05 * i) for i in range(13)])
    assert list(lines["pass@1 before\nthe warm-up"].get_ydata()) == pytest.approx([2.0])
    assert lines["pass@1"].get_linewidth() > lines["pass@8"].get_linewidth()
    colors = [tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
              for label, line in lines.items() if label.startswith("pass@") and "before" not in label]
    assert len(set(colors)) == 4
    assert ax.get_xlabel() == "RL step"


def test_pass_at_k_lines_have_distinct_colours(tmp_path, figures):
    pacs.plot.plot_run(fake_run(tmp_path / "run", n_evals=13))
    lines = figures["pass_at_k.png"].axes[0].get_lines()
    assert len(lines) == 14  # init + 13 RL-step evaluations; pacs eval's own results are not among them
    assert len({tuple(line.get_color()) for line in lines}) == 14
    assert [line.get_label() for line in lines][:3] == ["before the warm-up", "step 0", "step 25"]


@pytest.mark.slow
@pytest.mark.parametrize("algo,marked", [("pacs", True), ("grpo", False)])
def test_the_onpolicy_ln2_loss_is_marked_for_pacs(tmp_path, figures, algo, marked):
    pacs.plot.plot_run(fake_run(tmp_path / "run", algo=algo))
    loss = next(ax for ax in figures["training.png"].axes if ax.get_title().startswith("loss"))
    hlines = [line for line in loss.get_lines() if list(line.get_ydata()) == [math.log(2)] * 2]
    assert bool(hlines) is marked
    assert ("ln 2 by design" in loss.get_title()) is marked
