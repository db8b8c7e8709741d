"""Distribution as an object: one process, or `pacs train` under torchrun with FSDP2, behind one interface.

    torchrun --standalone --nproc-per-node 8 -m pacs train --model Qwen/Qwen2.5-7B --data train.jsonl ...

The training loop, the warm-up and the update talk to a `Distribution` and never ask whether they run under
torchrun. `SingleProcess` is rank 0 of 1: its share of a rollout batch is all of it, gather gives [x], the all-reduce
gives x, the model stays as it is and checkpoints are torch.save files. `Torchrun` is rank r of W: the model is
FSDP2-sharded, rank r trains on part r of every mini-batch, and checkpoints go through torch.distributed.checkpoint
(DCP). `init_distribution(cfg)` returns the one this process runs as.

PyTorch's own engine, nothing home-made: `torchrun` starts one process per device and sets RANK / WORLD_SIZE /
LOCAL_RANK; `init_distribution` joins the process group (NCCL on CUDA, gloo on the CPU), `shard_model` applies
FSDP2 (`torch.distributed.fsdp.fully_shard`) to every decoder layer and to the model, and checkpoints go through
DCP (pacs/checkpoint.py). A plain `pacs train` (no torchrun) never imports any of this.

The data flow of one rollout step at world size W:

- Every rank draws the same global batch of `prompts_per_step` prompts (`data.batch_indices` is seeded, not
  rank-dependent). One process splits its groups into k mini-batches of whole groups; here each of those k
  mini-batches is split again into W contiguous parts, and rank r generates, verifies and trains on part r of
  every mini-batch (`Torchrun.share`, computed once per step). Each part needs at least one group:
  prompts_per_step >= k * W.
- Sampling seeds differ per rank (seed + rank), so no two ranks draw the same answers for a prompt.
- Each mini-batch step: one all-reduce of [k, 2] counts (sequences and response tokens per mini-batch, for all k
  at once) gives the global mini-batch sizes. FSDP averages gradients over the ranks (reduce-scatter / W), so
  rank r's loss is scaled by W * f_r, f_r its share of the loss's normalizer (`loss_scales`; 1 in one process):
  the average of the scaled losses is then the single-process loss on the whole mini-batch, and so are the
  gradients.
- Gradient clipping: `clip_grad_norm_` on FSDP2's DTensor parameters computes the global norm (a Replicate
  DTensor, the same on every rank), so every rank skips or takes a step alike.
- Logged statistics are all-reduced or gathered (`StepStats.merge`, pacs/metrics.py); rank 0 alone writes
  metrics.jsonl, config.json, eval results and plots (`RunLog`).
- Generation runs with the parameters gathered once (`gathered_for_generation`): HF generate stops when all of a
  rank's answers have ended, i.e. after a different number of forward calls on each rank, so it must not issue
  per-forward collectives. Costs one unsharded copy of the weights during generation.
- A signal reaches the ranks at different moments: every rank stops if any got one (`any`, one all-reduce).

Checkpoints (`checkpoint.save_dcp_checkpoint`): every rank writes its shards of the model and AdamW states into
`RUN/checkpoints/.tmp_step_N/dcp/`; after a barrier rank 0 adds the trainer state, the scheduler, the
consolidated `model.pt` (so `pacs eval --run` and `--init-checkpoint` work unchanged), every rank its RNG state,
then rank 0 fsyncs, renames the directory into place and moves `latest`, as one process does. Resume with the same
world size is tested; DCP reshards the model and optimizer on load, so another world size loads them too (each
rank then reseeds its sampler: seed + rank + step): a 2-rank checkpoint loads into one process without torchrun
(tested: `SingleProcess.load_checkpoint` reads a checkpoint with dcp/ through DCP) and into 1 torchrun rank
(checked by hand); other combinations are untested.

Not supported at world size > 1 (refused by `config_problems`): `--reference snapshot:K` and GRPO's
`--scale-rewards batch` (a standard deviation over the whole mini-batch, which no rank holds). LoRA (--lora-r) is
refused under torchrun at any world size (`TrainConfig.validate`): LoRA with FSDP2 is untested, and the snapshot
reference's adapter swap (`pacs.lora.AdapterSnapshot`) replaces tensors that FSDP2 shards.
"""

from __future__ import annotations

import contextlib
import os
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Protocol

import torch

from pacs_kernels.vocab_parallel import comm_device

from . import checkpoint
from .lora import decoder_of, is_peft_model
from .modeling import pick_device


class Distribution(Protocol):
    """Where this process stands among the training processes, and everything they do together."""

    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run's files and shows its progress."""

    def device(self, name: str) -> torch.device:
        """The device this process computes on, for --device NAME."""

    def master_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """The dtype the weights are kept in for compute in `dtype` (float32 master weights under FSDP on CUDA)."""

    def wrap(self, model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype) -> torch.nn.Module:
        """The model as this distribution trains it (FSDP2-sharded under torchrun, computing in compute_dtype)."""

    def gathered_for_generation(self, model: torch.nn.Module) -> ContextManager:
        """A context in which the model generates without collectives."""

    def share(self, n_groups: int, minibatches: int) -> list[list[int]]:
        """This rank's groups (indices into the rollout batch's n_groups) of each of its mini-batches of whole
        groups, `minibatches` of them (at most one per group)."""

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable objects)."""

    def concat(self, items: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank."""

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks of a CPU tensor, in float64."""

    def any(self, flag: bool) -> bool:
        """Whether any rank's flag is set."""

    def from_main(self, flag: bool) -> bool:
        """Rank 0's flag, on every rank."""

    def barrier(self) -> None:
        """Wait for every rank."""

    def save_checkpoint(self, run_dir: Path, step: int, *, prefix: str, model, optimizer, scheduler,
                        trainer_state: dict, config: dict, keep: int, extra_models: dict | None = None) -> Path:
        """Write checkpoint PREFIX_STEP of the run atomically, in this distribution's format; returns it."""

    def load_checkpoint(self, path: Path, *, model, optimizer, scheduler, extra_models: dict | None = None) -> dict:
        """Restore a checkpoint of either format into the model, optimizer, scheduler and RNG; its trainer state."""


def minibatch_bounds(n_groups: int, k: int) -> list[int]:
    """The split of n_groups into k mini-batches of whole groups: mini-batch i holds groups bounds[i]..bounds[i+1]."""
    return [round(i * n_groups / k) for i in range(k + 1)]


def minibatch_count(n_groups: int, requested: int) -> int:
    """--minibatches-per-rollout for a batch of n_groups: at least one mini-batch, at most one per group."""
    return max(1, min(requested, n_groups))


def rank_share(n_groups: int, k: int, world: int, rank: int) -> list[list[int]]:
    """Global group indices rank `rank` gets, per mini-batch: part `rank` of W contiguous parts of each of the
    k single-process mini-batches. Raises ValueError when a part would be empty."""
    bounds = minibatch_bounds(n_groups, k)
    share = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a < world:
            raise ValueError(f"a mini-batch of {b - a} group(s) cannot give each of {world} ranks one (groups "
                             f"{n_groups}, mini-batches {k})")
        cuts = [a + round(j * (b - a) / world) for j in range(world + 1)]
        share.append(list(range(cuts[rank], cuts[rank + 1])))
    return share


def loss_scales(settings, local: torch.Tensor, total: torch.Tensor, world: int) -> list[tuple[float, float]]:
    """(loss scale, entropy_coef factor) per mini-batch for this rank, from its counts `local` [k, 2] and the
    global `total` [k, 2] (columns: sequences, response tokens); `settings`: the loss's algo and loss_type.

    FSDP averages the W ranks' gradients, so rank r's loss is multiplied by W * f_r, f_r = its share of the
    loss's normalizer: sequences for the per-sequence means (PACS, grpo, dr_grpo), response tokens for bnpo,
    1 for dapo (whose normalizer, the rollout's response tokens / k, is passed global, so the ranks' losses
    already add up). Then sum_r W f_r L_r / W = the single-process loss of the whole mini-batch. The entropy
    bonus is a mean over response tokens: its coefficient is multiplied by (T_r / T) / f_r so that it too comes
    out right. In one process (local = total, W = 1) both are exactly 1.
    """
    out = []
    for (s_r, t_r), (s, t) in zip(local.tolist(), total.tolist()):
        token_share = t_r / max(t, 1.0)
        if settings.algo != "pacs" and settings.loss_type == "bnpo":
            share = token_share
        elif settings.algo != "pacs" and settings.loss_type == "dapo":
            share = 1.0  # the global normalizer already: the ranks' losses add up to the whole one
        else:
            share = s_r / s
        out.append((world * share, token_share / share))
    return out


# ------------------------------------------------------------------------------------------------------------
# One process


@dataclass(frozen=True)
class SingleProcess:
    """Rank 0 of 1: every collective is the identity, the model trains as it is, checkpoints are torch.save files."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return True

    def device(self, name: str) -> torch.device:
        return pick_device(name)

    def master_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        return dtype

    def wrap(self, model, device, compute_dtype):
        return model

    def gathered_for_generation(self, model) -> ContextManager:
        return contextlib.nullcontext()

    def share(self, n_groups: int, minibatches: int) -> list[list[int]]:
        bounds = minibatch_bounds(n_groups, minibatch_count(n_groups, minibatches))
        return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def gather(self, obj) -> list:
        return [obj]

    def concat(self, items: list) -> list:
        return list(items)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def any(self, flag: bool) -> bool:
        return flag

    def from_main(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        pass

    def save_checkpoint(self, run_dir, step, *, prefix, model, optimizer, scheduler, trainer_state, config, keep,
                        extra_models=None) -> Path:
        return checkpoint.save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                          trainer_state=trainer_state, config=config, keep=keep,
                                          extra_models=extra_models, prefix=prefix)

    def load_checkpoint(self, path, *, model, optimizer, scheduler, extra_models=None) -> dict:
        """torch.save files; a checkpoint written under torchrun (with dcp/) loads through DCP, which reshards it to
        this one process (unless extra models are asked for: no torchrun checkpoint has them, and
        `checkpoint.load_checkpoint` names the missing file)."""
        if (Path(path) / "dcp").is_dir() and is_peft_model(model):
            raise ValueError(f"checkpoint {path} was written under torchrun, without LoRA: continue it without "
                             "--lora-r, or start a LoRA run from its weights with --init-checkpoint")
        if (Path(path) / "dcp").is_dir() and extra_models is None:
            return checkpoint.load_dcp_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler,
                                                  dist=self)
        return checkpoint.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler,
                                          extra_models=extra_models)


SINGLE = SingleProcess()


# ------------------------------------------------------------------------------------------------------------
# torchrun


@dataclass(frozen=True)
class Torchrun:
    """Rank `rank` of `world` processes started by torchrun (also at world size 1), in a joined process group."""

    rank: int
    world: int
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """cuda:LOCAL_RANK for a CUDA run, else the configured device."""
        device = pick_device(name)
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    def master_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        # FSDP's MixedPrecisionPolicy gathers the float32 shards in the compute dtype (`shard_model`)
        return torch.float32 if device.type == "cuda" else dtype

    def wrap(self, model, device, compute_dtype):
        return shard_model(model, self, device, compute_dtype)

    def gathered_for_generation(self, model) -> ContextManager:
        return gathered_for_generation(model)

    def share(self, n_groups: int, minibatches: int) -> list[list[int]]:
        return rank_share(n_groups, minibatch_count(n_groups, minibatches), self.world, self.rank)

    def gather(self, obj) -> list:
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def concat(self, items: list) -> list:
        return [x for part in self.gather(items) for x in part]

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        out = values.to(comm_device(), torch.float64, copy=True)
        torch.distributed.all_reduce(out)
        return out.cpu()

    def any(self, flag: bool) -> bool:
        return bool(self.all_reduce_sum(torch.tensor([float(flag)]))[0] > 0)

    def from_main(self, flag: bool) -> bool:
        return self.any(self.is_main and flag)

    def barrier(self) -> None:
        torch.distributed.barrier()

    def save_checkpoint(self, run_dir, step, *, prefix, model, optimizer, scheduler, trainer_state, config, keep,
                        extra_models=None) -> Path:
        """DCP; extra models are not part of it (the snapshot reference is refused at world size > 1)."""
        return checkpoint.save_dcp_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                              trainer_state=trainer_state, config=config, keep=keep, dist=self,
                                              prefix=prefix)

    def load_checkpoint(self, path, *, model, optimizer, scheduler, extra_models=None) -> dict:
        return checkpoint.load_dcp_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, dist=self)


def launched() -> bool:
    """True when torchrun (or another launcher setting RANK and WORLD_SIZE) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distribution(cfg) -> Distribution:
    """SINGLE without torchrun; under torchrun, join its process group (NCCL when this rank gets a CUDA device,
    else gloo) and return this rank's Torchrun. ValueError for what the world size rules out (`config_problems`)."""
    if not launched():
        return SINGLE
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    problems = config_problems(cfg, world)
    if problems:
        raise ValueError("; ".join(problems))
    return Torchrun(rank, world, local_rank)


def config_problems(cfg, world: int) -> list[str]:
    """What a world size of `world` rules out, as `TrainConfig.validate` words its problems."""
    if world <= 1:
        return []
    out = []
    groups = cfg.prompts_per_step
    k = minibatch_count(groups, cfg.minibatches_per_rollout)
    if groups // k < world:
        out.append(f"--prompts-per-step {groups} with --minibatches-per-rollout {k} gives mini-batches of "
                   f"{groups // k} prompt(s); at world size {world} each rank needs one of every mini-batch: "
                   f"use --prompts-per-step >= {k * world}")
    if getattr(cfg, "reference", "old") != "old":
        out.append(f"--reference {cfg.reference} is not supported under torchrun yet (world size {world})")
    if cfg.algo == "grpo" and cfg.scale_rewards == "batch":
        out.append(f"--scale-rewards batch is not supported under torchrun (world size {world}): the standard "
                   "deviation over the whole mini-batch spans ranks; use group or none")
    return out


# ------------------------------------------------------------------------------------------------------------
# FSDP2


def _decoder_layers(model) -> list[torch.nn.Module]:
    layers = getattr(decoder_of(model), "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def _packed_forward(self, input_ids, **packing):
    """modeling.packed_hidden_states's decoder forward (`packing`: modeling.packing_kwargs), as a method FSDP
    treats as a forward (its root's parameters, the embedding / tied lm_head and the final norm, are gathered
    before it)."""
    out = decoder_of(self)(input_ids=input_ids, **packing)
    return out.last_hidden_state  # [1, N, D]; not a view, which would lose FSDP's pre-backward hook


def shard_model(model: torch.nn.Module, dist: Distribution, device: torch.device, param_dtype: torch.dtype):
    """fully_shard each decoder layer, then the whole model (the root: embeddings, tied lm_head, final norm).

    On CUDA the sharded parameters stay float32 (master weights) and `MixedPrecisionPolicy` gathers them in
    `param_dtype` (bf16 by default) for compute, reducing gradients in float32. On the CPU everything is
    float32 (no policy). The root keeps its parameters gathered from its forward to its backward (FSDP2's root
    default), which is what lets the loss read `get_output_embeddings().weight` whole after `packed_forward`.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.world,))
    kwargs = {"mesh": mesh}
    if device.type == "cuda" and param_dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in _decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    model.packed_forward = types.MethodType(_packed_forward, model)
    register_fsdp_forward_method(model, "packed_forward")
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def gathered_for_generation(model):
    """Gather every FSDP unit's parameters once and keep them through generation (no collectives inside HF
    generate, whose number of forward calls differs between ranks); reshard afterwards."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            if unit is not model:
                unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()


def full_state_dict(model) -> dict:
    """The unsharded model state on every rank, on the CPU (a collective under FSDP; for tests and exports)."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu() for k, v in state.items()}
