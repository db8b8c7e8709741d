"""Models and the padding-free packed forward that feeds hidden states to pacs_kernels.

No [tokens x vocab] logits are formed in training or in the old-log-prob pass: the base model (without its
lm_head) runs on the packed sequences, and its last hidden states go with `get_output_embeddings().weight`
(tied embeddings work) into `pacs_kernels.linear_logprob` / `pacs_loss`. Nothing in transformers is patched.

Packing: S sequences are concatenated into one row of N tokens with position_ids restarting at 0 for each, and
`attention_mask=None, use_cache=False`. transformers (4.5x and 5.x) then derives a block-diagonal causal mask
from the position_ids for sdpa and flash-attention alike; with an attention_mask or a cache the sequences would
silently attend to each other (tests/trainer/test_trainer.py::test_packed_equals_padded guards this). With "varlen"
attention (pacs/attention.py) no mask is built: the sequence boundaries go to every layer (`packing_kwargs`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

import pacs_kernels

from .attention import VARLEN, packed_attention_kwargs
from .lora import decoder_of

logger = logging.getLogger("pacs")

IGNORE_INDEX = -100


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("the pacs trainer needs Hugging Face transformers: pip install -e '.[hf]'") from None
    return transformers


def build_tiny_model(tokenizer, *, hidden: int, layers: int, heads: int, intermediate: int, max_positions: int,
                     seed: int, attn_implementation: str = "sdpa"):
    """A random-init Qwen2-architecture causal LM sized for CPU demos (tied embeddings)."""
    transformers = _transformers()
    Qwen2Config, Qwen2ForCausalLM = transformers.Qwen2Config, transformers.Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model


def model_source(name: str, *, timeout: float = 5.0) -> tuple[str, bool]:
    """Where `--model NAME` loads from, decided before anything is built: (path or hub id, local_files_only).

    A local directory loads as it is (`~` expanded). A hub id in the local Hugging Face cache loads from the cache
    when the hub cannot be asked (HF_HUB_OFFLINE, or no answer within `timeout` seconds); otherwise one metadata
    request with that timeout and no retries decides: a hub that does not answer, or has no such model, is a
    ValueError at once (transformers' own loader would retry for about a minute first)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), False
    try:
        from huggingface_hub import HfApi, constants, try_to_load_from_cache
        from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    except ImportError:  # transformers brings huggingface_hub; without it the loader reports what is missing
        return name, False
    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return name, True
        raise ValueError(f"--model {name}: no local directory {name}, and not in the Hugging Face cache "
                         "(HF_HUB_OFFLINE is set, so the hub is not asked)")
    try:
        HfApi().model_info(name, timeout=timeout)
    except GatedRepoError:
        return name, False  # the loader says how to get access
    except RepositoryNotFoundError:
        if cached:
            return name, True
        raise ValueError(f"--model {name}: no local directory {name}, and no model {name} on the Hugging Face hub "
                         "(a private or gated model needs `hf auth login`)") from None
    except HfHubHTTPError as err:
        if cached:
            return name, True
        raise ValueError(f"--model {name}: the Hugging Face hub answered {' '.join(str(err).split())[:200]}") \
            from None
    except Exception as err:  # no connection, DNS failure, timeout: the hub is unreachable
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        if cached:
            logger.warning("the Hugging Face hub is unreachable (%s): loading %s from the local cache", reason, name)
            return name, True
        raise ValueError(f"--model {name}: no local directory {name}, not in the Hugging Face cache, and the hub "
                         f"({constants.ENDPOINT}) is unreachable ({reason}); give a local model directory, or "
                         "retry once the hub can be reached") from None
    return name, False


def load_model_config(name_or_path: str, *, local_files_only: bool = False):
    """A pretrained model's config alone (no weights): what `attention.choose_attention` reads."""
    return _transformers().AutoConfig.from_pretrained(name_or_path, local_files_only=local_files_only)


def load_pretrained(name_or_path: str, *, dtype: torch.dtype, attn_implementation: str,
                    local_files_only: bool = False):
    transformers = _transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype,
                                                              attn_implementation=attn_implementation,
                                                              local_files_only=local_files_only)
    return model, tokenizer


@dataclass
class PackedBatch:
    """S sequences (prompt + response) packed into one row of N tokens; with truncated sampling also each row's
    kept set (CSR over the N rows: empty at the rows that predict no response token) and, when the sequences were
    sampled at different temperatures, the temperature of each row."""

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N]
    targets: torch.Tensor  # [N]: next token at positions that predict a response token, else IGNORE_INDEX
    cu_seqlens: torch.Tensor  # [S+1] int32
    kept_ids: torch.Tensor | None = None  # [nnz] int32: the kept ids, row after row
    kept_offsets: torch.Tensor | None = None  # [N + 1]
    temperature: float | torch.Tensor | None = None  # the sequences' sampling temperature: a number, or [N] float32
    #                                                 when they differ; None: the run's --temperature

    @property
    def n_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device) -> "PackedBatch":
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t
        return PackedBatch(*(move(t) for t in (self.input_ids, self.position_ids, self.targets, self.cu_seqlens,
                                               self.kept_ids, self.kept_offsets, self.temperature)))

    def head_options(self, temperature: float) -> dict:
        """The keywords of pacs_kernels' log-prob ops for this batch: its per-row temperature (else `temperature`)
        and its kept sets."""
        return dict(temperature=temperature if self.temperature is None else self.temperature,
                    kept_ids=self.kept_ids, kept_offsets=self.kept_offsets)


def pack_sequences(prompts: list[list[int]], responses: list[list[int]], *, kept: list | None = None,
                   temperatures: list[float | None] | None = None) -> PackedBatch:
    """Pack (prompt, response) pairs; position t of a sequence predicts token t+1, counted when that is a response
    token. Every prompt needs at least one token.

    kept: each response's kept sets (`pacs_kernels.KeptSets` with one set per response token, from truncated
    sampling), or None for all: packed beside the tokens with `pacs_kernels.kept_concat`, empty sets at the rows
    that predict a prompt token or nothing. temperatures: each sequence's sampling temperature (None entries: not
    recorded): their value when they agree, a tensor [N] when they differ."""
    batch = _pack_tokens(prompts, responses)
    if kept is not None and any(k is not None for k in kept):
        if any(k is None for k in kept):
            raise ValueError("some responses have kept sets and others none: all were sampled with truncation or "
                             "none; pack them in separate batches")
        parts = []
        for prompt, response, sets in zip(prompts, responses, kept):
            if sets.offsets.numel() != len(response) + 1:
                raise ValueError(f"a response of {len(response)} tokens comes with {sets.offsets.numel() - 1} kept "
                                 "sets; there must be one per response token")
            parts += [pacs_kernels.kept_empty(len(prompt) - 1), sets, pacs_kernels.kept_empty(1)]
        batch.kept_ids, batch.kept_offsets = pacs_kernels.kept_concat(parts)
    known = [t for t in (temperatures or []) if t is not None]
    if known and len(known) != len(prompts):
        raise ValueError("some sequences have a sampling temperature and others none")
    if len(set(known)) == 1:
        batch.temperature = float(known[0])
    elif known:
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
        batch.temperature = torch.repeat_interleave(torch.tensor(known, dtype=torch.float32), lengths)
    return batch


def _pack_tokens(prompts: list[list[int]], responses: list[list[int]]) -> PackedBatch:
    ids, pos, tgt, cu = [], [], [], [0]
    for prompt, response in zip(prompts, responses):
        if not prompt:
            raise ValueError("every sequence needs a non-empty prompt (at least a BOS token)")
        seq = list(prompt) + list(response)
        ids.extend(seq)
        pos.extend(range(len(seq)))
        targets = [IGNORE_INDEX] * len(seq)
        for t in range(len(prompt) - 1, len(seq) - 1):
            targets[t] = seq[t + 1]
        tgt.extend(targets)
        cu.append(len(ids))
    return PackedBatch(torch.tensor([ids]), torch.tensor([pos]), torch.tensor(tgt), torch.tensor(cu, dtype=torch.int32))


def lm_head_params(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def packing_kwargs(model, batch: PackedBatch) -> dict:
    """The decoder forward's packing arguments: position_ids restarting per sequence, no mask, no cache, and with
    "varlen" attention the sequence boundaries for all layers at once (`attention.packed_attention_kwargs`)."""
    kwargs = dict(position_ids=batch.position_ids, attention_mask=None, use_cache=False)
    if getattr(decoder_of(model).config, "_attn_implementation", None) == VARLEN:
        kwargs.update(packed_attention_kwargs(batch.cu_seqlens))
    return kwargs


def packed_hidden_states(model, batch: PackedBatch) -> torch.Tensor:
    """Last hidden states [N, D] of the packed sequences, each attending only to itself. The decoder body
    (`lora.decoder_of`: looked through a PEFT model) runs without the lm_head."""
    packed_forward = getattr(model, "packed_forward", None)  # an FSDP-sharded model (pacs/distributed.py)
    if packed_forward is not None:
        return packed_forward(batch.input_ids, **packing_kwargs(model, batch))[0]
    out = decoder_of(model)(input_ids=batch.input_ids, **packing_kwargs(model, batch))
    return out.last_hidden_state[0]


def packed_logprobs(model, batch: PackedBatch, *, temperature: float, backend: str = "auto",
                    with_entropy: bool = False) -> pacs_kernels.LogprobOutput:
    """Per-token log-probs (and entropy) of the targets, fused: no logits; over each token's kept set and at its
    own temperature where the batch has them (`PackedBatch.head_options`)."""
    hidden = packed_hidden_states(model, batch)
    weight, bias = lm_head_params(model)
    return pacs_kernels.linear_logprob(hidden, weight, batch.targets, bias=bias, with_entropy=with_entropy,
                                       backend=backend, **batch.head_options(temperature))
