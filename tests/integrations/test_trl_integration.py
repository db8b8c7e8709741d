"""pacs inside TRL (pacs/integrations/trl.py): PACSTrainer / PACSConfig against TRL's own GRPOTrainer.

Everything runs offline on the CPU: a tiny random Qwen2 (float32) and a character-level tokenizer built with
`tokenizers`. The vocabulary (4096) is wider than the slices pacs_kernels uses at a 1 MiB budget, so the
"no [tokens x vocab] tensor" probe can tell the two heads apart (TRL's tile spans the whole vocabulary below its
32768-column chunk).
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch

trl = pytest.importorskip("trl")

from pacs.integrations import trl as pacs_trl  # noqa: E402
from pacs.integrations.trl import PACSConfig, PACSTrainer  # noqa: E402
from pacs_kernels.reference import pacs_loss_reference  # noqa: E402

V = 4096
D = 32
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 +=?")
PROMPTS = ["1+1=", "2+3=", "ab?", "xyz", "7+2=", "q="]
GRPO_LOSSES = ["grpo", "dapo", "dr_grpo", "bnpo"]
OTHER_TRL_LOSSES = ["cispo", "sapo", "luspo", "vespo"]


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + CHARS)}
    vocab.update({f"<x{i}>": i for i in range(len(vocab), V)})  # every id the model can sample decodes
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_model(tied=True, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tied,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).float()


def dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS})


def alternating_reward(completions, **kwargs):
    """1, 0, 1, 0, ...: every group of an even size holds both labels, so the critic's AUC is defined."""
    return [float(i % 2 == 0) for i in range(len(completions))]


@pytest.fixture(autouse=True)
def _output_dir(tmp_path, monkeypatch):
    """Each test's trainers write under its own tmp_path (parallel runs share no directory)."""
    monkeypatch.setattr(sys.modules[__name__], "OUTPUT_DIR", str(tmp_path / "trl-output"))


OUTPUT_DIR = None


def config(cls=PACSConfig, **overrides):
    base = dict(output_dir=OUTPUT_DIR, use_cpu=True, per_device_train_batch_size=4, num_generations=2,
                max_completion_length=6, max_steps=1, logging_steps=1, report_to="none", seed=0,
                learning_rate=1e-2, save_strategy="no", disable_tqdm=True, bf16=False)
    if cls is PACSConfig:
        base.update(pacs_kernel_backend="torch", pacs_memory_budget="1M")
    base.update(overrides)
    return cls(**base)


def make_trainer(cls, args, tokenizer, model=None, reward=alternating_reward, **kwargs):
    trainer = cls(model=model if model is not None else tiny_model(), reward_funcs=[reward], args=args,
                  train_dataset=dataset(), processing_class=tokenizer, **kwargs)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # set by train() otherwise
    return trainer


def hand_batch(trainer, seed=1, off_policy=True, groups=(0, 0, 1, 1), completion_length=6):
    """A GRPO batch by hand: left-padded prompts, completions with padding, advantages, labels 1, 0, 0, 1, ...,
    and (off_policy) old log-probs away from the current ones so that TRL's clipping and ratios are exercised."""
    g = torch.Generator().manual_seed(seed)
    B, P, C = len(groups), 4, completion_length
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_ids[prompt_mask == 0] = 0
    completion_ids = torch.randint(3, V, (B, C), generator=g)
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[0, 4:] = 0
    completion_mask[3, 2:] = 0
    completion_ids[completion_mask == 0] = 0
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": torch.tensor([1.0, -0.5, 0.7, -1.2] * (B // 4))[:B],
        "num_items_in_batch": completion_mask.sum(),
        "pacs_rewards": torch.tensor([1.0, 0.0, 0.0, 1.0] * (B // 4))[:B], "pacs_group": torch.tensor(groups),
    }
    if off_policy:
        with torch.no_grad():
            logps, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
                C)
        inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(B, C, generator=g)
    return inputs


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_rel_close(actual, expected, rel=1e-5, what=""):
    err = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    assert err <= rel * max(scale, 1e-12), f"{what}: relative error {err / max(scale, 1e-30):.3g} > {rel}"


def assert_same_loss_and_grads(a, b, rel=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert_rel_close(loss_a, loss_b, rel, "loss")
    assert grads_a.keys() == grads_b.keys()
    for name in grads_b:
        assert_rel_close(grads_a[name], grads_b[name], rel, name)


def grpo_pair(tokenizer, loss_type, tied=True, **overrides):
    """A GRPOTrainer and a PACSTrainer on copies of the same weights, both with TRL's loss `loss_type`."""
    model = tiny_model(tied=tied)
    grpo = make_trainer(trl.GRPOTrainer, config(trl.GRPOConfig, loss_type=loss_type, **overrides), tokenizer,
                        copy.deepcopy(model))
    pacs = make_trainer(PACSTrainer, config(loss_type=loss_type, **overrides), tokenizer, copy.deepcopy(model))
    return grpo, pacs


# ------------------------------------------------------------------------------------- TRL's losses, fused head
@pytest.mark.parametrize("loss_type", GRPO_LOSSES + OTHER_TRL_LOSSES)
def test_trl_losses_equal_grpo_trainer(tokenizer, loss_type):
    overrides = {"importance_sampling_level": "sequence"} if loss_type == "luspo" else {}
    grpo, pacs = grpo_pair(tokenizer, loss_type, **overrides)
    inputs = hand_batch(grpo)
    assert_same_loss_and_grads(loss_and_grads(pacs, inputs), loss_and_grads(grpo, inputs))


@pytest.mark.parametrize("case", ["untied", "entropy_terms", "temperature", "on_policy"])
def test_trl_loss_variants_equal_grpo_trainer(tokenizer, case):
    """Untied lm_head; the entropy bonus and the high-entropy mask (entropy gradient kept); a sampling
    temperature; TRL's on-policy step (no old log-probs)."""
    overrides = {"entropy_terms": dict(entropy_coef=0.05, top_entropy_quantile=0.5),
                 "temperature": dict(temperature=0.7)}.get(case, {})
    grpo, pacs = grpo_pair(tokenizer, "dapo", tied=case != "untied", **overrides)
    inputs = hand_batch(grpo, off_policy=case != "on_policy")
    assert_same_loss_and_grads(loss_and_grads(pacs, inputs), loss_and_grads(grpo, inputs))


def test_kl_with_reference_model_equals_grpo_trainer(tokenizer, tmp_path):
    """beta != 0: TRL loads a reference model from the path; the plug-in gives it the fused head too."""
    tiny_model().save_pretrained(tmp_path)
    grpo = make_trainer(trl.GRPOTrainer, config(trl.GRPOConfig, loss_type="grpo", beta=0.1), tokenizer, str(tmp_path))
    pacs = make_trainer(PACSTrainer, config(loss_type="grpo", beta=0.1), tokenizer, str(tmp_path))
    inputs = hand_batch(grpo)
    with torch.no_grad():  # the reference's log-probs through each trainer's own reference head
        for trainer in (grpo, pacs):
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            trainer._ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, mask, 6)
    assert_rel_close(pacs._ref, grpo._ref, 1e-5, "reference log-probs")
    inputs["ref_per_token_logps"] = grpo._ref - 0.2
    assert_same_loss_and_grads(loss_and_grads(pacs, inputs), loss_and_grads(grpo, inputs))


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", GRPO_LOSSES)
def test_same_seed_runs_log_same_first_step(tokenizer, loss_type):
    """Full train() runs: same seed, same weights -> same rollouts; the first step's loss and grad norm agree."""
    model = tiny_model()
    logs = []
    for cls, cfg_cls in ((trl.GRPOTrainer, trl.GRPOConfig), (PACSTrainer, PACSConfig)):
        trainer = make_trainer(cls, config(cfg_cls, loss_type=loss_type, num_iterations=2), tokenizer,
                               copy.deepcopy(model))
        trainer.train()
        logs.append(trainer.state.log_history[0])
    grpo_log, pacs_log = logs
    for key in ("loss", "grad_norm", "entropy"):
        assert math.isclose(pacs_log[key], grpo_log[key], rel_tol=1e-5, abs_tol=1e-7), (key, pacs_log, grpo_log)


# ------------------------------------------------------------------------------------------------- no V per token
class VocabRowProbe(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op output with at least a vocabulary's worth of columns per row (a [rows, >= V] tensor),
    other than [D, V]-shaped weight views and gradients."""

    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] >= V and t.shape[0] != D:
                self.hits.append((str(func), tuple(t.shape)))
        return out


def probe_batch(trainer):
    """Enough tokens (about 100) that a 1 MiB budget holds fewer than V columns of them: pacs_kernels slices."""
    return hand_batch(trainer, groups=(0, 0, 1, 1, 2, 2, 3, 3), completion_length=16)


def probe_loss_path(trainer, inputs):
    calls = []
    handle = trainer.model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        with VocabRowProbe() as probe:
            loss_and_grads(trainer, inputs)
    finally:
        handle.remove()
    return probe.hits, len(calls)


@pytest.mark.parametrize("loss_type", ["dapo", "pacs"])
def test_no_vocab_per_token_tensor_in_loss_path(tokenizer, loss_type):
    pacs = make_trainer(PACSTrainer, config(loss_type=loss_type), tokenizer)
    hits, head_calls = probe_loss_path(pacs, probe_batch(pacs))
    assert hits == [] and head_calls == 0, (hits[:5], head_calls)


def test_vocab_probe_catches_trl_head(tokenizer):
    """The probe can fail: TRL's own head computes [tokens, vocab-chunk] tiles, the whole vocabulary here."""
    grpo = make_trainer(trl.GRPOTrainer, config(trl.GRPOConfig, loss_type="dapo"), tokenizer)
    hits, _ = probe_loss_path(grpo, probe_batch(grpo))
    assert any(shape[-1] >= V for _, shape in hits)


# ----------------------------------------------------------------------------------------------------- PACS loss
def test_pacs_two_steps(tokenizer):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(PACSTrainer, config(max_steps=2), tokenizer, model)
    trainer.train()
    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert len(steps) == 2
    assert math.isclose(steps[0]["loss"], math.log(2), abs_tol=1e-6), steps[0]  # on-policy: psi = 0
    assert steps[0]["pacs/psi_mean"] == 0.0 and steps[0]["pacs/critic_brier"] == pytest.approx(0.25)
    for key in ("pacs/psi_mean", "pacs/psi_std", "pacs/critic_brier", "pacs/critic_auc", "pacs/bce", "entropy"):
        assert all(key in log for log in steps), key
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no parameter changed"


@pytest.mark.parametrize("advantage,score,class_balance", [
    ("rloo", "logratio_sum", True), ("grpo", "logratio_sum", False), ("naive", "logprob_mean", True)])
def test_pacs_loss_matches_float64_reference(tokenizer, advantage, score, class_balance):
    """Off-policy PACS loss and gradients against pacs_kernels.reference (materialized logits, float64)."""
    trainer = make_trainer(PACSTrainer, config(pacs_advantage=advantage, pacs_score=score,
                                               pacs_class_balance=class_balance, pacs_beta=2.0), tokenizer)
    inputs = hand_batch(trainer, groups=(1, 0, 0, 1))  # rows of one group apart: the plug-in regroups them
    loss, grads = loss_and_grads(trainer, inputs)

    ref_model = copy.deepcopy(trainer.model).double()
    order = torch.tensor([1, 2, 0, 3])  # the rows sorted by group
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)[order]
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)[order]
    hidden = ref_model.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
    targets = ids[:, 1:].masked_fill(attn[:, 1:] == 0, -100)
    targets[:, : -inputs["completion_ids"].size(1)] = -100
    old = torch.zeros_like(targets, dtype=torch.float64)
    old[:, -6:] = inputs["old_per_token_logps"][order].double()
    S, T = targets.shape
    ref_loss = pacs_loss_reference(hidden.reshape(S * T, D), ref_model.lm_head.weight, targets.reshape(-1),
                                   old.reshape(-1), inputs["pacs_rewards"][order], torch.arange(S + 1) * T,
                                   group_size=2, beta=2.0, score=score, advantage=advantage,
                                   class_balance=class_balance).loss
    ref_loss.backward()
    assert_rel_close(loss, ref_loss.detach(), 1e-5, "loss")
    for name, p in ref_model.named_parameters():
        assert_rel_close(grads[name], p.grad, 1e-4, name)


def test_pacs_soft_labels_class_balance(tokenizer):
    """Soft labels with class balance take the PyTorch path; with {0, 1} labels that path equals the kernel's."""
    trainer = make_trainer(PACSTrainer, config(), tokenizer)
    inputs = hand_batch(trainer)
    kernel = loss_and_grads(trainer, inputs)
    m = inputs["completion_mask"].bool()
    lp = torch.randn(4, 6, requires_grad=True)
    old = inputs["old_per_token_logps"]
    torch_path = pacs_trl.pacs_soft_balanced(lp, old, m, inputs["pacs_rewards"], 2, 1.0, "logratio_sum", "rloo")
    from pacs_kernels import pacs_loss_from_logprobs

    ref = pacs_loss_from_logprobs(lp.reshape(-1), old.reshape(-1), inputs["pacs_rewards"], torch.arange(5) * 6,
                                  group_size=2, mask=m.reshape(-1))
    assert torch.allclose(torch_path[0], ref.loss, rtol=1e-6)
    soft = dict(inputs, pacs_rewards=torch.tensor([0.9, 0.2, 0.4, 0.7]))
    loss, grads = loss_and_grads(trainer, soft)
    assert torch.isfinite(loss) and not torch.allclose(loss, kernel[0])


def test_pacs_accumulation_and_steps_per_generation(tokenizer):
    """Gradient accumulation with 4 micro-batches per generation: TRL computes old log-probs, groups stay whole
    through the group-wise shuffle, and the later micro-batches are off-policy (psi != 0)."""
    trainer = make_trainer(PACSTrainer, config(per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                               steps_per_generation=4, max_steps=2), tokenizer)
    trainer.train()
    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert len(steps) == 2 and all(math.isfinite(log["loss"]) for log in steps)
    assert steps[1]["pacs/psi_std"] > 0


def test_pacs_entropy_bonus(tokenizer):
    """On-policy PACS with TRL's entropy_coef: ln 2 minus coef x the mean completion-token entropy, whose gradient
    the loss carries (the gradient differs from the loss without the bonus)."""
    coef = 0.1
    trainer = make_trainer(PACSTrainer, config(entropy_coef=coef), tokenizer)
    inputs = hand_batch(trainer, off_policy=False)
    loss, grads = loss_and_grads(trainer, inputs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        _, entropy, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, 6, compute_entropy=True)
    m = inputs["completion_mask"]
    assert math.isclose(loss.item(), math.log(2) - coef * ((entropy * m).sum() / m.sum()).item(), rel_tol=1e-6)
    plain = make_trainer(PACSTrainer, config(), tokenizer, copy.deepcopy(trainer.model))
    _, plain_grads = loss_and_grads(plain, inputs)
    assert not torch.allclose(grads["model.norm.weight"], plain_grads["model.norm.weight"])


def test_pacs_evaluate(tokenizer):
    """TRL's evaluation loop: groups of num_generations_eval, the same metrics under eval_."""
    trainer = make_trainer(PACSTrainer, config(per_device_eval_batch_size=4), tokenizer,
                           eval_dataset=dataset().select(range(2)))
    metrics = trainer.evaluate()
    assert math.isclose(metrics["eval_loss"], math.log(2), abs_tol=1e-6)
    assert metrics["eval_pacs/critic_auc"] == 0.5 and "eval_pacs/psi_std" in metrics


@pytest.mark.cpu  # use_cpu=True: the triton backend on CPU tensors runs under the interpreter only
def test_pacs_triton_backend_matches_torch(tokenizer):
    trainer = make_trainer(PACSTrainer, config(), tokenizer)
    inputs = hand_batch(trainer)
    expected = loss_and_grads(trainer, inputs)
    triton = make_trainer(PACSTrainer, config(pacs_kernel_backend="triton"), tokenizer,
                          copy.deepcopy(trainer.model))
    assert_same_loss_and_grads(loss_and_grads(triton, inputs), expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("overrides,match", [
    (dict(pacs_beta=0.0), "pacs_beta"), (dict(pacs_beta=float("nan")), "pacs_beta"),
    (dict(pacs_advantage="ppo"), "pacs_advantage"), (dict(pacs_score="sum"), "pacs_score"),
    (dict(pacs_kernel_backend="cuda"), "pacs_kernel_backend"), (dict(loss_type="ppo"), "loss_type"),
    (dict(pacs_class_balance="yes"), "pacs_class_balance"),
    (dict(per_device_train_batch_size=3, num_generations=2, generation_batch_size=6), "per_device_train_batch_size"),
    (dict(beta=0.04), "beta=0.0"), (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
])
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        config(**overrides)


def test_rewards_outside_unit_interval_raise(tokenizer):
    trainer = make_trainer(PACSTrainer, config(), tokenizer, reward=lambda completions, **kw: [2.0] * len(completions))
    with pytest.raises(ValueError, match=r"\[0, 1\].*2\.0"):
        trainer.train()


def test_split_group_raises(tokenizer):
    trainer = make_trainer(PACSTrainer, config(), tokenizer)
    with pytest.raises(ValueError, match="per_device_train_batch_size.*num_generations"):
        trainer.compute_loss(trainer.model, hand_batch(trainer, groups=(0, 0, 0, 1)))


def test_pacs_needs_pacs_config(tokenizer):
    with pytest.raises(ValueError, match="PACSConfig"):
        make_trainer(PACSTrainer, config(trl.GRPOConfig, loss_type="pacs"), tokenizer)


def test_trl_internals_check(monkeypatch):
    pacs_trl.check_trl()  # the installed TRL is a tested one
    monkeypatch.setattr(trl, "__version__", "9.0.0")
    with pytest.warns(UserWarning, match="tested with trl>="):
        pacs_trl.check_trl()
    monkeypatch.delattr(trl.GRPOTrainer, "_generate_and_score_completions")
    with pytest.raises(RuntimeError, match=r"tested with trl>=1\.16,<2.*_generate_and_score_completions"):
        pacs_trl.check_trl()


# --------------------------------------------------------------------------------------------------------- PEFT
def test_peft_lora_equals_grpo_trainer(tokenizer):
    peft = pytest.importorskip("peft")
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = tiny_model()
    trainers = []
    for cls, cfg_cls in ((trl.GRPOTrainer, trl.GRPOConfig), (PACSTrainer, PACSConfig)):
        trainers.append(make_trainer(cls, config(cfg_cls, loss_type="dapo"), tokenizer, copy.deepcopy(model),
                                     peft_config=peft.LoraConfig(**lora)))
    grpo, pacs = trainers
    with torch.no_grad():  # same adapter weights, B non-zero so that every LoRA factor gets a gradient
        for (_, pg), (_, pp) in zip(grpo.model.named_parameters(), pacs.model.named_parameters()):
            if pg.requires_grad:
                pg.normal_(0, 0.1)
                pp.copy_(pg)
    inputs = hand_batch(grpo)
    result = loss_and_grads(pacs, inputs)
    assert result[1] and all("lora" in name for name in result[1])
    assert_same_loss_and_grads(result, loss_and_grads(grpo, inputs))

    # An adapter on the head itself would be ignored by a head that reads lm_head.weight: TRL refuses it up front
    # (the plug-in's forward checks it again).
    with pytest.raises(ValueError, match="lm_head"):
        make_trainer(PACSTrainer, config(loss_type="dapo"), tokenizer, tiny_model(tied=False),
                     peft_config=peft.LoraConfig(**dict(lora, target_modules=["q_proj", "lm_head"])))


@pytest.mark.parametrize("sampling,named", [
    (dict(top_p=0.9), "top_p=0.9"), (dict(top_k=20), "top_k=20"), (dict(min_p=0.05), "min_p=0.05"),
    (dict(generation_kwargs={"top_k": 50}), "top_k=50"), (dict(top_p=0.8, top_k=10), "top_k=10, top_p=0.8"),
])
def test_truncated_sampling_is_refused_at_start_up(tokenizer, sampling, named):
    """TRL 1.16 hands no kept sets to the trainer: where pacs computes the log-probs (the fused head, the PACS loss),
    truncated sampling is a ValueError naming the options, not a silent full-vocabulary normalization."""
    assert pacs_trl.sampling_truncation(config(**sampling)) == named.split(", ")
    for loss in ("pacs", "dapo"):
        with pytest.raises(ValueError, match=rf"TRL samples with {named}: .* no kept sets"):
            make_trainer(PACSTrainer, config(loss_type=loss, **sampling), tokenizer)
    # TRL's own head with TRL's loss: nothing of pacs normalizes anything, so TRL's behaviour is left alone.
    make_trainer(PACSTrainer, config(loss_type="dapo", pacs_fused_head=False, **sampling), tokenizer)
    # A generation_kwargs value that switches the option off again counts as off.
    assert pacs_trl.sampling_truncation(config(top_p=0.9, generation_kwargs={"top_p": 1.0})) == []
    assert pacs_trl.sampling_truncation(config()) == []
