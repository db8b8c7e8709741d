"""LoRA through PEFT (pacs/lora.py) on a tiny random Qwen2: what trains, what stays frozen, the math, the state."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import pacs_kernels  # noqa: E402
from pacs import attention  # noqa: E402, F401  (registers "varlen")
from pacs import lora  # noqa: E402
from pacs.modeling import pack_sequences  # noqa: E402
from pacs_kernels import _gemm  # noqa: E402

from .helpers import max_err  # noqa: E402

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
