"""The set-up of a run: threads, seeds, data, model, tokenizer and generator, in the `Session` that the training
loop, the warm-up and the evaluation share. The model as the run starts it (`build_policy`): the tiny or a
pretrained model with --attn resolved, --init-checkpoint's weights (a full or a LoRA checkpoint), gradient
checkpointing, and with --lora-r PEFT adapters on the decoder's linear layers (only they train)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .attention import choose_attention
from .checkpoint import Checkpoints, base_spec, load_init_checkpoint, seed_everything
from .config import TrainConfig
from .data import format_prompt, load_data
from .distributed import SINGLE, Distribution
from .lora import adapted_layers, apply_lora, load_adapter_state_dict, lora_targets, trainable_parameters
from .modeling import build_tiny_model, load_model_config, load_pretrained, model_source, pick_dtype
from .rollout import Generator, HFGenerator, Rollout, SamplingParams
from .runinfo import environment_info
from .tasks import tiny_tokenizer
from .threads import apply_threads

logger = logging.getLogger("pacs")


@dataclass
class Session:
    """A run's configuration, model, tokenizer, data (problems and their prompt token ids), generator, run directory,
    environment record (config.json's `info`) and distribution."""

    cfg: TrainConfig
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    train: list
    test: list
    train_prompts: list[list[int]]
    test_prompts: list[list[int]]
    generator: Generator  # HFGenerator here; any engine with its `generate` fits
    run_dir: Path
    info: dict = field(default_factory=dict)
    dist: Distribution = SINGLE

    def sample(self, idx: list[int], sampling: SamplingParams) -> list[Rollout]:
        """`sampling.n` answers to each of the training problems `idx`, in order (under torchrun with the FSDP
        parameters gathered)."""
        with self.dist.gathered_for_generation(self.model):
            return self.generator.generate([self.train_prompts[i] for i in idx], sampling)

    def texts(self, rollouts: list[Rollout]) -> list[str]:
        """The answers' text, special tokens dropped."""
        return [self.tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]

    def answers(self, idx: list[int], n: int) -> list[str]:
        """The gold answer of each of the training problems `idx`, n times each (one per sampled answer)."""
        return [self.train[i].answer for i in idx for _ in range(n)]

    def checkpoints(self, optimizer, scheduler=None, *, prefix: str = "step",
                    extra_models: dict | None = None) -> Checkpoints:
        """The run's checkpoints of the model with this optimizer (and scheduler, extra models): step_ for RL,
        warmup_ for the warm-up."""
        return Checkpoints(self.run_dir, self.dist, self.model, optimizer, scheduler, config=self.cfg.to_dict(),
                           keep=self.cfg.keep_checkpoints, prefix=prefix, extra_models=extra_models)


def setup(cfg: TrainConfig, dist: Distribution = SINGLE) -> Session:
    """Threads, data, model, tokenizer and generator, as `dist` runs them: under torchrun the model is
    FSDP2-sharded (on CUDA float32 master weights computed in --dtype) and rank r seeds with seed + r.
    Every data row is checked, and a hub model's source decided, before the model is built."""
    cfg.validate()
    threads, why = apply_threads(cfg.threads)
    logger.info("torch threads: %d (%s)", threads, why)
    seed_everything(cfg.seed + dist.rank)
    device = dist.device(cfg.device)
    compute_dtype = pick_dtype(cfg.dtype, device)
    dtype = dist.master_dtype(compute_dtype, device)
    train, test = load_data(cfg)
    if cfg.eval_problems:
        test = test[:cfg.eval_problems]
    model, tokenizer, attn = build_policy(cfg, device, dtype, compute_dtype)
    model.to(device)
    model.config.use_cache = False  # packed training passes must not build a cache (see modeling.py)
    n_trainable, n_params = trainable_parameters(model)
    model = dist.wrap(model, device, compute_dtype)
    plain = cfg.synthetic or cfg.model == "tiny"  # the tiny model's prompt is the problem text alone (pacs/data.py)
    encode = lambda p: format_prompt(tokenizer, p, synthetic=plain, use_chat_template=cfg.use_chat_template)
    generator = HFGenerator(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            batch_size=cfg.generation_batch)
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"device": str(device), "dtype": str(compute_dtype).replace("torch.", ""), "attention": attn,
            "parameters": n_params, "trainable_parameters": n_trainable, "train_problems": len(train),
            "test_problems": len(test), **environment_info(device), "world_size": dist.world}
    info["hardware"]["torch_threads_reason"] = why
    what = f"LoRA r={cfg.lora_r} adapters on {len(adapted_layers(model))} linear layers" if cfg.lora_r else \
        "full fine-tuning"
    logger.info("model %s: %s parameters, %s trainable (%.2f%%: %s), %s, %s, attention=%s", cfg.model,
                _count(n_params), _count(n_trainable), 100 * n_trainable / max(n_params, 1), what, device,
                info["dtype"], attn)
    return Session(cfg, model, tokenizer, device, train, test, [encode(p) for p in train],
                   [encode(p) for p in test], generator, run_dir, info, dist)


def _count(n: int) -> str:
    """A parameter count for the log: 31.2K, 1.54M, 7.62B."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def build_policy(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, compute_dtype: torch.dtype):
    """The model as the run starts it, on the CPU, its tokenizer and its attention implementation: the tiny model
    or a pretrained one (in `dtype`, with --attn resolved by `attention.choose_attention` from its config and
    `compute_dtype` on `device`), --init-checkpoint's weights, gradient checkpointing, then with --lora-r the PEFT
    adapters (a LoRA checkpoint's own adapters when its settings match, `checkpoint.load_init_checkpoint`)."""
    if cfg.model == "tiny":
        attn = choose_attention(cfg.attn, device, compute_dtype)
        tokenizer = tiny_tokenizer(cfg.synthetic)
        model = build_tiny_model(tokenizer, hidden=cfg.tiny_hidden, layers=cfg.tiny_layers, heads=cfg.tiny_heads,
                                 intermediate=cfg.tiny_intermediate, max_positions=256, seed=cfg.seed,
                                 attn_implementation=attn).to(dtype)
    else:
        source, local_only = model_source(cfg.model)
        attn = choose_attention(cfg.attn, device, compute_dtype,
                                load_model_config(source, local_files_only=local_only))
        model, tokenizer = load_pretrained(source, dtype=dtype, attn_implementation=attn, local_files_only=local_only)
    wanted = None
    if cfg.lora_r:
        alpha = float(cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_r)
        wanted = {"r": cfg.lora_r, "alpha": alpha, "targets": sorted(lora_targets(model, cfg.lora_targets))}
    adapters = None
    if cfg.init_checkpoint:
        adapters = load_init_checkpoint(model, Path(cfg.init_checkpoint), base=base_spec(cfg.to_dict()),
                                        lora=wanted)
    if cfg.gradient_checkpointing:  # non-reentrant under LoRA: frozen embeddings give the layers inputs without grad
        kwargs = {"use_reentrant": False} if wanted else None
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if wanted is not None:
        model = apply_lora(model, r=wanted["r"], alpha=wanted["alpha"], dropout=cfg.lora_dropout,
                           targets=wanted["targets"])
        if adapters is not None:
            load_adapter_state_dict(model, adapters)
    return model, tokenizer, attn
