"""Atomic checkpoints: a crash or a kill during a save leaves the last good checkpoint intact.

A checkpoint is a directory `RUN/checkpoints/step_000042/` holding the model and optimizer/scheduler state, the
RNG states (python, numpy, torch, cuda), the data position and the config. It is written into a temporary
sibling directory, fsync'ed, then renamed into place (rename is atomic within a file system); `RUN/checkpoints/
latest` names the newest complete one and is itself replaced atomically. Older checkpoints beyond `keep` are
deleted only after the new one is in place.

A signal during the supervised warm-up writes `RUN/checkpoints/warmup_000340/` the same way (the warm-up's model,
optimizer, RNG states and step); the first RL checkpoint (`step_000000`, written when the warm-up ends) replaces
the warm-up checkpoints.

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
    torch.save(model.state_dict(), tmp / "model.pt")
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


def load_init_checkpoint(model, checkpoint: Path) -> None:
    """--init-checkpoint: the model weights of a checkpoint directory; a missing file or weights of another
    shape are a ValueError naming the checkpoint."""
    path = Path(checkpoint) / "model.pt"
    if not path.exists():
        raise ValueError(f"--init-checkpoint: {path} does not exist")
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except RuntimeError as err:
        first = " ".join(str(err).split())[:300]
        raise ValueError(f"--init-checkpoint {checkpoint}: its weights do not fit this model (another --model, "
                         f"tiny size or tokenizer?): {first}") from None


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's trainer state (step, data position, warm-up progress, ...) without loading any tensor."""
    return json.loads((Path(path) / "trainer_state.json").read_text())


def load_checkpoint(path: Path, *, model, optimizer, scheduler, extra_models: dict | None = None) -> dict:
    """Restore model, optimizer, scheduler and RNG states (and each of `extra_models` from NAME.pt, which must
    exist); returns the trainer state (step, data position, ...)."""
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
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
