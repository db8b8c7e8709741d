"""`pacs train` under torchrun: FSDP2 sharding, prompts split across ranks, loss scales, DCP checkpoints.

    torchrun --standalone --nproc-per-node 8 -m pacs train --model Qwen/Qwen2.5-7B --data train.jsonl ...

PyTorch's own engine, nothing home-made: `torchrun` starts one process per device and sets RANK / WORLD_SIZE /
LOCAL_RANK; `init_distributed` joins the process group (NCCL on CUDA, gloo on the CPU), `shard_model` applies
FSDP2 (`torch.distributed.fsdp.fully_shard`) to every decoder layer and to the model, and checkpoints go through
`torch.distributed.checkpoint` (DCP). A plain `pacs train` (no torchrun) never imports any of this.

The data flow of one rollout step at world size W:

- Every rank draws the same global batch of `prompts_per_step` prompts (`trainer.batch_indices` is seeded, not
  rank-dependent). The single-process trainer splits its groups into k mini-batches of whole groups; here each
  of those k mini-batches is split again into W contiguous parts, and rank r generates, verifies and trains on
  part r of every mini-batch (`rank_share`). Each part needs at least one group: prompts_per_step >= k * W.
- Sampling seeds differ per rank (seed + rank), so no two ranks draw the same answers for a prompt.
- Each mini-batch step: one all-reduce of [k, 2] counts (sequences and response tokens per mini-batch, for all k
  at once) gives the global mini-batch sizes. FSDP averages gradients over the ranks (reduce-scatter / W), so
  rank r's loss is scaled by W * f_r, f_r its share of the loss's normalizer (`loss_scales`): the average of the
  scaled losses is then the single-process loss on the whole mini-batch, and so are the gradients.
- Gradient clipping: `clip_grad_norm_` on FSDP2's DTensor parameters computes the global norm (a Replicate
  DTensor, the same on every rank), so every rank skips or takes a step alike.
- Logged statistics are all-reduced or gathered (`merge_stats`); rank 0 alone writes metrics.jsonl, config.json,
  eval results and plots.
- Generation runs with the parameters gathered once (`gathered_for_generation`): HF generate stops when all of a
  rank's answers have ended, i.e. after a different number of forward calls on each rank, so it must not issue
  per-forward collectives. Costs one unsharded copy of the weights during generation.

Checkpoints (`save_dcp_checkpoint`): every rank writes its shards of the model and AdamW states into
`RUN/checkpoints/.tmp_step_N/dcp/`; after a barrier rank 0 adds the trainer state, the scheduler, the
consolidated `model.pt` (so `pacs eval --run` and `--init-checkpoint` work unchanged), every rank its RNG state,
then rank 0 fsyncs, renames the directory into place and moves `latest`, as `pacs/checkpoint.py` does for one
process. Resume with the same world size is tested; DCP reshards the model and optimizer on load, so another
world size loads them too (each rank then reseeds its sampler: seed + rank + step): a 2-rank checkpoint loads
into one process without torchrun (tested; the single-process trainer's --resume uses `load_dcp_checkpoint` for
a checkpoint with dcp/) and into 1 torchrun rank (checked by hand); other combinations are untested.

Not supported at world size > 1 (refused by `config_problems`): `--reference snapshot:K` and GRPO's
`--scale-rewards batch` (a standard deviation over the whole mini-batch, which no rank holds).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from pacs_kernels.vocab_parallel import comm_device

logger = logging.getLogger("pacs")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank r of `world`; `enabled` under torchrun (also at world size 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks of a float64 CPU tensor (a copy; itself when not distributed)."""
        if not self.enabled:
            return values
        out = values.to(comm_device(), torch.float64, copy=True)
        torch.distributed.all_reduce(out)
        return out.cpu()

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable objects only)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


SINGLE = DistContext()


def launched() -> bool:
    """True when torchrun (or another launcher setting RANK and WORLD_SIZE) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_name: str = "auto") -> DistContext:
    """Join torchrun's process group (NCCL when this rank gets a CUDA device, else gloo); SINGLE without torchrun."""
    if not launched():
        return SINGLE
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistContext(rank, world, local_rank, True)


def device_for(ctx: DistContext, device_name: str) -> torch.device:
    """cuda:LOCAL_RANK for a CUDA run under torchrun, else the configured device."""
    from .modeling import pick_device

    device = pick_device(device_name)
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def config_problems(cfg, world: int) -> list[str]:
    """What a world size of `world` rules out, as `TrainConfig.validate` words its problems."""
    if world <= 1:
        return []
    out = []
    groups = cfg.prompts_per_step
    k = max(1, min(cfg.minibatches_per_rollout, groups))
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
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def _packed_forward(self, input_ids, position_ids):
    """modeling.packed_hidden_states's base-model forward, as a method FSDP treats as a forward (its root's
    parameters, the embedding / tied lm_head and the final norm, are gathered before it)."""
    out = self.base_model(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False)
    return out.last_hidden_state  # [1, N, D]; not a view, which would lose FSDP's pre-backward hook


def shard_model(model: torch.nn.Module, ctx: DistContext, device: torch.device, param_dtype: torch.dtype):
    """fully_shard each decoder layer, then the whole model (the root: embeddings, tied lm_head, final norm).

    On CUDA the sharded parameters stay float32 (master weights) and `MixedPrecisionPolicy` gathers them in
    `param_dtype` (bf16 by default) for compute, reducing gradients in float32. On the CPU everything is
    float32 (no policy). The root keeps its parameters gathered from its forward to its backward (FSDP2's root
    default), which is what lets the loss read `get_output_embeddings().weight` whole after `packed_forward`.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (ctx.world,))
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


# ------------------------------------------------------------------------------------------------------------
# Prompts across ranks, loss scales, statistics


def minibatch_bounds(n_groups: int, k: int) -> list[int]:
    """The single-process split of n_groups into k mini-batches of whole groups (trainer.update_on_rollouts)."""
    return [round(i * n_groups / k) for i in range(k + 1)]


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


def loss_scales(cfg, local: torch.Tensor, total: torch.Tensor, world: int) -> list[tuple[float, float]]:
    """(loss scale, entropy_coef factor) per mini-batch for this rank, from its counts `local` [k, 2] and the
    global `total` [k, 2] (columns: sequences, response tokens).

    FSDP averages the W ranks' gradients, so rank r's loss is multiplied by W * f_r, f_r = its share of the
    loss's normalizer: sequences for the per-sequence means (PACS, grpo, dr_grpo), response tokens for bnpo,
    1 for dapo (whose normalizer, the rollout's response tokens / k, is passed global, so the ranks' losses
    already add up). Then sum_r W f_r L_r / W = the single-process loss of the whole mini-batch. The entropy
    bonus is a mean over response tokens: its coefficient is multiplied by (T_r / T) / f_r so that it too comes
    out right.
    """
    out = []
    for (s_r, t_r), (s, t) in zip(local.tolist(), total.tolist()):
        token_share = t_r / max(t, 1.0)
        if cfg.algo != "pacs" and cfg.loss_type == "bnpo":
            share = token_share
        elif cfg.algo != "pacs" and cfg.loss_type == "dapo":
            share = 1.0  # the global normalizer already: the ranks' losses add up to the whole one
        else:
            share = s_r / s
        out.append((world * share, token_share / share))
    return out


def merge_stats(stats: dict, ctx: DistContext, weights: dict) -> dict:
    """One rank's update statistics -> the whole rollout's, on every rank.

    `weights`: per-mini-batch lists of this rank's response tokens ("tokens"), for the token-weighted means of
    entropy and clip fraction. loss and grad_norm are already global (the loss all-reduced by the caller).
    """
    lists = ("psi", "critic_prob", "critic_label", "critic_psi", "critic_ref_lp")
    gathered = ctx.gather({key: stats[key] for key in ("entropy", "clip_fraction", "train_tokens",
                                                       "critic_group_pairs", *lists)} | weights)
    merged = dict(stats)
    for key in lists:
        merged[key] = [x for part in gathered for x in part[key]]
    merged["critic_group_pairs"] = [sum(part["critic_group_pairs"][j] for part in gathered) for j in (0, 1)]
    merged["train_tokens"] = sum(part["train_tokens"] for part in gathered)
    for key in ("entropy", "clip_fraction"):
        per_batch = []
        for i in range(len(gathered[0]["tokens"])):
            rows = [(part[key][i], part["tokens"][i]) for part in gathered if len(part[key]) > i]
            total = sum(w for _, w in rows)
            if rows and total > 0:
                per_batch.append(sum(v * w for v, w in rows) / total)
        merged[key] = per_batch
    return merged


# ------------------------------------------------------------------------------------------------------------
# Checkpoints with torch.distributed.checkpoint


def save_dcp_checkpoint(run_dir, step: int, *, model, optimizer, scheduler, trainer_state: dict, config: dict,
                        keep: int, ctx: DistContext, prefix: str = "step") -> Path:
    """Write checkpoint `step` from every rank atomically (see the module docstring); returns its directory
    (PREFIX_STEP: step_ for RL checkpoints, warmup_ for the warm-up's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from .checkpoint import publish_checkpoint, rng_state

    root = Path(run_dir) / "checkpoints"
    final = root / f"{prefix}_{step:06d}"
    tmp = root / f".tmp_{prefix}_{step:06d}"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    ctx.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "dcp"))
    full = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))[0]
    torch.save(rng_state(), tmp / f"rng_rank{ctx.rank}.pt")
    if ctx.is_main:
        torch.save(full, tmp / "model.pt")
        torch.save({"scheduler": scheduler.state_dict() if scheduler else None, "world_size": ctx.world},
                   tmp / "training.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    ctx.barrier()  # every rank's files are complete
    if ctx.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        publish_checkpoint(tmp, final, keep)
    ctx.barrier()
    return final


def load_dcp_checkpoint(path: Path, *, model, optimizer, scheduler, ctx: DistContext) -> dict:
    """Restore the sharded model and AdamW states, the scheduler and this rank's RNG; returns the trainer state.
    Without a process group (ctx SINGLE, a plain model) DCP loads the whole tensors into this one process.

    A checkpoint written by one process (model.pt, no dcp/) loads too: the full weights into the shards, AdamW
    starting afresh (a warning says so)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    from .checkpoint import set_rng_state

    if (path / "dcp").is_dir():
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        full = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
        logger.warning("%s was written by one process: model weights loaded, AdamW state starts afresh", path)
    training = torch.load(path / "training.pt", map_location="cpu", weights_only=False)
    if scheduler is not None and training.get("scheduler") is not None:
        scheduler.load_state_dict(training["scheduler"])
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    rng = path / f"rng_rank{ctx.rank}.pt"
    if rng.exists() and training.get("world_size", ctx.world) == ctx.world:
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    else:
        from .trainer import seed_everything

        seed_everything(int(config_seed(path)) + ctx.rank + int(trainer_state.get("step", 0)))
    return trainer_state


def config_seed(path: Path) -> int:
    try:
        return int(json.loads((path / "config.json").read_text()).get("seed", 0))
    except (OSError, ValueError):
        return 0


def full_state_dict(model) -> dict:
    """The unsharded model state on every rank, on the CPU (a collective under FSDP; for tests and exports)."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu() for k, v in state.items()}
