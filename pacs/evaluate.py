"""pass@k evaluation: n samples per problem, the unbiased estimator of Chen et al. (2021).

    pass@k = mean over problems of 1 - C(n - c, k) / C(n, k)     (n samples, c correct, k <= n)

computed as 1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms the large binomials.

`run_eval` is the held-out evaluation of a run (`pacs train` at its start, every --eval-every steps and at its
end; `pacs eval`): RUN/eval/TAG.json, a table on screen and an eval row in the metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .rollout import Generator, SamplingParams
from .verify import math_reward


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with c correct answers among n samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def ks_for(n: int) -> list[int]:
    """1, 2, 4, ... up to n (and n itself)."""
    ks = [2**i for i in range(int(math.log2(n)) + 1)] if n >= 1 else []
    if ks and ks[-1] != n:
        ks.append(n)
    return ks


def evaluate(generator: Generator, tokenizer, problems, prompts, *, n: int, temperature: float, top_p: float,
             max_new_tokens: int) -> dict:
    """Sample n answers per problem, verify them, and return {"n", "pass@k": {k: value}, "correct": [...]}."""
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            record_kept=False)  # pass@k needs no log-probs, hence no kept sets
    rollouts = generator.generate(prompts, params)
    texts = [tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]
    answers = [p.answer for p in problems for _ in range(n)]
    rewards = math_reward(texts, answers)
    correct = [int(sum(rewards[i * n:(i + 1) * n])) for i in range(len(problems))]
    table = {k: sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in ks_for(n)}
    return {"n": n, "temperature": temperature, "top_p": top_p, "problems": len(problems), "pass@k": table,
            "correct": correct, "truncation_rate": sum(r.truncated for r in rollouts) / max(len(rollouts), 1)}


def sampled_pass_at_k(session, problems, prompts) -> dict:
    """`evaluate` of these problems with the evaluation's sampling (--eval-n, --eval-temperature, --eval-top-p) on
    a run's Session (pacs/session.py); under torchrun every rank samples, with the FSDP parameters gathered."""
    cfg = session.cfg
    with session.dist.gathered_for_generation(session.model):
        return evaluate(session.generator, session.tokenizer, problems, prompts, n=cfg.eval_n,
                        temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, max_new_tokens=cfg.max_new_tokens)


def run_eval(session, tag: str, log, meta: dict | None = None) -> dict:
    """Held-out pass@k of the session's model into RUN/eval/TAG.json (with `meta`, e.g. the checkpoint evaluated),
    a table on screen and an eval row in the metrics (`log`: the run's RunLog, pacs/metrics.py)."""
    cfg = session.cfg
    result = sampled_pass_at_k(session, session.test, session.test_prompts)  # every rank evaluates; rank 0 writes
    result.update(tag=tag, **(meta or {}))
    log.evaluation(tag, result, f"eval [{tag}] pass@k on {result['problems']} held-out problems (n={cfg.eval_n}, "
                                f"T={cfg.eval_temperature}):\n{format_table(result)}")
    return result


def format_table(result: dict) -> str:
    rows = ["| k | pass@k |", "| --- | --- |"]
    rows += [f"| {k} | {100 * v:.1f}% |" for k, v in result["pass@k"].items()]
    return "\n".join(rows)


def save_result(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)


def train_evaluations(run_dir: str | Path) -> list[tuple[int | None, dict]]:
    """(RL step, result) of the evaluations `pacs train` wrote into RUN/eval: `init.json` (before the warm-up;
    step None) first, then `step_NNNNNN.json` by step. `pacs eval --tag` results are not among them."""
    out = []
    for path in Path(run_dir, "eval").glob("*.json"):
        if path.stem == "init" or (path.stem.startswith("step_") and path.stem[5:].isdigit()):
            step = None if path.stem == "init" else int(path.stem[5:])
            out.append((step, json.loads(path.read_text())))
    return sorted(out, key=lambda item: -1 if item[0] is None else item[0])


def summary_line(run_dir: str | Path) -> str | None:
    """The run's outcome in one line: held-out pass@1 (and pass@n) at its first RL-step evaluation -> at its last,
    and pass@1 before the warm-up when there was one; None with fewer than two RL-step evaluations."""
    evals = train_evaluations(run_dir)
    steps = [(step, result) for step, result in evals if step is not None]
    if len(steps) < 2:
        return None
    (first_step, first), (last_step, last) = steps[0], steps[-1]
    pct = lambda result, k: f"{100 * result['pass@k'][str(k)]:.1f}%"
    line = f"held-out pass@1 {pct(first, 1)} -> {pct(last, 1)} (step {first_step} -> {last_step})"
    k_max = max(int(k) for k in last["pass@k"])
    if k_max > 1 and str(k_max) in first["pass@k"]:
        line += f"; pass@{k_max} {pct(first, k_max)} -> {pct(last, k_max)}"
    if evals[0][0] is None:
        line += f"; before the warm-up pass@1 {pct(evals[0][1], 1)}"
    return line + f" ({last['problems']} problems, {last['n']} samples each)"
