"""Training configuration: one dataclass whose fields are the command-line flags and the config-file keys.

Precedence: dataclass defaults < `--preset NAME` < `--config FILE` (YAML, TOML or JSON, keys = field names) <
flags; pacs/options.py reads the flags and the files. `TrainConfig.validate()` checks every option's range and the
combinations the losses reject, before any work (the CLI and `pacs.trainer.train` call it): a bad configuration
raises one ValueError naming every problem.
`{algo}` in `out_dir` becomes the algorithm, so runs of different algorithms get different default directories.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from dataclasses import InitVar, dataclass, field
from pathlib import Path


def opt(default, help: str, group: str, *, eval: bool = False, **extra):
    """A TrainConfig field: its flag's help and group; `eval`: `pacs eval` takes it too."""
    return field(default=default, metadata={"help": help, "group": group, "eval": eval, **extra})


@dataclass
class TrainConfig:
    # model
    model: str = opt("tiny", "'tiny' (random-init Qwen2-shaped model from a config, character tokenizer), a local "
                     "model directory (/abs, ./rel, ~/...) or a hub id (org/name)", "model", eval=True)
    tiny_hidden: int = opt(128, "tiny model: hidden size", "model", eval=True)
    tiny_layers: int = opt(4, "tiny model: layers", "model", eval=True)
    tiny_heads: int = opt(4, "tiny model: attention heads", "model", eval=True)
    tiny_intermediate: int = opt(512, "tiny model: MLP size", "model", eval=True)
    dtype: str = opt("auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16", "model",
                     choices=("auto", "float32", "bfloat16", "float16"), eval=True)
    attn: str = opt("auto", "attention: auto (on CUDA: flash_attention_2 if installed, else varlen where torch's "
                    "varlen kernel serves the GPU and dtype (sm_80+, bf16/fp16), else sdpa; sdpa on the CPU) | "
                    "varlen (packed sequences without an N x N mask: torch's or flash-attn's varlen kernel on CUDA, "
                    "a per-sequence path elsewhere, whose memory grows with the longest sequence) | sdpa | eager | "
                    "flash_attention_2", "model", choices=("auto", "varlen", "sdpa", "eager", "flash_attention_2"),
                    eval=True)
    init_checkpoint: str | None = opt(None, "start from the model weights of this checkpoint directory (e.g. a "
                                      "previous run's RUN/checkpoints/step_000100); a LoRA run's checkpoint gives "
                                      "its base with its adapters (kept as adapters when this run's --lora-r, "
                                      "--lora-alpha and --lora-targets match, merged into the weights otherwise)",
                                      "model", eval=True)
    gradient_checkpointing: bool = opt(False, "recompute activations in backward", "model")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N", "model", eval=True)
    # LoRA (pacs/lora.py)
    lora_r: int = opt(0, "LoRA rank: train low-rank adapters on the decoder's linear layers instead of the whole "
                      "model (0 = full fine-tuning). Needs PEFT (pip install -e \".[lora]\"). The lm_head and the "
                      "embeddings stay frozen (the fused head then skips its weight gradient), only the adapters "
                      "reach AdamW, rollouts use the adapted model, checkpoints hold the adapters", "lora")
    lora_alpha: float | None = opt(None, "LoRA: the adapters' update is scaled by alpha / r (default: 2 r)", "lora")
    lora_dropout: float = opt(0.0, "LoRA: dropout on the adapters' input in the gradient passes; the rollout, "
                              "old-policy and reference passes run without it (the policy itself), and the first "
                              "mini-batch's one pass keeps theta = theta_old by definition", "lora")
    lora_targets: str | None = opt(None, "LoRA: comma-separated names of the decoder's linear layers to adapt, or "
                                   "all-linear (default: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj, "
                                   "those the model has: every linear layer of a Llama/Qwen/Gemma/Mistral "
                                   "decoder); never the lm_head or the embeddings", "lora")
    # data
    data: str = opt("synthetic:arithmetic", "synthetic:arithmetic|linear|mixed, or a .jsonl (one JSON object per "
                    "line), .json (an array of objects) or .parquet file of problems", "data", eval=True)
    test_data: str | None = opt(None, "held-out data file for a file --data (unset: the first 10% of --data is "
                                "held out; synthetic tasks have their own split)", "data", eval=True)
    problem_key: str = opt("problem", "field holding the problem text in data files", "data", eval=True)
    answer_key: str = opt("answer", "field holding the gold answer in data files (a string or a number)", "data",
                          eval=True)
    level: int = opt(2, "synthetic difficulty level (1 = one-digit operands, 2 = two digits, ...)", "data", eval=True)
    n_train: int = opt(10000, "synthetic: training problems", "data", eval=True)
    n_test: int = opt(200, "synthetic: held-out problems", "data", eval=True)
    split_seed: int = opt(1234, "synthetic: seed of the train/test split", "data", eval=True)
    use_chat_template: bool = opt(True, "wrap real-model prompts (the problem, then the PACS authors' \"Please "
                                  "reason step by step, ... \\boxed{}.\") in the tokenizer's chat template when it "
                                  "has one; --model tiny's prompt is the problem text alone", "data", eval=True)
    # rollouts
    prompts_per_step: int = opt(32, "prompts per rollout batch", "rollout")
    group_size: int = opt(8, "G: answers sampled per prompt", "rollout")
    temperature: float = opt(1.0, "rollout sampling temperature (also the log-prob temperature)", "rollout")
    top_p: float = opt(1.0, "rollout nucleus sampling; with --top-p, --top-k or --min-p every log-prob of the update "
                       "is renormalized over each token's kept set, recorded while sampling", "rollout")
    top_k: int = opt(0, "rollout top-k sampling (0 = off)", "rollout")
    min_p: float = opt(0.0, "rollout min-p sampling: keep tokens with p >= min_p * p_max (0 = off)", "rollout")
    max_new_tokens: int = opt(1024, "longest response", "rollout", eval=True)
    generation_batch: int = opt(256, "sequences per generate() call", "rollout", eval=True)
    # algorithm
    algo: str = opt("pacs", "pacs | grpo | rloo", "algorithm", choices=("pacs", "grpo", "rloo"))
    beta: float = opt(1.0, "PACS: score scale beta", "algorithm")
    score: str = opt("logratio_sum", "PACS: logratio_sum | logprob_mean", "algorithm",
                     choices=("logratio_sum", "logprob_mean"))
    advantage: str = opt("rloo", "PACS: rloo | grpo | naive (rloo and grpo need --group-size >= 2)", "algorithm",
                         choices=("rloo", "grpo", "naive"))
    class_balance: bool = opt(True, "PACS: class-balanced BCE weights", "algorithm")
    reference: str = opt("old", "PACS: the policy psi is scored against. old: the rollout policy (psi = beta * sum "
                         "(log pi - log pi_old)); snapshot:K: a frozen copy of the policy, replaced by the current "
                         "policy every K rollout steps (PACS v2). snapshot:K keeps one more copy of the weights in "
                         "the model's dtype (bf16 on GPU by default; under LoRA a copy of the adapters only) and "
                         "scores every mini-batch against it",
                         "algorithm")
    reset_optimizer: bool = opt(False, "PACS with --reference snapshot:K: clear AdamW's moments at every "
                                "snapshot refresh (the learning-rate schedule continues)", "algorithm")
    epsilon: float = opt(0.2, "GRPO/RLOO: clip range low", "algorithm")
    epsilon_high: float | None = opt(None, "GRPO/RLOO: clip range high (default: epsilon)", "algorithm")
    loss_type: str = opt("grpo", "GRPO/RLOO: grpo (per-sequence token mean) | bnpo | dr_grpo (divides by "
                         "--max-new-tokens) | dapo (token mean over the rollout batch); TRL's GRPOTrainer defaults "
                         "to dapo", "algorithm", choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    scale_rewards: str = opt("group", "GRPO: group | batch | none", "algorithm", choices=("group", "batch", "none"))
    entropy_coef: float = opt(0.0, "entropy bonus coefficient", "algorithm")
    kernel_backend: str = opt("auto", "pacs_kernels backend: auto | triton | torch", "algorithm",
                              choices=("auto", "triton", "torch"))
    loss_impl: str = opt("fused", "fused (pacs_kernels, no logits) | reference (materialized logits; for checks)",
                         "algorithm", choices=("fused", "reference"))
    one_pass: bool = opt(True, "the first mini-batch of each rollout (theta = theta_old) takes the one pass: the "
                         "loss's old_logprob=None path, log-probs and gradients in one vocabulary pass, no "
                         "old-log-prob forward; --no-one-pass: old log-probs for every mini-batch and the two-pass "
                         "loss (--on-policy-shortcut is its former name)", "algorithm")
    # optimization
    steps: int = opt(100, "rollout batches (each gives minibatches_per_rollout optimizer steps)", "optim")
    minibatches_per_rollout: int = opt(4, "optimizer steps per rollout batch (mini-batches of whole groups; at "
                                       "most one per prompt)", "optim")
    lr: float = opt(1e-6, "AdamW learning rate", "optim")
    weight_decay: float = opt(0.01, "AdamW weight decay", "optim")
    adam_beta1: float = opt(0.9, "AdamW beta1", "optim")
    adam_beta2: float = opt(0.999, "AdamW beta2", "optim")
    warmup_steps: int = opt(0, "linear learning-rate warm-up (optimizer steps)", "optim")
    grad_clip: float = opt(0.0, "clip the gradient norm to this (0 = off)", "optim")
    # supervised warm-up (optional, before RL)
    sft_steps: int = opt(0, "supervised warm-up steps on (problem, gold answer) before RL (0 = none; the cap with "
                         "--sft-target-pass1)", "warmup")
    sft_batch: int = opt(64, "supervised warm-up batch size", "warmup")
    sft_lr: float = opt(1e-3, "supervised warm-up learning rate", "warmup")
    sft_one_pass: bool = opt(False, "warm-up NLL in one vocabulary pass (its gradient is known in advance); off by "
                             "default: equal to the two-pass NLL within float rounding, which 1,500 warm-up "
                             "steps of the demo amplified into a different warm-up outcome", "warmup")
    sft_target_pass1: float = opt(0.0, "stop the warm-up as soon as the probe's pass@1 reaches this (in (0, 1]; 0 = "
                                  "off: run all --sft-steps, which are then the cap; --sft-steps 0 skips the warm-up "
                                  "either way). Supervised learning of the synthetic task is a plateau then a sharp "
                                  "drop whose step depends on the seed, so a fixed step count starts RL anywhere from "
                                  "10% to 90%; a target starts every seed at the same level", "warmup")
    sft_probe_every: int = opt(50, "with --sft-target-pass1: warm-up steps between probes", "warmup")
    sft_probe_problems: int = opt(200, "with --sft-target-pass1: training problems in the probe (a fixed set, drawn "
                                  "with --split-seed; the held-out split is never used to stop), each sampled "
                                  "--eval-n times at --eval-temperature", "warmup")
    sft_noise: float = opt(0.0, "fraction of warm-up answers replaced by a near miss (integer answers +-1 or +-2): "
                           "an imperfect demonstrator whose slips RL must then unlearn", "warmup")
    # evaluation
    eval_every: int = opt(0, "evaluate every E rollout steps (0 = only at start and end)", "eval")
    eval_n: int = opt(4, "samples per held-out problem", "eval", eval=True)
    eval_temperature: float = opt(0.6, "evaluation temperature (0 = greedy)", "eval", eval=True)
    eval_top_p: float = opt(0.95, "evaluation top_p", "eval", eval=True)
    eval_problems: int = opt(0, "held-out problems to evaluate (0 = all)", "eval", eval=True)
    # run
    out_dir: str = opt("runs/{algo}", "run directory (logs, checkpoints, eval results, plots); {algo} becomes the "
                       "algorithm. Training refuses one that already holds a run unless told what to do with it",
                       "run", eval=True)
    seed: int = opt(0, "random seed", "run", eval=True)
    threads: str = opt("auto", "CPU threads of torch: N, or auto = the cores this process may use minus those "
                       "busy by the 1-minute load average (an explicit OMP_NUM_THREADS is kept); a thread on a "
                       "core another process holds stalls every parallel operation", "run", eval=True)
    save_every: int = opt(50, "checkpoint every K rollout steps (0 = only at the end)", "run")
    keep_checkpoints: int = opt(2, "checkpoints kept on disk (0 = all)", "run")
    resume: bool = opt(False, "continue the run in out_dir from its latest checkpoint (a warm-up checkpoint "
                       "continues the warm-up); without --resume or --overwrite, an out_dir that holds a run is "
                       "refused", "run")
    overwrite: bool = opt(False, "delete the run already in out_dir (its metrics.jsonl, config.json, "
                          "checkpoints/, eval/, plots/ and tensorboard/; nothing else) and start afresh", "run")
    tensorboard: bool = opt(False, "also log to TensorBoard (needs the tensorboard package)", "run")
    plot: bool = opt(True, "write PNG plots at the end", "run")
    # former names, accepted as keyword arguments, config-file keys and flags (ALIASES)
    on_policy_shortcut: InitVar[bool | None] = None

    def __post_init__(self, on_policy_shortcut):
        if on_policy_shortcut is not None:
            self.one_pass = on_policy_shortcut
        if isinstance(self.out_dir, str) and isinstance(self.algo, str):
            self.out_dir = self.out_dir.replace("{algo}", self.algo)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def synthetic(self) -> bool:
        return self.data.startswith("synthetic:")

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming every option out of range and every combination the losses reject; cheap
        (no model, no data read), so it runs before any work. Returns self."""
        problems = _problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


# Former option names -> the field they stand for. Each works as a keyword of TrainConfig (an InitVar above), a
# config-file key and a flag (pacs/options.py), and reads and sets its field as an attribute.
ALIASES = {"on_policy_shortcut": "one_pass"}


def _alias(name: str) -> property:
    return property(lambda self: getattr(self, name), lambda self, value: setattr(self, name, value),
                    doc=f"the former name of `{name}`")


TrainConfig.on_policy_shortcut = _alias("one_pass")  # after @dataclass, which read the InitVar's default here


PRESETS: dict[str, dict] = {
    # The out-of-the-box CPU job (5 min 37 s on 2 cores for seed 0, longer for seeds whose warm-up needs more
    # steps): a tiny random-init model, a supervised warm-up on the synthetic task stopped once a probe of training
    # problems reaches 40% pass@1 (RL from random init is too sparse: no sampled answer would ever be right; where a
    # fixed step count stops depends on the seed, 9% to 88% held-out pass@1 in benchmarks/results), then 200 PACS
    # steps with the verifier as the only signal.
    "demo": dict(
        model="tiny", data="synthetic:arithmetic", level=2, n_train=10000, n_test=200,
        tiny_hidden=128, tiny_layers=4, tiny_heads=4, tiny_intermediate=512, dtype="float32",
        sft_steps=5000, sft_target_pass1=0.4, sft_batch=64, sft_lr=2e-3,
        steps=200, prompts_per_step=32, group_size=8, minibatches_per_rollout=2, max_new_tokens=6,
        temperature=1.0, lr=3e-4, warmup_steps=10, weight_decay=0.0, beta=1.0,
        eval_every=25, eval_n=8, eval_problems=200, save_every=50, out_dir="runs/demo-{algo}",
    ),
    # Well under a minute on 2 CPU cores (about 20 s under torchrun with 2 ranks, most of it imports): a very small
    # random-init model, one-digit arithmetic, 3 steps of 8 prompts x 4 answers in 2 mini-batches (so torchrun
    # --nproc-per-node 2 gives each rank 2 prompts of each), no warm-up, a tiny eval. For tests and CI
    # (`torchrun --standalone --nproc-per-node 2 -m pacs train --preset smoke`); its numbers mean nothing.
    "smoke": dict(
        model="tiny", data="synthetic:arithmetic", level=1, n_train=100, n_test=16,
        tiny_hidden=32, tiny_layers=2, tiny_heads=2, tiny_intermediate=64, dtype="float32",
        sft_steps=0, steps=3, prompts_per_step=8, group_size=4, minibatches_per_rollout=2, max_new_tokens=4,
        temperature=1.0, lr=1e-3, weight_decay=0.0, eval_every=0, eval_n=2, eval_problems=8, save_every=1,
        keep_checkpoints=2, out_dir="runs/smoke-{algo}",
    ),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_kind(f: dataclasses.Field) -> type:
    """bool | int | float | str: the type of a field's values (None aside)."""
    if f.default is not None:
        return type(f.default)
    return float if "float" in str(f.type) else str


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_DEVICE = re.compile(r"(auto|cpu|cuda(:\d+)?)")


def _problems(cfg: TrainConfig) -> list[str]:
    out: list[str] = []
    bad_type = set()
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), field_kind(f)
        if value is None and f.default is None:
            continue
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, str))
        if not ok:
            what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
            out.append(f"{flag(f.name)} must be {what}, got {value!r}")
            bad_type.add(f.name)
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            out.append(f"{flag(f.name)} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
            bad_type.add(f.name)

    def check(name, ok, requirement):
        if name not in bad_type and not ok(getattr(cfg, name)):
            out.append(f"{flag(name)} must be {requirement}, got {getattr(cfg, name)!r}")
            bad_type.add(name)

    finite = lambda x: x is None or math.isfinite(x)
    for name in ("tiny_hidden", "tiny_layers", "tiny_heads", "tiny_intermediate", "level", "n_train", "n_test",
                 "prompts_per_step", "group_size", "max_new_tokens", "generation_batch", "minibatches_per_rollout",
                 "sft_batch", "eval_n"):
        check(name, lambda x: x >= 1, ">= 1")
    for name in ("steps", "warmup_steps", "sft_steps", "eval_every", "eval_problems", "save_every",
                 "keep_checkpoints"):
        check(name, lambda x: x >= 0, ">= 0")
    for name in ("temperature", "lr", "sft_lr", "beta"):
        check(name, lambda x: finite(x) and x > 0, "a finite number > 0")
    for name in ("epsilon", "epsilon_high", "weight_decay", "grad_clip", "eval_temperature"):
        check(name, lambda x: x is None or finite(x) and x >= 0, "a finite number >= 0")
    check("entropy_coef", finite, "a finite number")
    for name in ("top_p", "eval_top_p"):
        check(name, lambda x: 0 < x <= 1, "in (0, 1]")
    check("top_k", lambda x: x >= 0, ">= 0 (0 = off)")
    check("min_p", lambda x: 0 <= x < 1, "in [0, 1) (0 = off)")
    for name in ("adam_beta1", "adam_beta2"):
        check(name, lambda x: 0 <= x < 1, "in [0, 1)")
    check("sft_noise", lambda x: 0 <= x <= 1, "in [0, 1]")
    check("sft_target_pass1", lambda x: 0 <= x <= 1, "in [0, 1] (0 = off)")
    for name in ("sft_probe_every", "sft_probe_problems"):
        check(name, lambda x: x >= 1, ">= 1")
    check("lora_r", lambda x: x >= 0, ">= 0 (0 = no LoRA)")
    check("lora_alpha", lambda x: x is None or finite(x) and x > 0, "a finite number > 0")
    check("lora_dropout", lambda x: 0 <= x < 1, "in [0, 1)")
    check("lora_targets", lambda x: x is None or x.strip(" ,") != "", "non-empty")
    check("seed", lambda x: 0 <= x < 2**32, "in [0, 2**32)")
    check("split_seed", lambda x: 0 <= x < 2**32, "in [0, 2**32)")
    for name in ("model", "problem_key", "answer_key", "out_dir"):
        check(name, lambda x: x.strip() != "", "non-empty")
    check("device", lambda x: _DEVICE.fullmatch(x) is not None, "auto, cpu, cuda or cuda:N")
    check("threads", _threads_ok, "auto or an integer >= 1")
    # The checks below combine options: each runs when the options it reads are well-formed.
    good = lambda *names: not bad_type.intersection(names)
    if cfg.model == "tiny" and good("tiny_hidden", "tiny_heads"):
        head_dim, rest = divmod(cfg.tiny_hidden, cfg.tiny_heads)
        if rest or head_dim % 2:
            out.append(f"--tiny-hidden / --tiny-heads ({cfg.tiny_hidden} / {cfg.tiny_heads}), the attention head "
                       "size, must be an even integer (rotary embeddings)")
    if good("model"):
        out += model_problems(cfg.model)
    if good("init_checkpoint") and cfg.init_checkpoint is not None:
        from .checkpoint import ADAPTER_FILE, MODEL_FILE, checkpoint_weights

        if checkpoint_weights(cfg.init_checkpoint) is None:
            out.append(f"--init-checkpoint: {cfg.init_checkpoint} holds neither {MODEL_FILE} nor {ADAPTER_FILE}")
    if good("lora_r", "lora_alpha", "lora_dropout", "lora_targets"):
        out += _lora_problems(cfg)
    if good("device", "attn", "kernel_backend"):
        out += _hardware_problems(cfg)
    if good("data", "test_data"):
        out += _data_problems(cfg)
    if good("group_size", "algo", "advantage") and cfg.group_size < 2:
        if cfg.algo in ("grpo", "rloo"):
            out.append(f"--group-size must be >= 2 for --algo {cfg.algo} (the advantage is relative to the other "
                       f"answers of the group), got {cfg.group_size}")
        elif cfg.advantage != "naive":
            out.append(f"--group-size must be >= 2 for PACS with --advantage {cfg.advantage} (a baseline from the "
                       f"other answers of the group; --advantage naive takes 1), got {cfg.group_size}")
    if good("reference", "algo", "score", "reset_optimizer"):
        out += _reference_problems(cfg)
    if good("out_dir") and Path(cfg.out_dir).exists() and not Path(cfg.out_dir).is_dir():
        out.append(f"--out-dir {cfg.out_dir} is a file, not a directory")
    if good("resume", "overwrite") and cfg.resume and cfg.overwrite:
        out.append("--resume and --overwrite contradict each other: --resume continues the run in --out-dir, "
                   "--overwrite deletes it")
    return out


def _threads_ok(value: str) -> bool:
    from .threads import parse_threads

    try:
        parse_threads(value)
    except ValueError:
        return False
    return True


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def looks_like_path(name: str) -> bool:
    """Whether a --model value names a local directory rather than a hub id: it starts with /, ~ or . (./, ../),
    holds a backslash or the platform's separator, ends with /, is no valid hub id (org/name: two slashes, a
    space, ...), or its first component is an existing local directory (models/qwen beside a models/ folder)."""
    if name.startswith(("/", "~", ".")) or name.endswith("/") or "\\" in name or (os.sep != "/" and os.sep in name):
        return True
    if _HUB_ID.fullmatch(name) is None:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def model_problems(model: str) -> list[str]:
    """A --model that is meant as a local directory but is none (checked here, at once: no hub lookup)."""
    if model == "tiny":
        return []
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return [f"--model {model}: the directory has no config.json (not a Hugging Face model directory)"]
        return []
    if path.exists():
        return [f"--model {model} is a file: give the model's directory"]
    if looks_like_path(model):
        return [f"--model {model}: no such directory (a hub id has the form org/name)"]
    return []


def snapshot_interval(reference: str) -> int | None:
    """K of `snapshot:K`; None for `old`. Raises ValueError for anything else."""
    if reference == "old":
        return None
    match = re.fullmatch(r"snapshot:(\d+)", reference)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"--reference must be old or snapshot:K with an integer K >= 1, got {reference!r}")
    return int(match.group(1))


def _reference_problems(cfg: TrainConfig) -> list[str]:
    try:
        interval = snapshot_interval(cfg.reference)
    except ValueError as err:
        return [str(err)]
    out = []
    if interval is not None and cfg.algo != "pacs":
        out.append(f"--reference {cfg.reference} applies to --algo pacs only (GRPO/RLOO's importance ratio is "
                   f"against the rollout policy), got --algo {cfg.algo}")
    elif interval is not None and cfg.score != "logratio_sum":
        out.append(f"--reference {cfg.reference} needs --score logratio_sum (--score {cfg.score} reads no "
                   "reference log-probs)")
    if cfg.reset_optimizer and interval is None:
        out.append("--reset-optimizer needs --reference snapshot:K (it acts at each snapshot refresh)")
    return out


def _lora_problems(cfg: TrainConfig) -> list[str]:
    """LoRA options without --lora-r, a missing PEFT, targets that name the frozen head, torchrun."""
    set_without = [flag(n) for n in ("lora_alpha", "lora_targets") if getattr(cfg, n) is not None]
    set_without += ["--lora-dropout"] if cfg.lora_dropout else []
    if not cfg.lora_r:
        verb = "apply" if len(set_without) > 1 else "applies"
        return [f"{', '.join(set_without)} {verb} to LoRA adapters only: set --lora-r >= 1 (0 is full "
                "fine-tuning)"] if set_without else []
    out = []
    if importlib.util.find_spec("peft") is None:
        out.append('--lora-r needs the peft package: pip install -e ".[lora]" (or pip install \'peft>=0.13\')')
    names = [t.strip() for t in (cfg.lora_targets or "").split(",") if t.strip()]
    frozen = [t for t in names if t.rsplit(".", 1)[-1] in ("lm_head", "embed_tokens", "wte", "embed_out")]
    if frozen:
        out.append(f"--lora-targets {','.join(frozen)}: the lm_head and the embeddings stay frozen under LoRA (the "
                   "fused head reads the plain weight, an adapter there would be ignored)")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        out.append("--lora-r is not supported under torchrun: LoRA with FSDP2 is untested, and the snapshot "
                   "reference swaps adapter tensors that FSDP2 shards; train LoRA in one process (it is what "
                   "makes a large policy fit on one GPU)")
    return out


def _hardware_problems(cfg: TrainConfig) -> list[str]:
    """CUDA asked for where there is none; flash-attention or Triton where they cannot run."""
    cuda = cfg.device.startswith("cuda")
    if not (cuda or cfg.kernel_backend == "triton" or cfg.attn == "flash_attention_2"):
        return []
    import torch

    out = []
    if cuda and not torch.cuda.is_available():
        out.append(f"--device {cfg.device}: CUDA is not available here (use --device cpu or auto)")
    elif cfg.device.startswith("cuda:") and int(cfg.device[5:]) >= torch.cuda.device_count():
        out.append(f"--device {cfg.device}: there are {torch.cuda.device_count()} CUDA device(s)")
    on_gpu = cuda or cfg.device == "auto" and torch.cuda.is_available()
    if cfg.attn == "flash_attention_2" and (not on_gpu or importlib.util.find_spec("flash_attn") is None):
        out.append("--attn flash_attention_2 needs the flash_attn package and a CUDA device")
    if cfg.kernel_backend == "triton":  # the warm-up uses it even with --loss-impl reference
        from pacs_kernels.dispatch import resolve_backend

        try:
            resolve_backend("triton", torch.device("cuda" if on_gpu else "cpu"))
        except ValueError as err:
            out.append(f"--kernel-backend triton: {err}")
    return out


def _data_problems(cfg: TrainConfig) -> list[str]:
    """An unknown synthetic task, a data file that is missing or of an unknown type, --test-data without a file."""
    out = []
    if cfg.synthetic:
        from .tasks import TASKS

        task = cfg.data.split(":", 1)[1]
        if task not in TASKS:
            out.append(f"--data {cfg.data}: unknown synthetic task {task!r}; choose one of "
                       f"{', '.join('synthetic:' + t for t in TASKS)}")
        if cfg.test_data is not None:
            out.append("--test-data applies to file data only: synthetic tasks have their own held-out split "
                       "(--n-test)")
    for name in ("test_data",) if cfg.synthetic else ("data", "test_data"):
        path = getattr(cfg, name)
        if path is None:
            continue
        if not Path(path).is_file():
            out.append(f"{flag(name)}: data file {path} does not exist")
        elif Path(path).suffix.lower() not in DATA_SUFFIXES:
            out.append(f"{flag(name)}: unsupported data file type {Path(path).suffix!r} for {path}: use "
                       f"{', '.join(DATA_SUFFIXES)}")
    return out
