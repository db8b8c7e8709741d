"""Rollouts: G sampled answers per prompt behind a small interface, so a faster engine can replace HF generate.

A `Generator` takes prompt token ids and returns, for each prompt, `n` `Rollout`s in order (prompt 0's n answers,
then prompt 1's, ...): the response token ids up to and including the first EOS, and whether the answer was
truncated at `max_new_tokens` without an EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS unless truncated
    truncated: bool


@dataclass
class SamplingParams:
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024


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
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
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
            rollouts.append(Rollout(list(prompt), response, truncated))
        return rollouts
