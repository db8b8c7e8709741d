"""Training configuration: one dataclass whose fields are the command-line flags and the config-file keys.

Precedence: dataclass defaults < `--preset NAME` < `--config FILE` (YAML or TOML, keys = field names) < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


def opt(default, help: str, group: str, **extra):
    return field(default=default, metadata={"help": help, "group": group, **extra})


@dataclass
class TrainConfig:
    # model
    model: str = opt("tiny", "'tiny' (random-init Qwen2-shaped model from a config) or a local path / hub id",
                     "model")
    tiny_hidden: int = opt(128, "tiny model: hidden size", "model")
    tiny_layers: int = opt(4, "tiny model: layers", "model")
    tiny_heads: int = opt(4, "tiny model: attention heads", "model")
    tiny_intermediate: int = opt(512, "tiny model: MLP size", "model")
    dtype: str = opt("auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16", "model")
    attn: str = opt("auto", "attention: auto (flash_attention_2 if installed and CUDA, else sdpa) | sdpa | eager | "
                    "flash_attention_2", "model")
    init_checkpoint: str | None = opt(None, "start from the model weights of this checkpoint directory (e.g. a "
                                      "previous run's RUN/checkpoints/step_000100)", "model")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward", "model")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N", "model")
    # data
    data: str = opt("synthetic:arithmetic", "synthetic:arithmetic|linear|mixed, or a .jsonl/.parquet file", "data")
    test_data: str | None = opt(None, "held-out file (default: 10% of --data; synthetic tasks have their own split)",
                                "data")
    problem_key: str = opt("problem", "field holding the problem text in data files", "data")
    answer_key: str = opt("answer", "field holding the gold answer in data files", "data")
    level: int = opt(2, "synthetic difficulty level (1 = one-digit operands, 2 = two digits, ...)", "data")
    n_train: int = opt(10000, "synthetic: training problems", "data")
    n_test: int = opt(200, "synthetic: held-out problems", "data")
    split_seed: int = opt(1234, "synthetic: seed of the train/test split", "data")
    use_chat_template: bool = opt(True, "wrap real-model prompts in the tokenizer's chat template", "data")
    # rollouts
    prompts_per_step: int = opt(32, "prompts per rollout batch", "rollout")
    group_size: int = opt(8, "G: answers sampled per prompt", "rollout")
    temperature: float = opt(1.0, "rollout sampling temperature (also the log-prob temperature)", "rollout")
    top_p: float = opt(1.0, "rollout nucleus sampling", "rollout")
    max_new_tokens: int = opt(1024, "longest response", "rollout")
    generation_batch: int = opt(256, "sequences per generate() call", "rollout")
    # algorithm
    algo: str = opt("pacs", "pacs | grpo | rloo", "algorithm", choices=("pacs", "grpo", "rloo"))
    beta: float = opt(1.0, "PACS: score scale beta", "algorithm")
    score: str = opt("logratio_sum", "PACS: logratio_sum | logprob_mean", "algorithm")
    advantage: str = opt("rloo", "PACS: rloo | grpo | naive", "algorithm")
    class_balance: bool = opt(True, "PACS: class-balanced BCE weights", "algorithm")
    epsilon: float = opt(0.2, "GRPO/RLOO: clip range low", "algorithm")
    epsilon_high: float | None = opt(None, "GRPO/RLOO: clip range high (default: epsilon)", "algorithm")
    loss_type: str = opt("grpo", "GRPO/RLOO: grpo | bnpo | dr_grpo | dapo", "algorithm")
    scale_rewards: str = opt("group", "GRPO: group | batch | none", "algorithm")
    entropy_coef: float = opt(0.0, "entropy bonus coefficient", "algorithm")
    kernel_backend: str = opt("auto", "pacs_kernels backend: auto | triton | torch", "algorithm")
    loss_impl: str = opt("fused", "fused (pacs_kernels, no logits) | reference (materialized logits; for checks)",
                         "algorithm", choices=("fused", "reference"))
    # optimization
    steps: int = opt(100, "rollout batches (each gives minibatches_per_rollout optimizer steps)", "optim")
    minibatches_per_rollout: int = opt(4, "optimizer steps per rollout batch (mini-batches of whole groups)",
                                       "optim")
    lr: float = opt(1e-6, "AdamW learning rate", "optim")
    weight_decay: float = opt(0.01, "AdamW weight decay", "optim")
    adam_beta1: float = opt(0.9, "AdamW beta1", "optim")
    adam_beta2: float = opt(0.999, "AdamW beta2", "optim")
    warmup_steps: int = opt(0, "linear learning-rate warm-up (optimizer steps)", "optim")
    grad_clip: float = opt(0.0, "clip the gradient norm to this (0 = off)", "optim")
    # supervised warm-up (optional, before RL)
    sft_steps: int = opt(0, "supervised warm-up steps on (problem, gold answer) before RL (0 = none)", "warmup")
    sft_batch: int = opt(64, "supervised warm-up batch size", "warmup")
    sft_lr: float = opt(1e-3, "supervised warm-up learning rate", "warmup")
    sft_noise: float = opt(0.0, "fraction of warm-up answers replaced by a near miss (integer answers +-1 or +-2): "
                           "an imperfect demonstrator whose slips RL must then unlearn", "warmup")
    # evaluation
    eval_every: int = opt(0, "evaluate every E rollout steps (0 = only at start and end)", "eval")
    eval_n: int = opt(4, "samples per held-out problem", "eval")
    eval_temperature: float = opt(0.6, "evaluation temperature", "eval")
    eval_top_p: float = opt(0.95, "evaluation top_p", "eval")
    eval_problems: int = opt(0, "held-out problems to evaluate (0 = all)", "eval")
    # run
    out_dir: str = opt("runs/pacs", "run directory (logs, checkpoints, eval results, plots)", "run")
    seed: int = opt(0, "random seed", "run")
    save_every: int = opt(50, "checkpoint every K rollout steps (0 = only at the end)", "run")
    keep_checkpoints: int = opt(2, "checkpoints kept on disk", "run")
    resume: bool = opt(False, "continue from the latest checkpoint in out_dir", "run")
    tensorboard: bool = opt(False, "also log to TensorBoard (needs the tensorboard package)", "run")
    plot: bool = opt(True, "write PNG plots at the end", "run")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def synthetic(self) -> bool:
        return self.data.startswith("synthetic:")


PRESETS: dict[str, dict] = {
    # The out-of-the-box CPU job (about 5 minutes on 2 cores): a tiny random-init model, a short supervised warm-up
    # on the synthetic task that stops halfway through learning it (RL from random init is too sparse: no sampled
    # answer would ever be right), then 200 PACS steps with the verifier as the only signal.
    "demo": dict(
        model="tiny", data="synthetic:arithmetic", level=2, n_train=10000, n_test=200,
        tiny_hidden=128, tiny_layers=4, tiny_heads=4, tiny_intermediate=512, dtype="float32",
        sft_steps=1500, sft_batch=64, sft_lr=2e-3,
        steps=200, prompts_per_step=32, group_size=8, minibatches_per_rollout=2, max_new_tokens=6,
        temperature=1.0, lr=3e-4, warmup_steps=10, weight_decay=0.0, beta=1.0,
        eval_every=25, eval_n=8, eval_problems=200, save_every=50, out_dir="runs/demo",
    ),
}


def _load_file(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif p.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif p.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file must be .yaml, .yml, .toml or .json, got {p}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in {p}: {unknown}")
    return data


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--snake-case), grouped; defaults left as None so precedence can apply."""
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset (demo: CPU job)")
    parser.add_argument("--config", help="YAML/TOML/JSON file with TrainConfig keys")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        group = groups.setdefault(f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kind = type(default) if default is not None else (float if "float" in str(f.type) else str)
        kwargs = dict(default=None, help=f"{f.metadata['help']} (default: {default})", dest=f.name)
        if kind is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs.update(type=kind)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        group.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict = {}
    if getattr(args, "preset", None):
        values.update(PRESETS[args.preset])
    if getattr(args, "config", None):
        values.update(_load_file(args.config))
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return TrainConfig(**values)
