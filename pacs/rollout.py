"""Rollouts: G sampled answers per prompt behind a small interface, so a faster engine can replace HF generate.

A `Generator` takes prompt token ids and returns, for each prompt, `n` `Rollout`s in order (prompt 0's n answers,
then prompt 1's, ...): the response token ids up to and including the first EOS, and whether the answer was
truncated at `max_new_tokens` without an EOS.

Truncated sampling (top-k, top-p, min-p): the tokens are drawn from the softmax renormalized over each step's kept
set, so the trainer's log-probs must be renormalized over the same sets (pacs_kernels' `kept_ids`/`kept_offsets`,
docs/replay.md). `HFGenerator` then records each generated token's kept set while it samples: pacs's own
processors (temperature, top-k, top-p, min-p, in Hugging Face's order) followed by `KeptSetRecorder`, which stores
`isfinite(scores)` of each step as ids (4 bytes per kept id) and passes the scores on unchanged. Never
`output_scores=True`, which holds float32 [rows, V] per step (40 GB at 1024 steps x 64 rows x V = 151936).
The model's own generation_config is set aside for that call (a hub config's top_k, min_p, top_h, typical_p or
repetition penalty would otherwise act after the recorder, or change the scores it cannot replay): in
transformers 5.x a generate() argument left None is filled from it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch

from pacs_kernels.kept import KeptSets, offsets_from_sizes


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS unless truncated
    truncated: bool
    kept: KeptSets | None = None  # truncated sampling: response token j's kept set is kept.ids[off[j]:off[j+1]]
    temperature: float | None = None  # the temperature it was sampled at (None: the trainer's --temperature)


@dataclass
class SamplingParams:
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    record_kept: bool = True  # record each token's kept set when sampling truncates (evaluation needs none)

    @property
    def truncates(self) -> bool:
        """Whether a sampled token's distribution is renormalized over a kept set (top-k, top-p or min-p)."""
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0)


class KeptSetRecorder:
    """A Hugging Face logits processor, last in the chain: records `isfinite(scores)` of every generation step (the
    kept set of each row: the ids the sampler can draw) and returns the scores unchanged.

    Per step, the kept ids (int32, row after row) on the CPU and a count per row; `sets(lengths)` gives each row's
    CSR over its first `lengths[row]` steps. One device-to-host copy per step (generate synchronises per step
    anyway)."""

    def __init__(self):
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # (counts [rows] int64, ids [nnz] int32)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        keep = torch.isfinite(scores)
        self.steps.append((keep.sum(1).cpu(), keep.nonzero()[:, 1].to(torch.int32).cpu()))
        return scores

    def sets(self, lengths: list[int]) -> list[KeptSets]:
        """Each row's kept sets at steps 0 .. lengths[row] - 1 (its response tokens), ids increasing within a set:
        one gather over every step's ids (no loop over rows x steps)."""
        n_rows, n_steps = len(lengths), min(max(lengths, default=0), len(self.steps))
        if n_steps == 0:
            return [KeptSets(torch.zeros(0, dtype=torch.int32), torch.zeros(length + 1, dtype=torch.int32))
                    for length in lengths]
        counts = torch.stack([c for c, _ in self.steps[:n_steps]], 1)  # [rows, steps]
        flat = torch.cat([ids for _, ids in self.steps[:n_steps]])
        # where (row, step)'s ids start in `flat`: the step's base plus the rows before it in that step
        step_base = offsets_from_sizes(counts.sum(0))[:-1]
        starts = step_base.unsqueeze(0) + counts.cumsum(0) - counts
        used = torch.arange(n_steps).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
        sizes = torch.where(used, counts, 0).reshape(-1)  # (row, step) order
        total = int(sizes.sum())
        first = offsets_from_sizes(sizes)[:-1]
        gather = torch.repeat_interleave(starts.reshape(-1) - first, sizes, output_size=total) + torch.arange(total)
        ids = flat[gather]
        per_row = sizes.view(n_rows, n_steps)
        bounds = offsets_from_sizes(per_row.sum(1)).tolist()
        return [KeptSets(ids[bounds[r]:bounds[r + 1]].clone(),
                         offsets_from_sizes(per_row[r, :lengths[r]], torch.int32)) for r in range(n_rows)]


def sampling_processors(params: SamplingParams) -> list:
    """pacs's sampling chain in Hugging Face's order (temperature, top-k, top-p, min-p: what generate() appends for
    the same arguments), then a `KeptSetRecorder`."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    chain = [TemperatureLogitsWarper(params.temperature)] if params.temperature != 1.0 else []
    if params.top_k > 0:
        chain.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        chain.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0.0:
        chain.append(MinPLogitsWarper(params.min_p))
    return chain + [KeptSetRecorder()]


@contextlib.contextmanager
def plain_generation_config(model):
    """The model's generation_config replaced, for one generate() call, by a fresh one that keeps only its special
    token ids: every sampling option then comes from the call (transformers fills a None argument from the model's
    config, so None cannot switch off a hub config's min_p or top_h)."""
    from transformers import GenerationConfig

    original = model.generation_config
    plain = GenerationConfig(**{k: getattr(original, k, None) for k in ("bos_token_id", "eos_token_id",
                                                                          "pad_token_id", "decoder_start_token_id")})
    model.generation_config = plain
    try:
        yield plain
    finally:
        model.generation_config = original


class Generator(Protocol):
    """What the trainer and the evaluation sample with (`Session.generator`, `evaluate`): HFGenerator below, or
    any engine with this method."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        ...


class HFGenerator:
    """Batched sampling with Hugging Face `model.generate` (left padding, KV cache), in chunks of `batch_size`."""

    def __init__(self, model, *, pad_token_id: int, eos_token_id: int, batch_size: int = 64):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        out: list[Rollout] = []
        per_call = max(1, self.batch_size // max(params.n, 1))
        try:
            for start in range(0, len(prompts), per_call):
                chunk = prompts[start:start + per_call]
                out.extend(self._generate_chunk(chunk, params, device))
        finally:
            self.model.train(was_training)
        return out

    def _generate_chunk(self, prompts, params, device):
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention_mask[i, width - len(p):] = 1
        sample = params.temperature > 0
        kwargs = dict(do_sample=sample, max_new_tokens=params.max_new_tokens, num_return_sequences=params.n,
                      pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id)
        recorder, config = None, contextlib.nullcontext()
        if sample and params.truncates and params.record_kept:
            # pacs's chain + the recorder; generate's own warpers switched off, so none runs after the recorder
            processors = sampling_processors(params)
            recorder = processors[-1]
            kwargs.update(temperature=1.0, top_k=0, top_p=1.0, min_p=None, logits_processor=processors)
            config = plain_generation_config(self.model)
        elif sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
            if params.min_p > 0.0:
                kwargs["min_p"] = params.min_p
        with config:
            sequences = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                            **kwargs)
        new_tokens = sequences[:, width:].tolist()
        rollouts = []
        for row, tokens in enumerate(new_tokens):
            prompt = prompts[row // params.n]
            if self.eos_token_id in tokens:
                response = tokens[:tokens.index(self.eos_token_id) + 1]
                truncated = False
            else:
                response = tokens
                truncated = True
            rollouts.append(Rollout(list(prompt), response, truncated, None, params.temperature if sample else None))
        if recorder is not None:
            for rollout, kept in zip(rollouts, recorder.sets([len(r.response_ids) for r in rollouts])):
                rollout.kept = kept
        return rollouts
