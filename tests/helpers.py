"""Shared test helpers: the test device, random kernel problems, packed PACS problems, error measures, and the
trainer's tiny model, random sequences, fixed rollouts and a few-second run config; multi-process runs on gloo
(`run_workers`, at the end).

The trainer's helpers import pacs (and so transformers) when called, so that kernel tests never load it."""

from __future__ import annotations

import datetime
import importlib.util
import os
import random
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Backends under test; the Triton one runs under TRITON_INTERPRET=1 on CPU (set in conftest.py).
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]
# The same, with the Triton case in the slow tier: for tests whose interpreted Triton cases take over a second each
# on 2 cores, so that the fast tier keeps their torch cases.
BACKENDS_SLOW_TRITON = ["torch", pytest.param("triton", marks=[pytest.mark.skipif(not HAS_TRITON,
                                                                                   reason="triton not installed"),
                                                                pytest.mark.slow])]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error of x against ref, relative to ref's largest magnitude."""
    scale = ref.abs().max().clamp_min(1e-30)
    return ((x.double() - ref.double()).abs().max() / scale).item()


def random_problem(n, d, v, dtype, *, bias=False, ignore_frac=0.0, lead=None, seed=0, logit_scale=4.0,
                   device=DEVICE):
    """hidden [*lead, d], weight [v, d], bias [v] | None, targets [*lead]; logits have std ~ logit_scale."""
    gen = torch.Generator().manual_seed(seed)
    lead = (n,) if lead is None else tuple(lead)
    hidden = torch.randn(*lead, d, generator=gen) * (logit_scale / d**0.5) ** 0.5
    weight = torch.randn(v, d, generator=gen) * (logit_scale / d**0.5) ** 0.5
    b = torch.randn(v, generator=gen) if bias else None
    targets = torch.randint(0, v, lead, generator=gen)
    if ignore_frac:
        targets[torch.rand(lead, generator=gen) < ignore_frac] = -100
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)
    return cast(hidden), cast(weight), cast(b), targets.to(device)


def packed_problem(n_groups=3, G=4, d=24, v=97, *, seed=0, dtype=torch.float32, bias=False, uniform_group=True,
                   old_noise=0.3):
    """S = n_groups * G packed sequences of random prompt/response lengths; one group with all-equal labels."""
    from pacs_kernels import linear_logprob

    gen = torch.Generator().manual_seed(seed)
    S = n_groups * G
    prompt = torch.randint(1, 6, (S,), generator=gen)
    response = torch.randint(1, 12, (S,), generator=gen)
    lengths = prompt + response
    cu = torch.zeros(S + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    N = int(cu[-1])
    targets = torch.randint(0, v, (N,), generator=gen)
    for i in range(S):
        targets[cu[i]: cu[i] + prompt[i]] = -100
    rewards = torch.randint(0, 2, (S,), generator=gen).float()
    rewards[:G] = torch.tensor([1.0, 0.0] * (G // 2) + [1.0] * (G % 2))  # a mixed group
    if uniform_group and n_groups > 1:
        rewards[G:2 * G] = 1.0  # a group whose labels are all equal
    hidden = torch.randn(N, d, generator=gen) * 0.7
    weight = torch.randn(v, d, generator=gen) * 0.7
    b = torch.randn(v, generator=gen) if bias else None
    with torch.no_grad():
        current = linear_logprob(hidden, weight, targets, bias=b, backend="reference").logprob
    old = current + old_noise * torch.randn(N, generator=gen)
    old[targets == -100] = float("nan")  # never read
    cast = lambda x: None if x is None else x.to(device=DEVICE, dtype=dtype)
    return dict(hidden=cast(hidden), weight=cast(weight), bias=cast(b), targets=targets.to(DEVICE),
                old_logprob=old.to(DEVICE), rewards=rewards.to(DEVICE), cu_seqlens=cu.to(DEVICE), group_size=G)


# --------------------------------------------------------------------------------------------------------------
# The trainer's tiny runs

TINY = dict(hidden=32, layers=2, heads=2, intermediate=64, max_positions=64)


def tiny_model(seed=0, attn="sdpa", **sizes):
    """A random-init tiny Qwen2 over the character tokenizer (TINY's sizes, any of them overridden by `sizes`)."""
    from pacs.modeling import build_tiny_model
    from pacs.tasks import CharTokenizer

    return build_tiny_model(CharTokenizer(), seed=seed, attn_implementation=attn, **{**TINY, **sizes})


def random_sequences(n, seed, vocab, max_prompt=6, max_response=9):
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, vocab) for _ in range(rng.randint(0, max_prompt))] for _ in range(n)]
    responses = [[rng.randrange(3, vocab) for _ in range(rng.randint(0, max_response))] for _ in range(n)]
    return prompts, responses


def small_run_config(out_dir, **overrides):
    """A few-second `train` run on the CPU (the runs compared bitwise need its deterministic kernels)."""
    from pacs.config import TrainConfig

    base = dict(model="tiny", tiny_hidden=32, tiny_layers=2, tiny_heads=2, tiny_intermediate=64, dtype="float32",
                data="synthetic:arithmetic", level=1, n_train=60, n_test=4, prompts_per_step=4, group_size=4,
                max_new_tokens=3, minibatches_per_rollout=2, lr=1e-2, eval_n=2, eval_problems=4, save_every=2,
                plot=False, out_dir=str(out_dir), kernel_backend="torch", device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def fixed_rollouts(n_steps: int, n_seqs: int, *, seed: int, reward_seed: int):
    """n_steps rollout batches of n_seqs random (prompt, response + EOS) sequences with random 0/1 rewards."""
    from pacs.rollout import Rollout
    from pacs.tasks import CharTokenizer

    gen = random.Random(reward_seed)
    vocab = CharTokenizer().vocab_size
    batches = []
    for step in range(n_steps):
        prompts, responses = random_sequences(n_seqs, seed=seed + step, vocab=vocab)
        rollouts = [Rollout(p, r + [2], False) for p, r in zip(prompts, responses)]
        batches.append((rollouts, [float(gen.random() < 0.5) for _ in rollouts]))
    return batches


# --------------------------------------------------------------------------------------------------------------
# Multi-process tests on the CPU: gloo process groups on 127.0.0.1, workers started with spawn.
#
# Worker functions must live at module level of an importable module (spawn pickles them by name). Every worker
# gets a 120 s collective timeout, and `run_workers` kills its own workers after `timeout` seconds, so a hang in a
# collective fails the test instead of blocking the suite.


COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, fn, world, port, args):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two workers on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_workers(fn, world: int, *args, timeout: float = 300.0) -> None:
    """Run fn(rank, world, *args) in `world` spawned processes of one gloo group; raise if any fails or hangs."""
    context = mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{world} workers of {fn.__name__} still running after {timeout:.0f} s")


def save_rank_results(results, out_dir, rank: int) -> None:
    """A worker's results, for `run_workers_for_results` to read back (one file per rank)."""
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def run_workers_for_results(fn, world: int, out_dir, *, timeout: float = 300.0) -> list:
    """run_workers(fn, world, out_dir), then the results each rank saved with `save_rank_results`, rank by rank."""
    run_workers(fn, world, str(out_dir), timeout=timeout)
    return [torch.load(f"{out_dir}/rank{r}.pt", weights_only=False) for r in range(world)]