"""Where the kept-set gather path stops beating the masked (sliced) path: the crossover mean kept-set size k*.

    OMP_NUM_THREADS=1 python -m benchmarks.replay_crossover --n 2048 --d 256 --vocab 151936 --ks 1,8,64,512,4096
    OMP_NUM_THREADS=1 python -m benchmarks.replay_crossover --ks 512,1024,2048 --repeats 5 --json out.json

For each mean kept-set size k, every row keeps k distinct random ids (its target among them): forward + backward
(random upstream gradients on logprob and entropy, gradients of hidden, weight and bias) of
`linear_logprob(kept_ids=, kept_offsets=, replay_impl="gather")` and `(replay_impl="masked")`, and of the plain `linear_logprob` (the cost
the masked path adds its mask to). The implementations run interleaved, A B C A B C ..., in one process, one warm-up
round discarded; the table gives each one's median seconds with its min-max over the repeats, and the median of the
per-round ratio gather / masked with its min-max. k* lies where that ratio crosses 1.

Costs per token (k kept ids): gather 6kD FLOP plus k weight-row gathers per pass; masked 8VD FLOP (the GEMMs) plus
the mask (a fill of each logit slice and O(k) scattered writes). At D = 256 on one CPU core the gather is bound by
the random row reads (1 KiB per fp32 row), the masked path by the GEMMs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pacs_kernels import kept_from_padded, linear_logprob


def kept_sets(n: int, vocab: int, k: int, gen: torch.Generator):
    """(targets [n], ids, offsets): k distinct uniform ids per row (all of them when k >= V), the target the first."""
    if k >= vocab:
        ids = torch.arange(vocab, dtype=torch.int32).repeat(n, 1)
        targets = torch.randint(0, vocab, (n,), generator=gen)
        return targets, *kept_from_padded(ids)
    rows = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)]).to(torch.int32)
    return rows[:, 0].long(), *kept_from_padded(rows)


def step(impl: str, hidden, weight, bias, targets, ids, offsets, g_lp, g_ent, backend: str):
    h, w, b = (x.detach().requires_grad_() for x in (hidden, weight, bias))
    if impl == "plain":
        out = linear_logprob(h, w, targets, bias=b, temperature=0.8, with_entropy=True, backend=backend)
    else:
        out = linear_logprob(h, w, targets, bias=b, temperature=0.8, kept_ids=ids, kept_offsets=offsets,
                             with_entropy=True, backend=backend, replay_impl=impl)
    ((out.logprob * g_lp).sum() + (out.entropy * g_ent).sum()).backward()
    return h.grad, w.grad, b.grad


def measure(n, d, vocab, k, impls, repeats, backend, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen) * 0.5
    weight = torch.randn(vocab, d, generator=gen) * 0.1
    bias = torch.randn(vocab, generator=gen) * 0.1
    g_lp, g_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    targets, ids, offsets = kept_sets(n, vocab, k, gen)
    times = {impl: [] for impl in impls}
    for r in range(repeats + 1):  # round 0 is the warm-up
        order = impls[r % len(impls):] + impls[:r % len(impls)]  # rotate who goes first
        for impl in order:
            start = time.perf_counter()
            step(impl, hidden, weight, bias, targets, ids, offsets, g_lp, g_ent, backend)
            if r:
                times[impl].append(time.perf_counter() - start)
    return times


def summary(times: dict) -> dict:
    out = {impl: dict(median=statistics.median(t), lo=min(t), hi=max(t), runs=t) for impl, t in times.items()}
    if "gather" in times and "masked" in times:
        ratios = [g / m for g, m in zip(times["gather"], times["masked"])]
        out["gather/masked"] = dict(median=statistics.median(ratios), lo=min(ratios), hi=max(ratios))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--ks", default="1,8,64,512,4096", help="mean kept-set sizes; 'V' for the full vocabulary")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", default="gather,masked,plain")
    parser.add_argument("--no-gather-above", type=int, default=None, help="skip the gather path above this k")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--json", help="append the results to this JSON-lines file")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), N={args.n} D={args.d} V={args.vocab} "
          f"fp32, backend {args.backend}, {args.repeats} interleaved repeats")
    print("| k | gather s (min-max) | masked s (min-max) | plain s (min-max) | gather/masked (min-max) |")
    print("|---|---|---|---|---|")
    for spec in args.ks.split(","):
        k = args.vocab if spec.strip().upper() == "V" else int(spec)
        impls = [i for i in args.impls.split(",")
                 if not (i == "gather" and args.no_gather_above is not None and k > args.no_gather_above)]
        s = summary(measure(args.n, args.d, args.vocab, k, impls, args.repeats, args.backend))
        cell = lambda name: (f"{s[name]['median']:.3f} ({s[name]['lo']:.3f}-{s[name]['hi']:.3f})" if name in s
                             else "-")
        print(f"| {'V' if k == args.vocab else k} | {cell('gather')} | {cell('masked')} | {cell('plain')} | "
              f"{cell('gather/masked')} |", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(dict(n=args.n, d=args.d, vocab=args.vocab, k=k, backend=args.backend,
                                        threads=torch.get_num_threads(), results=s)) + "\n")


if __name__ == "__main__":
    main()
