"""Peak memory of one TRL loss step on the CPU: GRPOTrainer's own LM head vs pacs' fused head (PACSTrainer).

One loss step = `trainer.compute_loss(model, batch)` + `backward()` on a hand-built batch of B completions of C
tokens, with a tiny random Qwen2 whose vocabulary is Qwen2.5's (151936) -- the LM head dominates, as it does for
real models at long completions. Each measurement runs in a fresh subprocess and reports the growth of the peak
RSS (`ru_maxrss`) over the RSS just before the step, so the model, the trainer and the imports cancel out.

    python benchmarks/trl_memory.py                      # trl-dapo, pacs-dapo, pacs-pacs, 3 runs each
    python benchmarks/trl_memory.py --impls trl-dapo pacs-dapo --repeats 5 --completion-length 512

Impls: `trl-dapo` (GRPOTrainer, loss_type="dapo", TRL's head), `pacs-dapo` (PACSTrainer, the same loss on
pacs_kernels.linear_logprob), `pacs-pacs` (PACSTrainer, loss_type="pacs").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

IMPLS = ("trl-dapo", "pacs-dapo", "pacs-pacs")
MiB = 1 << 20


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(args) -> dict:
    """One loss step of one impl in this process; returns the memory figures in bytes."""
    import gc

    import torch
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    import trl
    from pacs.integrations.trl import PACSConfig, PACSTrainer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=args.prompt_length + args.completion_length, tie_word_embeddings=True,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = Qwen2ForCausalLM(cfg).float()
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2},
                                                                              unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    from datasets import Dataset

    common = dict(output_dir="/tmp/pacs-trl-memory", use_cpu=True, bf16=False, report_to="none",
                  per_device_train_batch_size=args.batch, num_generations=args.group, save_strategy="no")
    loss_type = args.impl.split("-")[1]
    if args.impl.startswith("trl"):
        cls, conf = trl.GRPOTrainer, trl.GRPOConfig(loss_type=loss_type, **common)
    else:
        cls, conf = PACSTrainer, PACSConfig(loss_type=loss_type, pacs_kernel_backend="torch", **common)
    trainer = cls(model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], args=conf,
                  train_dataset=Dataset.from_dict({"prompt": ["a"] * args.batch}), processing_class=tok)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1

    g = torch.Generator().manual_seed(1)
    B, P, C = args.batch, args.prompt_length, args.completion_length
    completion_mask = torch.ones(B, C, dtype=torch.long)
    batch = {
        "prompt_ids": torch.randint(3, args.vocab, (B, P), generator=g),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(3, args.vocab, (B, C), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g),
        "num_items_in_batch": completion_mask.sum(),
        "pacs_rewards": (torch.arange(B) % 2).float(),
        "pacs_group": torch.arange(B) // args.group,
    }
    gc.collect()
    before, peak_before = current_rss(), peak_rss()
    start = time.perf_counter()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    seconds = time.perf_counter() - start
    peak_after = peak_rss()
    return {"impl": args.impl, "rss_before": before, "peak_before": peak_before, "peak_after": peak_after,
            "step_peak": peak_after - before, "seconds": seconds, "loss": loss.item(),
            "peak_reached_in_step": peak_after > peak_before}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--completion-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the runs here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.impl = args.child
        print("RESULT " + json.dumps(child(args)))
        return 0

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    flags = ["--vocab", str(args.vocab), "--hidden", str(args.hidden), "--batch", str(args.batch), "--group",
             str(args.group), "--prompt-length", str(args.prompt_length), "--completion-length",
             str(args.completion_length), "--threads", str(args.threads)]
    runs = []
    for rep in range(args.repeats):  # interleaved, so that load on the machine hits every impl alike
        for impl in args.impls:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", impl, *flags], env=env,
                                  capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
                raise SystemExit(f"{impl}: child failed (rc {proc.returncode})")
            run = json.loads(line[len("RESULT "):])
            runs.append(run)
            print(f"  {impl:10s} run {rep + 1}: step peak +{run['step_peak'] / MiB:7.1f} MiB "
                  f"({run['seconds']:.1f} s, loss {run['loss']:.5f}"
                  f"{'' if run['peak_reached_in_step'] else ', PEAK NOT IN STEP'})", flush=True)
    n_tokens = args.batch * args.completion_length
    print(f"\nvocab {args.vocab}, hidden {args.hidden}, {args.batch} x {args.completion_length} completion tokens "
          f"({n_tokens}); float32 logits of those tokens would be {n_tokens * args.vocab * 4 / MiB:.0f} MiB")
    print(f"{'impl':10s} {'median MiB':>10s} {'min':>8s} {'max':>8s} {'median s':>9s}")
    for impl in args.impls:
        peaks = [r["step_peak"] / MiB for r in runs if r["impl"] == impl]
        secs = [r["seconds"] for r in runs if r["impl"] == impl]
        print(f"{impl:10s} {statistics.median(peaks):10.1f} {min(peaks):8.1f} {max(peaks):8.1f} "
              f"{statistics.median(secs):9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
