"""LoRA through PEFT (pacs/lora.py) on a tiny random Qwen2: what trains, what stays frozen, the math, the state;
and in the trainer (`pacs train --lora-r`, at the end)."""

from __future__ import annotations

import copy
import json
import logging
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import pacs_kernels  # noqa: E402
from pacs import attention  # noqa: E402  (importing it registers "varlen")
from pacs import lora  # noqa: E402
from pacs.checkpoint import latest_checkpoint  # noqa: E402
from pacs.cli import build_parser, main  # noqa: E402
from pacs.config import TrainConfig  # noqa: E402
from pacs.modeling import build_tiny_model, pack_sequences, packed_logprobs  # noqa: E402
from pacs.session import setup  # noqa: E402
from pacs.tasks import tiny_tokenizer  # noqa: E402
from pacs.trainer import train  # noqa: E402
from pacs.update import make_optimizer, old_logprobs, LossSettings, update_on_rollouts  # noqa: E402
from pacs_kernels import _gemm  # noqa: E402
from tests.helpers import fixed_rollouts, max_err, small_run_config, tiny_model  # noqa: E402

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV = 101, 32, 48, 2, 4, 2  # GQA; vocab != token count (the dW probe below)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny(tied: bool = True, seed: int = 0, attn: str = "sdpa"):
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV,
                                      tie_word_embeddings=tied, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def batch(seed: int = 0, n_seqs: int = 4):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))
    prompts = [torch.randint(1, VOCAB, (rand(2, 6),), generator=gen).tolist() for _ in range(n_seqs)]
    responses = [torch.randint(1, VOCAB, (rand(3, 9),), generator=gen).tolist() for _ in range(n_seqs)]
    return pack_sequences(prompts, responses)


def pacs_loss(hidden, weight, b, old=None):
    rewards = torch.tensor([1.0, 0.0] * (b.cu_seqlens.numel() // 2))
    return pacs_kernels.pacs_loss(hidden, weight, b.targets, old, rewards, b.cu_seqlens, group_size=2,
                                  backend="torch").loss


def model_loss(model, b, old=None):
    hidden = lora.decoder_of(model)(input_ids=b.input_ids, position_ids=b.position_ids, attention_mask=None,
                                    use_cache=False).last_hidden_state[0]
    return pacs_loss(hidden, model.get_output_embeddings().weight, b, old)


def logprobs(model, b):
    """Per-token log-probs of the targets under the model (fused head): what a reference pass computes."""
    hidden = lora.decoder_of(model)(input_ids=b.input_ids, position_ids=b.position_ids, attention_mask=None,
                                    use_cache=False).last_hidden_state[0]
    return pacs_kernels.linear_logprob(hidden, model.get_output_embeddings().weight, b.targets,
                                       backend="torch").logprob


def random_adapters(model, seed):
    """Non-zero adapters (PEFT starts lora_B at 0, which would make every dA vanish), loaded bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in lora.adapter_state_dict(model).items()}
    lora.load_adapter_state_dict(model, state)
    return state


def test_defaults_freeze_everything_but_the_adapters():
    model = lora.apply_lora(tiny(), r=4)
    names = lora.lora_targets(tiny())
    assert sorted({n.rsplit(".", 1)[-1] for n in names}) == sorted(TARGETS) and len(names) == LAYERS * 7
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embed.weight and not head.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # r * (in + out) per adapted layer, from the config alone
    head_dim = HIDDEN // HEADS
    per_layer = sum(4 * (i + o) for i, o in [(HIDDEN, HIDDEN), (HIDDEN, KV * head_dim), (HIDDEN, KV * head_dim),
                                             (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER), (INTER, HIDDEN)])
    base = sum(p.numel() for p in tiny().parameters())
    assert lora.trainable_parameters(model) == (LAYERS * per_layer, base + LAYERS * per_layer)
    assert lora.trainable_parameter_list(model) == [p for n, p in model.named_parameters() if n in trainable]


def test_bad_targets_and_options_raise():
    with pytest.raises(ValueError, match="--lora-targets lm_head"):
        lora.lora_targets(tiny(tied=False), "q_proj,lm_head")
    with pytest.raises(ValueError, match="--lora-targets embed_tokens"):
        lora.lora_targets(tiny(), ["embed_tokens"])
    with pytest.raises(ValueError, match="--lora-targets qkv: no linear layer.*q_proj"):
        lora.lora_targets(tiny(), "qkv")
    assert lora.lora_targets(tiny(), "q_proj, v_proj") == [f"model.layers.{i}.self_attn.{n}" for i in range(LAYERS)
                                                            for n in ("q_proj", "v_proj")]
    assert len(lora.lora_targets(tiny(), "all-linear")) == LAYERS * 7
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="--lora-targets: none of the default names"):  # GPT-2 uses Conv1D
        lora.lora_targets(gpt2)
    with pytest.raises(ValueError, match="--lora-r must be an integer >= 1.*--lora-alpha.*--lora-dropout"):
        lora.apply_lora(tiny(), r=0, alpha=-1, dropout=1.0)


def test_missing_peft_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[lora\]"'):
        lora.apply_lora(tiny(), r=4)


@pytest.mark.parametrize("tied,attn", [(True, "sdpa"), (False, "sdpa"), (True, "varlen")])
def test_training_changes_only_adapters(tied, attn):
    """Three AdamW steps (weight decay on, over all parameters as the trainer builds it) through pacs_kernels'
    fused PACS loss: the base weights and the lm_head are bitwise unchanged, every adapter tensor moved."""
    model = lora.apply_lora(tiny(tied=tied, attn=attn), r=4, alpha=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        loss = model_loss(model, batch(seed=step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        assert model.get_output_embeddings().weight.grad is None
        optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("on_policy", [True, False])
def test_frozen_head_skips_the_weight_gradient(monkeypatch, on_policy):
    """With the head frozen the fused loss's backward runs no dW GEMM: every GEMM output it writes has at most N
    rows (dH), none has the vocabulary's rows (dW); with the head trainable the same probe sees them."""
    written = []
    weight_grad, accumulate = _gemm.weight_grad, _gemm.accumulate_
    monkeypatch.setattr(_gemm, "weight_grad", lambda dz, h, out: written.append(out.shape[0]) or
                        weight_grad(dz, h, out))
    monkeypatch.setattr(_gemm, "accumulate_", lambda acc, dz, w: written.append(acc.shape[0]) or
                        accumulate(acc, dz, w))
    b = batch()
    n = b.n_tokens
    old = None if on_policy else torch.randn(n) - 4
    for trainable_head in (False, True):
        written.clear()
        hidden = torch.randn(n, HIDDEN, requires_grad=True)
        weight = torch.randn(VOCAB, HIDDEN, requires_grad=trainable_head)
        pacs_loss(hidden, weight, b, old).backward()
        assert written and (max(written) == VOCAB if trainable_head else max(written) <= n), (written, n)
        assert (weight.grad is None) != trainable_head


def manual_lora_loss(base, adapters, b, scaling, old):
    """The same loss with each adapted weight replaced by W + scaling * B @ A (torch.func.functional_call on an
    un-wrapped copy of the base model); returns (loss, {adapter key: grad})."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in adapters.items()}
    params = {}
    for key in leaves:
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            a, bb = leaves[key], leaves[key.replace(".lora_A.", ".lora_B.")]
            params[f"{module}.weight"] = base.get_submodule(module).weight + scaling * bb @ a
    hidden = torch.func.functional_call(base, params, args=(), kwargs=dict(
        input_ids=b.input_ids, position_ids=b.position_ids, attention_mask=None, use_cache=False,
        output_hidden_states=True)).hidden_states[-1][0]
    loss = pacs_loss(hidden, base.get_output_embeddings().weight, b, old)
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


def test_lora_equals_manual_merged_weights():
    """Loss and every adapter gradient equal the manual LoRA forward W + (alpha / r) B A, to float32 tolerance."""
    base = tiny()
    model = lora.apply_lora(copy.deepcopy(base), r=4, alpha=12)
    adapters = random_adapters(model, seed=1)
    b = batch(seed=2)
    old = torch.randn(b.n_tokens, generator=torch.Generator().manual_seed(3)) - 4  # the two-pass loss
    loss = model_loss(model, b, old)
    loss.backward()
    expected_loss, expected_grads = manual_lora_loss(base.requires_grad_(False), adapters, b, 12 / 4, old)
    assert max_err(loss, expected_loss) < 1e-5
    for key, p in lora.adapter_parameters(model).items():
        assert expected_grads[key].abs().max() > 0 and max_err(p.grad, expected_grads[key]) < 1e-4, key


def test_decoder_of_peft_model_feeds_the_head():
    """decoder_of(PeftModel) is the transformer body with the adapters in: its states times the head are the
    PeftModel's own logits (PeftModel.base_model is PEFT's LoraModel, whose forward returns logits)."""
    plain = tiny()
    assert lora.decoder_of(plain) is plain.model
    model = lora.apply_lora(tiny(), r=4)
    random_adapters(model, seed=3)
    b = batch()
    with torch.no_grad():
        hidden = lora.decoder_of(model)(input_ids=b.input_ids, position_ids=b.position_ids, attention_mask=None,
                                        use_cache=False).last_hidden_state
        logits = model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False).logits
        plain_hidden = plain.model(input_ids=b.input_ids, position_ids=b.position_ids).last_hidden_state
    torch.testing.assert_close(hidden @ model.get_output_embeddings().weight.T, logits, atol=1e-5, rtol=1e-5)
    assert (hidden - plain_hidden).abs().max() > 1e-3  # the adapters are in


def test_adapter_state_round_trips_bit_exactly(tmp_path):
    model = lora.apply_lora(tiny(), r=4)
    random_adapters(model, seed=4)
    torch.save(lora.adapter_state_dict(model), tmp_path / "adapters.pt")
    with torch.random.fork_rng():
        torch.manual_seed(123)  # another LoRA initialisation
        other = lora.apply_lora(tiny(), r=4)
    lora.load_adapter_state_dict(other, torch.load(tmp_path / "adapters.pt", weights_only=True))
    for (k, p), (k2, q) in zip(lora.adapter_parameters(model).items(), lora.adapter_parameters(other).items()):
        assert k == k2 and torch.equal(p, q)
    b = batch()
    with torch.no_grad():
        assert torch.equal(logprobs(model, b), logprobs(other, b))
    with pytest.raises(ValueError, match="another --lora-r"):
        lora.load_adapter_state_dict(lora.apply_lora(tiny(), r=2), lora.adapter_state_dict(model))
    with pytest.raises(ValueError, match="another --lora-targets"):
        lora.load_adapter_state_dict(lora.apply_lora(tiny(), r=4, targets="q_proj"), lora.adapter_state_dict(model))


def test_snapshot_scores_the_old_adapters_and_copies_only_adapters():
    """AdapterSnapshot: inside `applied` the model is base + the snapshot's adapters (bitwise the pre-step model),
    outside it is the live model again (same parameter objects, same values); its memory is the adapters'."""
    model = lora.apply_lora(tiny(), r=4)
    random_adapters(model, seed=5)
    b = batch()
    snapshot = lora.AdapterSnapshot(model)
    assert snapshot.nbytes == sum(p.numel() * 4 for p in lora.adapter_parameters(model).values())
    with torch.no_grad():
        old = logprobs(model, b)
    optimizer = torch.optim.AdamW(lora.trainable_parameter_list(model), lr=1e-2)
    model_loss(model, b, old=old - 0.5).backward()
    optimizer.step()
    live = {k: (p, p.detach().clone()) for k, p in lora.adapter_parameters(model).items()}
    with torch.no_grad():
        new = logprobs(model, b)
        with snapshot.applied(model):
            assert torch.equal(logprobs(model, b), old)
        assert torch.equal(logprobs(model, b), new) and not torch.equal(new, old)
    for k, p in lora.adapter_parameters(model).items():
        assert p is live[k][0] and torch.equal(p, live[k][1])
    with pytest.raises(RuntimeError, match="no_grad"), snapshot.applied(model):
        pass
    snapshot.refresh(model)
    with torch.no_grad(), snapshot.applied(model):
        assert torch.equal(logprobs(model, b), new)
    # copy_adapters: another PEFT model of the same base gets these adapters, nothing else
    other = lora.apply_lora(tiny(), r=4)
    base_before = {n: p.clone() for n, p in other.named_parameters() if not p.requires_grad}
    lora.copy_adapters(model, other)
    with torch.no_grad():
        assert torch.equal(logprobs(other, b), new)
    assert all(torch.equal(p, base_before[n]) for n, p in other.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
def test_generation_with_adapters(attn):
    """Greedy HF generate through the PeftModel (left-padded batch) equals generation by a plain model whose
    weights are merged by hand, W + (alpha / r) B A."""
    model = lora.apply_lora(tiny(attn=attn), r=4, alpha=8)
    random_adapters(model, seed=6)
    merged = tiny(attn=attn)
    with torch.no_grad():
        for key, a in lora.adapter_parameters(model).items():
            if ".lora_A." in key:
                module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
                bb = lora.adapter_parameters(model)[key.replace(".lora_A.", ".lora_B.")]
                merged.get_submodule(module).weight += 2.0 * bb @ a
    prompt = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    args = dict(input_ids=prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**args), merged.generate(**args))


# --------------------------------------------------------------------------------------------------------------
# LoRA and varlen attention in the trainer: `pacs train --lora-r` trains adapters only, its loss and gradients are
# the LoRA forward's, resume is bit-exact, the snapshot reference copies adapters, evaluation and --init-checkpoint
# read LoRA checkpoints, and `--attn varlen` trains as sdpa does.


def captured_sessions(monkeypatch) -> list:
    """Every Session `train` sets up, with a copy of its parameters as set up (before any step)."""
    import pacs.trainer

    sessions, real = [], pacs.trainer.setup

    def spy(*args, **kwargs):
        session = real(*args, **kwargs)
        sessions.append((session, {n: p.detach().clone() for n, p in session.model.named_parameters()}))
        return session

    monkeypatch.setattr(pacs.trainer, "setup", spy)
    return sessions


def rows(run_dir, phase="train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("phase") == phase]


def mixed_rewards(monkeypatch):
    """Rewards from the text (mixed labels: a real gradient; the tiny model never answers right)."""
    import pacs.trainer

    monkeypatch.setattr(pacs.trainer, "math_reward", lambda texts, answers: [float(sum(map(ord, t)) % 2)
                                                                             for t in texts])


# ------------------------------------------------------------------------------------------------------------
# Options


def test_lora_and_varlen_options_in_help_and_config_files(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_parser(["train", "--help"]).parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("--lora-r", "--lora-alpha", "--lora-dropout", "--lora-targets", 'pip install -e ".[lora]"',
                 "varlen"):
        assert name in text, name
    path = tmp_path / "lora.yaml"
    path.write_text("lora_r: 8\nlora_alpha: 32\nlora_dropout: 0.05\nlora_targets: q_proj,v_proj\nattn: varlen\n")
    from pacs.options import load_config_file

    cfg = TrainConfig(**load_config_file(str(path))).validate()
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.attn) == (8, 32.0, 0.05,
                                                                                         "q_proj,v_proj", "varlen")


@pytest.mark.parametrize("overrides,message", [
    (dict(lora_alpha=16.0), r"--lora-alpha applies to LoRA adapters only: set --lora-r >= 1 \(0 is full"),
    (dict(lora_targets="q_proj", lora_dropout=0.1), "--lora-targets, --lora-dropout apply to LoRA .* --lora-r >= 1"),
    (dict(lora_r=-1), "--lora-r must be >= 0"),
    (dict(lora_r=4, lora_alpha=0.0), "--lora-alpha must be a finite number > 0"),
    (dict(lora_r=4, lora_dropout=1.0), r"--lora-dropout must be in \[0, 1\)"),
    (dict(lora_r=4, lora_targets=" , "), "--lora-targets must be non-empty"),
    (dict(lora_r=4, lora_targets="q_proj,lm_head"), "--lora-targets lm_head: the lm_head and the embeddings"),
    (dict(attn="flash"), "--attn must be one of auto, varlen, sdpa"),
])
def test_bad_lora_options_raise_before_anything_is_built(tmp_path, monkeypatch, overrides, message):
    import pacs.session

    monkeypatch.setattr(pacs.session, "build_tiny_model", lambda *a, **k: pytest.fail("model built"))
    with pytest.raises(ValueError, match=message):
        train(small_run_config(tmp_path / "run", **overrides))
    assert not (tmp_path / "run").exists()


def test_lora_needs_peft_and_is_refused_under_torchrun(tmp_path, monkeypatch):
    import pacs.config

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="--lora-r is not supported under torchrun: LoRA with FSDP2 is untested"):
        small_run_config(tmp_path, lora_r=4).validate()
    monkeypatch.delenv("RANK")
    real = pacs.config.importlib.util.find_spec
    monkeypatch.setattr(pacs.config.importlib.util, "find_spec", lambda name, *a: None if name == "peft" else
                        real(name, *a))
    with pytest.raises(ValueError, match=r'--lora-r needs the peft package: pip install -e "\.\[lora\]"'):
        small_run_config(tmp_path, lora_r=4).validate()
    small_run_config(tmp_path).validate()  # no LoRA: no peft needed


# ------------------------------------------------------------------------------------------------------------
# What trains


def test_pacs_train_with_lora_changes_only_adapters(tmp_path, monkeypatch, caplog):
    """`pacs train --preset smoke --lora-r 4`: after its steps the base weights and the (tied) lm_head are bitwise
    the random initialization, every adapter tensor moved; the optimizer holds the adapters only; config.json and
    the start-up log state trainable vs total parameters."""
    sessions = captured_sessions(monkeypatch)
    mixed_rewards(monkeypatch)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="pacs"):
        assert main(["train", "--preset", "smoke", "--lora-r", "4", "--device", "cpu", "--kernel-backend", "torch",
                     "--out-dir", str(out), "--plot", "false", "--steps", "2"]) == 0
    (session, initial), = sessions
    model = session.model
    cfg = session.cfg
    fresh = build_tiny_model(tiny_tokenizer(True), hidden=cfg.tiny_hidden, layers=cfg.tiny_layers,
                             heads=cfg.tiny_heads, intermediate=cfg.tiny_intermediate, max_positions=256,
                             seed=cfg.seed)
    base = dict(lora.decoder_of(model).named_parameters())
    for name, p in fresh.model.named_parameters():
        module, leaf = name.rsplit(".", 1)
        assert torch.equal(base[name] if name in base else base[f"{module}.base_layer.{leaf}"], p), name
    head = model.get_output_embeddings().weight
    assert not head.requires_grad and torch.equal(head, fresh.lm_head.weight)
    adapters = lora.adapter_parameters(model)
    assert len(adapters) == 2 * 7 * cfg.tiny_layers
    for name, p in model.named_parameters():
        assert p.requires_grad == (".lora_A." in name or ".lora_B." in name), name
        if p.requires_grad:
            assert not torch.equal(p, initial[name]), name
    state = torch.load(latest_checkpoint(out) / "training.pt", weights_only=False)["optimizer"]
    assert len(state["state"]) == len(adapters)
    trainable, total = lora.trainable_parameters(model)
    info = json.loads((out / "config.json").read_text())
    assert (info["trainable_parameters"], info["parameters"], info["lora_r"]) == (trainable, total, 4)
    assert trainable == sum(p.numel() for p in adapters.values()) and total > trainable
    assert any("trainable" in r.message and "LoRA r=4 adapters on 14 linear layers" in r.message
               for r in caplog.records)
    assert sorted(p.name for p in latest_checkpoint(out).iterdir()) == ["adapters.pt", "config.json", "lora.json",
                                                                        "trainer_state.json", "training.pt"]


def lora_tiny(seed=3, r=4, alpha=8.0, dropout=0.0, attn="sdpa"):
    """A tiny policy with non-zero random adapters (PEFT starts B at 0), and its base (a separate copy)."""
    base = tiny_model(seed=seed, attn=attn)
    model = lora.apply_lora(copy.deepcopy(base), r=r, alpha=alpha, dropout=dropout)
    gen = torch.Generator().manual_seed(seed)
    lora.load_adapter_state_dict(model, {k: torch.randn(v.shape, generator=gen) * 0.1
                                         for k, v in lora.adapter_state_dict(model).items()})
    return model, base.requires_grad_(False)


def manual_loss(base, adapters: dict, batch, rewards, cfg):
    """The configured loss of the base with each adapted weight replaced by W + (alpha / r) B A (functional_call),
    on materialized logits (backend "reference"), old log-probs = its own detached ones (on-policy, two passes).
    Returns (loss, {adapter key: gradient})."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in adapters.items()}
    params = {}
    for key, a in leaves.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            b = leaves[key.replace(".lora_A.", ".lora_B.")]
            params[f"{module}.weight"] = base.get_submodule(module).weight + 2.0 * b @ a
    hidden = torch.func.functional_call(base.model, {k.removeprefix("model."): v for k, v in params.items()},
                                        args=(), kwargs=dict(input_ids=batch.input_ids,
                                                             position_ids=batch.position_ids, attention_mask=None,
                                                             use_cache=False)).last_hidden_state[0]
    weight = base.get_output_embeddings().weight
    old = pacs_kernels.linear_logprob(hidden.detach(), weight, batch.targets, temperature=cfg.temperature,
                                      backend="reference").logprob
    args = (hidden, weight, batch.targets, old, rewards, batch.cu_seqlens)
    common = dict(group_size=cfg.group_size, temperature=cfg.temperature, backend="reference")
    if cfg.algo == "pacs":
        out = pacs_kernels.pacs_loss(*args, beta=cfg.beta, **common)
    else:
        fn = pacs_kernels.grpo_loss if cfg.algo == "grpo" else pacs_kernels.rloo_loss
        out = fn(*args, epsilon=cfg.epsilon, loss_type=cfg.loss_type, max_len=cfg.max_new_tokens, **common)
    out.loss.backward()
    return out.loss.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("algo", ["pacs", "grpo", "rloo"])
def test_update_with_lora_equals_the_manual_lora_forward(algo):
    """One optimizer step of `update_on_rollouts` (the one pass, fused head, frozen lm_head) on a LoRA policy: its
    loss and every adapter gradient equal the manual LoRA forward (merged weights, materialized logits, two
    passes) to float32 tolerance; the base and the head get no gradient."""
    (rollouts, rewards), = fixed_rollouts(1, 12, seed=500, reward_seed=3)
    assert 0 < sum(rewards) < len(rewards)
    model, base = lora_tiny()
    adapters = {k: v.clone() for k, v in lora.adapter_state_dict(model).items()}
    cfg = TrainConfig(algo=algo, group_size=4, minibatches_per_rollout=1, lr=1e-3, temperature=0.9, beta=0.7,
                      kernel_backend="torch", max_new_tokens=12)
    optimizer, scheduler = make_optimizer(model, cfg)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(adapters)
    stats = update_on_rollouts(model, optimizer, scheduler, rollouts, rewards, cfg, torch.device("cpu"))
    batch = pack_sequences([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts])
    loss, grads = manual_loss(base, adapters, batch, torch.tensor(rewards), cfg)
    assert abs(stats.loss[0] - loss.item()) < 1e-5 * max(1.0, abs(loss.item()))
    for key, p in lora.adapter_parameters(model).items():
        assert grads[key].abs().max() > 0 and max_err(p.grad, grads[key]) < 1e-4, key
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("algo,k", [("pacs", 2), ("grpo", 2), ("rloo", 3)])
def test_one_pass_with_lora_gives_the_two_pass_curve(algo, k):
    """With LoRA the first mini-batch's one pass (no old-log-prob forward) gives the curve of the two-pass loss."""
    batches = fixed_rollouts(3, 12, seed=600, reward_seed=4)
    curves, adapters = {}, {}
    for one_pass in (True, False):
        torch.manual_seed(0)
        model, _ = lora_tiny(seed=5)
        cfg = TrainConfig(algo=algo, group_size=4, minibatches_per_rollout=k, lr=3e-3, weight_decay=0.0,
                          kernel_backend="torch", temperature=0.9, one_pass=one_pass)
        optimizer, scheduler = make_optimizer(model, cfg)
        curves[one_pass] = [x for rollouts, rewards in batches for x in
                            update_on_rollouts(model, optimizer, scheduler, rollouts, rewards, cfg,
                                               torch.device("cpu")).loss]
        adapters[one_pass] = torch.cat([p.detach().reshape(-1) for p in lora.adapter_parameters(model).values()])
    torch.testing.assert_close(torch.tensor(curves[True]), torch.tensor(curves[False]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(adapters[True], adapters[False], atol=1e-4, rtol=1e-4)
    assert len(curves[True]) == 3 * k


def test_lora_dropout_scores_the_policy_in_eval_mode():
    """--lora-dropout > 0: the old-log-prob pass is the policy itself (eval mode, deterministic, equal to a
    dropout-free copy of the adapters) whatever mode the model was in, and it restores that mode; the gradient
    pass is a dropout sample."""
    model, _ = lora_tiny(seed=6, dropout=0.5)
    plain, _ = lora_tiny(seed=6, dropout=0.0)
    (rollouts, _), = fixed_rollouts(1, 8, seed=700, reward_seed=5)
    batch = pack_sequences([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts])
    settings = LossSettings.from_config(TrainConfig(kernel_backend="torch"))
    model.train()
    first, second = old_logprobs(model, batch, settings), old_logprobs(model, batch, settings)
    assert model.training
    with torch.no_grad():
        expected = packed_logprobs(plain.eval(), batch, temperature=1.0, backend="torch").logprob
        sampled = packed_logprobs(model, batch, temperature=1.0, backend="torch").logprob
    assert torch.equal(first, second) and torch.equal(first, expected)
    assert (sampled - expected).abs().max() > 1e-3  # dropout is on in the gradient pass


def test_gradient_checkpointing_with_lora_gives_the_same_gradients(tmp_path, monkeypatch):
    """--gradient-checkpointing under LoRA (frozen embeddings: the checkpointed layers' inputs need no grad): the
    same losses and adapters as without it."""
    mixed_rewards(monkeypatch)
    outs = {}
    for gc in (False, True):
        run = train(small_run_config(tmp_path / str(gc), steps=2, lora_r=4, gradient_checkpointing=gc, save_every=0))
        outs[gc] = ([r["loss"] for r in rows(run)], [r["grad_norm"] for r in rows(run)],
                    torch.load(latest_checkpoint(run) / "adapters.pt"))
    assert outs[True][0] == pytest.approx(outs[False][0], rel=1e-5, abs=1e-6)
    assert outs[True][1] == pytest.approx(outs[False][1], rel=1e-4) and min(outs[True][1]) > 0
    for key, value in outs[False][2].items():
        torch.testing.assert_close(outs[True][2][key], value, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Checkpoints: resume, the snapshot reference, evaluation, --init-checkpoint


@pytest.mark.parametrize("algo,reference", [("pacs", "old"), ("pacs", "snapshot:2"), ("grpo", "old")])
def test_lora_resume_continues_bit_exactly(tmp_path, monkeypatch, algo, reference):
    """A LoRA run stopped after 2 steps and resumed to 4 ends with the uninterrupted run's adapters, snapshot
    (reference.pt: adapters only) and losses, bit for bit."""
    mixed_rewards(monkeypatch)
    common = dict(algo=algo, reference=reference, lora_r=4, lora_alpha=4.0)
    straight = train(small_run_config(tmp_path / "a", steps=4, **common))
    train(small_run_config(tmp_path / "b", steps=2, **common))
    resumed = train(small_run_config(tmp_path / "b", steps=4, resume=True, **common))
    a, b = latest_checkpoint(straight), latest_checkpoint(resumed)
    assert b.name == "step_000004" and not (a / "model.pt").exists()
    names = ["adapters.pt"] + (["reference.pt"] if reference != "old" else [])
    for name in names:
        x, y = torch.load(a / name), torch.load(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
        assert all(".lora_A." in k or ".lora_B." in k for k in x), name  # adapters only, no base weight
    assert [r["loss"] for r in rows(straight)] == [r["loss"] for r in rows(resumed)]
    assert len(rows(straight)) == 4 and len({r["loss"] for r in rows(straight)}) > 1


def test_snapshot_reference_under_lora_copies_the_adapters(tmp_path, monkeypatch):
    """--reference snapshot:2 with LoRA: the reference saved after step s holds the adapters of the model after
    step 2 * floor((s - 1) / 2), and the snapshot is an AdapterSnapshot (no copy of the base)."""
    from pacs.lora import AdapterSnapshot
    from pacs.update import SnapshotReference

    mixed_rewards(monkeypatch)
    sessions = captured_sessions(monkeypatch)
    run = train(small_run_config(tmp_path, steps=4, reference="snapshot:2", save_every=1, keep_checkpoints=0,
                                 lora_r=4))
    ckpts = {int(p.name.split("_")[1]): p for p in (run / "checkpoints").glob("step_*")}
    adapters = {s: torch.load(p / "adapters.pt") for s, p in ckpts.items()}
    initial = sessions[0][1]  # the parameters as set up, named as the model's (adapter name included)
    adapters[0] = {k: initial[k.replace(".weight", ".default.weight")] for k in adapters[1]}
    refs = {s: torch.load(p / "reference.pt") for s, p in ckpts.items()}
    assert sorted(refs) == [1, 2, 3, 4]
    for step, ref in refs.items():
        source = adapters[2 * ((step - 1) // 2)]
        assert all(torch.equal(ref[k], source[k]) for k in source), step
    assert not all(torch.equal(adapters[4][k], adapters[2][k]) for k in adapters[2])
    model, _ = lora_tiny()
    reference = SnapshotReference(model, TrainConfig(reference="snapshot:3", lora_r=4))
    assert isinstance(reference.snapshot, AdapterSnapshot)
    assert reference.snapshot.nbytes == sum(p.numel() * 4 for p in lora.adapter_parameters(model).values())


def test_pacs_eval_on_a_lora_run_scores_the_trained_policy(tmp_path, monkeypatch):
    """`pacs eval --run` on a LoRA run (whose base is itself an --init-checkpoint) rebuilds base + adapters: the
    session it evaluates gives the trained model's log-probs bit for bit."""
    import pacs.session

    mixed_rewards(monkeypatch)
    warm = train(small_run_config(tmp_path / "warm", steps=1, tiny_layers=3))  # full fine-tuning: the base
    # 3 layers: 21 adapted layers, a list PEFT's config shortens to 7 name suffixes (lora.json keeps all 21)
    sessions = captured_sessions(monkeypatch)
    run = train(small_run_config(tmp_path / "run", steps=2, lora_r=4, tiny_layers=3,
                                 init_checkpoint=str(latest_checkpoint(warm))))
    trained = sessions[0][0].model
    evaluated = []
    real_setup = pacs.session.setup
    monkeypatch.setattr(pacs.session, "setup", lambda cfg: evaluated.append(real_setup(cfg)) or evaluated[-1])
    assert main(["eval", "--run", str(run), "--eval-n", "2", "--tag", "lora"]) == 0
    assert json.loads((run / "eval" / "lora.json").read_text())["checkpoint"] == str(latest_checkpoint(run))
    (rollouts, _), = fixed_rollouts(1, 6, seed=800, reward_seed=6)
    batch = pack_sequences([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts])
    with torch.no_grad():
        expected = packed_logprobs(trained.eval(), batch, temperature=1.0, backend="torch").logprob
        got = packed_logprobs(evaluated[0].model.eval(), batch, temperature=1.0, backend="torch").logprob
        with trained.disable_adapter():  # PEFT: the base alone
            plain = packed_logprobs(trained, batch, temperature=1.0, backend="torch").logprob
    assert lora.is_peft_model(evaluated[0].model) and torch.equal(got, expected)
    assert len(json.loads((latest_checkpoint(run) / "lora.json").read_text())["targets"]) == 21
    assert len(lora.adapted_layers(evaluated[0].model)) == 21
    assert (plain - expected).abs().max() > 1e-4  # the adapters matter: the check above can fail


def test_init_checkpoint_from_a_lora_checkpoint(tmp_path, monkeypatch):
    """--init-checkpoint of a LoRA checkpoint: with the same LoRA settings the adapters load as they are (bit for
    bit); a full fine-tuning run or other LoRA settings start from the merged weights (W + alpha / r B A: equal
    log-probs to float32 rounding); another tiny base is refused."""
    mixed_rewards(monkeypatch)
    run = train(small_run_config(tmp_path / "lora", steps=2, lora_r=4))
    ckpt = str(latest_checkpoint(run))
    (rollouts, _), = fixed_rollouts(1, 6, seed=900, reward_seed=7)
    batch = pack_sequences([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts])

    def logprobs(**overrides):
        session = setup(small_run_config(tmp_path / "x", init_checkpoint=ckpt, **overrides))
        with torch.no_grad():
            return session.model, packed_logprobs(session.model.eval(), batch, temperature=1.0,
                                                  backend="torch").logprob

    same_model, same = logprobs(lora_r=4)
    assert lora.is_peft_model(same_model)
    saved = torch.load(latest_checkpoint(run) / "adapters.pt")
    assert all(torch.equal(lora.adapter_state_dict(same_model)[k], v) for k, v in saved.items())
    full_model, full = logprobs()
    assert not lora.is_peft_model(full_model)
    torch.testing.assert_close(full, same, atol=1e-5, rtol=1e-5)
    other_model, other = logprobs(lora_r=2)
    assert not all(torch.equal(p, torch.zeros_like(p)) for p in lora.adapter_state_dict(other_model).values())
    torch.testing.assert_close(other, same, atol=1e-5, rtol=1e-5)  # fresh adapters (B = 0) on merged weights
    base = setup(small_run_config(tmp_path / "y")).model
    with torch.no_grad():
        untouched = packed_logprobs(base.eval(), batch, temperature=1.0, backend="torch").logprob
    assert (untouched - same).abs().max() > 1e-4  # the adapters matter: the checks above can fail
    with pytest.raises(ValueError, match="holds LoRA adapters of the base .*--seed.*own base only"):
        setup(small_run_config(tmp_path / "z", init_checkpoint=ckpt, seed=1))
    with pytest.raises(ValueError, match="holds no model.pt: it was written by a LoRA run"):
        train(small_run_config(run, steps=3, resume=True))  # resume without --lora-r


# ------------------------------------------------------------------------------------------------------------
# --attn varlen through the trainer


@pytest.mark.parametrize("lora_r", [0, 4])
def test_varlen_attention_trains_as_sdpa_does(tmp_path, monkeypatch, lora_r):
    """`pacs train --attn varlen` on the CPU (the per-sequence path, no packed mask): the first step's rewards,
    loss (both mini-batches: the second scores psi against the rollout policy), gradient norm and entropy equal
    sdpa's to float32 tolerance, with and without LoRA; the packed forward passes the boundaries to the layers."""
    mixed_rewards(monkeypatch)
    calls = []
    real = attention.packed_attention
    monkeypatch.setattr(attention, "packed_attention", lambda *a, **k: calls.append(a[3].n_tokens) or real(*a, **k))
    first = {}
    for attn in ("sdpa", "varlen"):
        calls.clear()
        run = train(small_run_config(tmp_path / attn, steps=1, attn=attn, lora_r=lora_r, save_every=0,
                                     one_pass=False))
        first[attn] = rows(run)[0]
        assert json.loads((run / "config.json").read_text())["attention"] == attn
        assert bool(calls) == (attn == "varlen")
    assert 0 < first["varlen"]["reward"] < 1 and first["varlen"]["reward"] == first["sdpa"]["reward"]
    for key in ("loss", "grad_norm", "entropy", "psi_mean"):
        assert first["varlen"][key] == pytest.approx(first["sdpa"][key], rel=1e-5, abs=1e-6), key
    assert first["varlen"]["grad_norm"] > 0
    assert json.loads((tmp_path / "varlen" / "config.json").read_text())["trainable_parameters"] < \
        json.loads((tmp_path / "varlen" / "config.json").read_text())["parameters"] or not lora_r


@pytest.mark.gpu
def test_lora_with_varlen_attention_on_cuda_in_bf16(tmp_path):
    """On a GPU (sm_80+: torch's varlen kernel under --attn varlen): 2 LoRA steps of the tiny model in bf16 on the
    Triton kernels; finite losses and gradients, float32 adapters in the checkpoint, the bf16 base untouched."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("torch's varlen kernel needs sm_80+")
    chosen = []
    real = attention.packed_attention
    def attention_spy(query, key, value, *rest, **kwargs):
        chosen.append(attention._auto_backend(query, key, value, query.shape[-1] ** -0.5, None, None, 0.0))
        return real(query, key, value, *rest, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "packed_attention", attention_spy)
        sessions = []
        import pacs.trainer

        real_setup = pacs.trainer.setup
        patch.setattr(pacs.trainer, "setup", lambda *a, **k: sessions.append(real_setup(*a, **k)) or sessions[-1])
        run = train(small_run_config(tmp_path, steps=2, device="cuda", dtype="bfloat16", kernel_backend="triton",
                                     attn="varlen", lora_r=8, tiny_hidden=64, tiny_heads=4))
    assert set(chosen) == {"torch"} or set(chosen) == {"flash_attn"}
    steps = rows(run)
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() and r["grad_norm"] > 0 for r in steps)
    adapters = torch.load(latest_checkpoint(run) / "adapters.pt")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in adapters.values())
    model = sessions[0].model
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if not p.requires_grad)
