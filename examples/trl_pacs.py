"""PACS inside TRL's own training loop: `PACSTrainer` is `trl.GRPOTrainer` with the PACS loss and pacs_kernels'
fused LM head (no [tokens x vocab] logits).

    pip install -e ".[trl]"                                                   # in a clone of the repository
    python examples/trl_pacs.py --model Qwen/Qwen2.5-0.5B-Instruct            # a real model (downloads it)
    python examples/trl_pacs.py --tiny --max-steps 2                          # offline smoke run, random weights
    python examples/trl_pacs.py --tiny --loss-type dapo                       # TRL's DAPO loss on the fused head

Data: synthetic arithmetic problems (pacs.tasks) with a `prompt` and an `answer` column; reward: pacs' math
verifier (`pacs.verify.math_reward`, 1.0 / 0.0), the label PACS trains its implicit critic on.
"""

from __future__ import annotations

import argparse


def tiny_model_and_tokenizer():
    """A random 2-layer Qwen2 and a character-level tokenizer, both built offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + list("0123456789+-*=x; "))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config), tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--tiny", action="store_true", help="a random tiny model, offline (a smoke run)")
    parser.add_argument("--loss-type", default="pacs", help="'pacs' or a TRL loss type (grpo, dapo, ...)")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--output-dir", default="runs/trl_pacs")
    args = parser.parse_args(argv)

    from datasets import Dataset

    from pacs.integrations.trl import PACSConfig, PACSTrainer
    from pacs.tasks import make_synthetic_split
    from pacs.verify import math_reward

    train, _ = make_synthetic_split("arithmetic", level=1, n_train=64, n_test=0, seed=0)
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in train], "answer": [p.answer for p in train]})
    if args.tiny:
        model, tokenizer = tiny_model_and_tokenizer()
    else:
        from transformers import AutoTokenizer

        model, tokenizer = args.model, AutoTokenizer.from_pretrained(args.model)

    config = PACSConfig(
        output_dir=args.output_dir,
        loss_type=args.loss_type,       # "pacs": BCE of the implicit critic; or any TRL loss on the fused head
        pacs_beta=1.0, pacs_advantage="rloo", pacs_class_balance=True,
        num_generations=8, per_device_train_batch_size=8,   # whole groups of 8 completions per micro-batch
        max_completion_length=16 if args.tiny else 256,
        learning_rate=1e-5 if not args.tiny else 1e-3, max_steps=args.max_steps, logging_steps=1,
        use_cpu=args.tiny, bf16=not args.tiny, report_to="none", save_strategy="no",
    )
    trainer = PACSTrainer(model=model, reward_funcs=[math_reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()
    for log in trainer.state.log_history:
        if "loss" in log:
            critic = {k: round(v, 4) for k, v in log.items() if k.startswith("pacs/") and v is not None}
            print(f"step {log['step']}: loss {log['loss']:.4f} reward {log.get('reward', float('nan')):.3f} {critic}")


if __name__ == "__main__":
    main()
