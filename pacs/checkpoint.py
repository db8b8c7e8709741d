"""Atomic checkpoints: a crash or a kill during a save leaves the last good checkpoint intact.

A checkpoint is a directory `RUN/checkpoints/step_000042/` holding the model and optimizer/scheduler state, the
RNG states (python, numpy, torch, cuda), the data position and the config. It is written into a temporary
sibling directory, fsync'ed, then renamed into place (rename is atomic within a file system); `RUN/checkpoints/
latest` names the newest complete one and is itself replaced atomically. Older checkpoints beyond `keep` are
deleted only after the new one is in place.

A signal during the supervised warm-up writes `RUN/checkpoints/warmup_000340/` the same way (the warm-up's model,
optimizer, RNG states and step); the first RL checkpoint (`step_000000`, written when the warm-up ends) replaces
the warm-up checkpoints.

Under LoRA (--lora-r) the weights are the adapters alone: `adapters.pt` and `lora.json` (rank, alpha, the adapted
layers and the base they adapt) in place of `model.pt`, the optimizer state is the adapters', and the snapshot
reference's `reference.pt` holds its adapters; the frozen base is rebuilt from the run's --model and
--init-checkpoint on resume. `--init-checkpoint` and `pacs eval --run` read either kind (`load_init_checkpoint`).

Two formats, one layout: one process writes torch.save files (`save_checkpoint`); under torchrun every rank writes
its shards through torch.distributed.checkpoint into `dcp/`, beside the consolidated `model.pt`
(`save_dcp_checkpoint`, see pacs/distributed.py). The trainer and the warm-up use `Checkpoints`, whose distribution
picks the format; a torchrun checkpoint loads into one process too.
"""
from __future__ import annotations

import json
import os
import random
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("pacs")

LATEST = "latest"
MODEL_FILE = "model.pt"  # the whole model's state_dict
ADAPTER_FILE = "adapters.pt"  # a LoRA run's weights: the adapters alone (pacs.lora.adapter_state_dict)
LORA_FILE = "lora.json"  # beside them: rank, alpha, dropout, the adapted layers and the base they adapt


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, *, model, optimizer, scheduler, trainer_state: dict,
                    config: dict, keep: int = 2, extra_models: dict | None = None, prefix: str = "step") -> Path:
    """Write checkpoint `step` atomically and point `latest` at it; returns its directory (PREFIX_STEP, e.g.
    step_000042; `prefix="warmup"` for the warm-up's).

    `extra_models` ({name: module}): further modules saved beside the model as NAME.pt (e.g. PACS's snapshot
    reference policy), inside the same atomic directory."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{prefix}_{step:06d}"
    tmp = root / f".tmp_{prefix}_{step:06d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model_state(model, tmp, config)
    for name, module in (extra_models or {}).items():
        torch.save(module.state_dict(), tmp / f"{name}.pt")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                "rng": rng_state()}, tmp / "training.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return publish_checkpoint(tmp, final, keep)


def publish_checkpoint(tmp: Path, final: Path, keep: int) -> Path:
    """Make the complete checkpoint directory `tmp` the checkpoint `final`: fsync every file below it, rename it
    into place, point `latest` at it, then delete the oldest of its kind (step_ or warmup_) beyond `keep` (0 keeps
    all), and with an RL checkpoint (step_) every warm-up checkpoint. Returns `final`."""
    root = final.parent
    for f in [p for p in tmp.rglob("*") if p.is_file()]:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    for d in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
        _fsync_dir(d)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST, final.name)
    kind = final.name.rsplit("_", 1)[0]
    doomed = sorted(p for p in root.glob(f"{kind}_*") if p.is_dir())[:-keep] if keep > 0 else []
    if kind == "step":  # the warm-up has ended: its checkpoints are superseded
        doomed += [p for p in root.glob("warmup_*") if p.is_dir()]
    for old in doomed:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None. Half-written `.tmp_*` directories are ignored."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if (candidate / "trainer_state.json").exists():
            return candidate
    complete = [p for kind in ("warmup", "step")
                for p in sorted(root.glob(f"{kind}_*")) if (p / "trainer_state.json").exists()]
    return complete[-1] if complete else None


def checkpoint_weights(path: str | Path) -> Path | None:
    """The weights of a checkpoint directory: its model.pt, or a LoRA run's adapters.pt; None if neither."""
    for name in (MODEL_FILE, ADAPTER_FILE):
        if (Path(path) / name).is_file():
            return Path(path) / name
    return None


def base_spec(config: dict) -> dict:
    """What builds the base model a LoRA run adapts (recorded in its checkpoints' lora.json): --model (a local
    directory as an absolute path), the tiny model's sizes, seed and vocabulary (its random initialization), and
    --init-checkpoint (an absolute path)."""
    init, model = config.get("init_checkpoint"), config["model"]
    local = model != "tiny" and Path(model).expanduser().is_dir()
    spec = {"model": str(Path(model).expanduser().resolve()) if local else model,
            "init_checkpoint": str(Path(init).resolve()) if init else None}
    if config["model"] == "tiny":
        spec["tiny"] = {k: config[k] for k in ("tiny_hidden", "tiny_layers", "tiny_heads", "tiny_intermediate",
                                               "seed")}
        spec["tiny"]["synthetic"] = str(config["data"]).startswith("synthetic:")
    return spec


def save_model_state(model, directory: Path, config: dict) -> None:
    """The model's weights into a checkpoint directory: model.pt; for a PeftModel its adapters (adapters.pt) and
    lora.json (`pacs.lora.lora_settings` and the base they adapt, `base_spec`), never the frozen base."""
    from .lora import adapter_state_dict, is_peft_model, lora_settings

    if not is_peft_model(model):
        torch.save(model.state_dict(), directory / MODEL_FILE)
        return
    torch.save(adapter_state_dict(model), directory / ADAPTER_FILE)
    meta = {**lora_settings(model), "base": base_spec(config)}
    (directory / LORA_FILE).write_text(json.dumps(meta, indent=2))


def load_model_state(model, path: Path) -> None:
    """A checkpoint's weights into the model of the run that wrote it: model.pt into a plain model, adapters.pt
    into a PeftModel's adapters (bit for bit). ValueError when the checkpoint is of the other kind."""
    from .lora import is_peft_model, load_adapter_state_dict

    lora = is_peft_model(model)
    weights = Path(path) / (ADAPTER_FILE if lora else MODEL_FILE)
    if not weights.is_file():
        raise ValueError(f"checkpoint {path} holds no {weights.name}: it was written " +
                         ("without LoRA: continue it without --lora-r, or start a LoRA run from its weights with "
                          "--init-checkpoint" if lora else "by a LoRA run (adapters.pt): continue it with the run's "
                          "--lora-r, --lora-alpha and --lora-targets"))
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if lora:
        load_adapter_state_dict(model, state)
    else:
        model.load_state_dict(state)


def load_init_checkpoint(model, checkpoint: Path, *, base: dict | None = None,
                         lora: dict | None = None) -> dict | None:
    """--init-checkpoint: the weights of a checkpoint directory into `model`, the plain base this run built.

    model.pt loads as it is. A LoRA run's checkpoint (adapters.pt, lora.json) gives its base with its adapters:
    its own --init-checkpoint is loaded first (recursively), then its adapters are returned when `lora` (this run's
    {"r", "alpha", "targets"}) equals theirs, for the caller to load into its fresh adapters, else merged into the
    weights (W += alpha / r B A; None returned). `base` (`base_spec` of this run) must build the checkpoint's base:
    adapters apply to their own base only. A missing file, weights of another shape or another base are a
    ValueError naming the checkpoint."""
    from .lora import merge_adapters

    checkpoint = Path(checkpoint)
    weights = checkpoint_weights(checkpoint)
    if weights is None:
        raise ValueError(f"--init-checkpoint: {checkpoint} holds neither {MODEL_FILE} nor {ADAPTER_FILE}")
    try:
        if weights.name == MODEL_FILE:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            return None
        meta = json.loads((checkpoint / LORA_FILE).read_text())
        if base is not None:
            mine = {k: base.get(k) for k in ("model", "tiny")}
            theirs = {k: meta["base"].get(k) for k in ("model", "tiny")}
            if mine != theirs:
                raise ValueError(f"--init-checkpoint {checkpoint} holds LoRA adapters of the base {theirs}; this run "
                                 f"builds {mine} (--model, and for the tiny model its --tiny-* sizes and --seed): "
                                 "adapters apply to their own base only")
        if meta["base"]["init_checkpoint"]:
            load_init_checkpoint(model, Path(meta["base"]["init_checkpoint"]), base=base)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if lora is not None and all(lora[k] == meta[k] for k in ("r", "alpha", "targets")):
            return state
        merge_adapters(model, state, r=meta["r"], alpha=meta["alpha"])
        return None
    except (RuntimeError, FileNotFoundError, KeyError) as err:
        first = " ".join(str(err).split())[:300]
        raise ValueError(f"--init-checkpoint {checkpoint}: its weights do not fit this model (another --model, "
                         f"tiny size or tokenizer?): {first}") from None


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's trainer state (step, data position, warm-up progress, ...) without loading any tensor."""
    return json.loads((Path(path) / "trainer_state.json").read_text())


def load_checkpoint(path: Path, *, model, optimizer, scheduler, extra_models: dict | None = None) -> dict:
    """Restore model, optimizer, scheduler and RNG states (and each of `extra_models` from NAME.pt, which must
    exist); returns the trainer state (step, data position, ...)."""
    load_model_state(model, path)
    for name, module in (extra_models or {}).items():
        if not (path / f"{name}.pt").exists():
            raise ValueError(f"checkpoint {path} has no {name}.pt: it was written by a run without it (resume "
                             "with the run's own settings)")
        module.load_state_dict(torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True))
    training = torch.load(path / "training.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(training["optimizer"])
    if scheduler is not None and training["scheduler"] is not None:
        scheduler.load_state_dict(training["scheduler"])
    set_rng_state(training["rng"])
    return json.loads((path / "trainer_state.json").read_text())


def resume_point(run_dir: str | Path, resume: bool) -> tuple[Path | None, bool]:
    """(the checkpoint --resume continues from, whether it is a warm-up checkpoint); (None, False) without --resume
    or without a checkpoint (a warning says so)."""
    if not resume:
        return None, False
    path = latest_checkpoint(run_dir)
    if path is None:
        logger.warning("--resume: no checkpoint in %s, starting from scratch", run_dir)
        return None, False
    return path, not read_trainer_state(path).get("sft_done", True)


# ------------------------------------------------------------------------------------------------------------
# torch.distributed.checkpoint (DCP): one shard per rank


def save_dcp_checkpoint(run_dir, step: int, *, model, optimizer, scheduler, trainer_state: dict, config: dict,
                        keep: int, dist, prefix: str = "step") -> Path:
    """Write checkpoint `step` from every rank of `dist` atomically (see pacs/distributed.py); returns its
    directory (PREFIX_STEP: step_ for RL checkpoints, warmup_ for the warm-up's)."""
    import torch.distributed.checkpoint as dcp  # only under torchrun: a plain run never imports torch.distributed
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    root = Path(run_dir) / "checkpoints"
    final = root / f"{prefix}_{step:06d}"
    tmp = root / f".tmp_{prefix}_{step:06d}"
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "dcp"))
    full = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))[0]
    torch.save(rng_state(), tmp / f"rng_rank{dist.rank}.pt")
    if dist.is_main:
        torch.save(full, tmp / "model.pt")
        torch.save({"scheduler": scheduler.state_dict() if scheduler else None, "world_size": dist.world},
                   tmp / "training.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    dist.barrier()  # every rank's files are complete
    if dist.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        publish_checkpoint(tmp, final, keep)
    dist.barrier()
    return final


def load_dcp_checkpoint(path: Path, *, model, optimizer, scheduler, dist) -> dict:
    """Restore the sharded model and AdamW states, the scheduler and this rank's RNG; returns the trainer state.
    Without a process group (one process, a plain model) DCP loads the whole tensors into this one process.

    A checkpoint written by one process (model.pt, no dcp/) loads too: the full weights into the shards, AdamW
    starting afresh (a warning says so)."""
    import torch.distributed.checkpoint as dcp  # see save_dcp_checkpoint
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    path = Path(path)
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
    rng = path / f"rng_rank{dist.rank}.pt"
    if rng.exists() and training.get("world_size", dist.world) == dist.world:
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    else:
        seed_everything(_config_seed(path) + dist.rank + int(trainer_state.get("step", 0)))
    return trainer_state


def _config_seed(path: Path) -> int:
    try:
        return int(json.loads((path / "config.json").read_text()).get("seed", 0))
    except (OSError, ValueError):
        return 0


# ------------------------------------------------------------------------------------------------------------
# The interface the trainer and the warm-up use


class Checkpoints:
    """The checkpoints of one phase of a run: RUN/checkpoints/PREFIX_STEP (step_ for RL, warmup_ for the warm-up)
    holding `model`, `optimizer`, `scheduler` (if any), `extra_models` beside the model (e.g. the snapshot
    reference), the RNG states, the trainer state and `config`. The distribution picks the format
    (`Distribution.save_checkpoint` / `load_checkpoint`): torch.save files in one process, DCP under torchrun.
    `saved_step`: the step of the last checkpoint saved or loaded here (None before any)."""

    def __init__(self, run_dir: Path, dist, model, optimizer, scheduler=None, *, config: dict, keep: int,
                 prefix: str = "step", extra_models: dict | None = None):
        self.run_dir, self.dist, self.model = Path(run_dir), dist, model
        self.optimizer, self.scheduler, self.extra_models = optimizer, scheduler, extra_models
        self.config, self.keep, self.prefix = config, keep, prefix
        self.saved_step: int | None = None

    def save(self, step: int, trainer_state: dict) -> Path:
        """Checkpoint PREFIX_STEP with `trainer_state` (beside its step) in trainer_state.json."""
        path = self.dist.save_checkpoint(self.run_dir, step, prefix=self.prefix, model=self.model,
                                         optimizer=self.optimizer, scheduler=self.scheduler,
                                         trainer_state=trainer_state, config=self.config, keep=self.keep,
                                         extra_models=self.extra_models)
        self.saved_step = step
        return path

    def load(self, path: Path) -> dict:
        """Restore checkpoint `path` (either format); its trainer state, step included."""
        state = self.dist.load_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                          scheduler=self.scheduler, extra_models=self.extra_models)
        self.saved_step = state["step"]
        return state
