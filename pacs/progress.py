"""Progress bars whose end is what the user waits for."""

from __future__ import annotations

from tqdm.auto import tqdm


class WarmupBar:
    """The supervised warm-up's bar. With a probe target it shows the probe's pass@1 against the target (the step
    cap is only a cap: a bar to it would promise hours that the target ends early), the steps and the NLL beside
    it; without one, steps of --sft-steps."""

    def __init__(self, sft_steps: int, target: float, start: int, probed: float | None, disable: bool):
        self.sft_steps, self.target, self.nll = sft_steps, target > 0, None
        if self.target:
            self.bar = tqdm(total=round(100 * target, 1), desc="supervised warm-up", disable=disable,
                            dynamic_ncols=True, bar_format="{desc}: probe pass@1 {n:.1f}% of target {total:.1f}% "
                            "|{bar}| [{elapsed}{postfix}]")
            if probed is not None:
                self.probe(probed)
        else:
            self.bar = tqdm(total=sft_steps, initial=start, desc="supervised warm-up", disable=disable,
                            dynamic_ncols=True)

    def step(self, done: int, loss) -> None:
        """Warm-up step `done` (1-based) finished with this loss (a tensor, read every 10 steps)."""
        if done % 10 == 1 or done == self.sft_steps:
            self.nll = loss.item()
        if not self.target:
            self.bar.update(1)
            if done % 10 == 1:
                self.bar.set_postfix(nll=f"{self.nll:.3f}")
        elif done % 10 == 1:
            self.bar.set_postfix_str(f"step {done} (cap {self.sft_steps}), nll {self.nll:.3f}")

    def probe(self, pass1: float) -> None:
        """A probe's pass@1: the bar's position toward the target."""
        if self.target:
            self.bar.n = min(round(100 * pass1, 1), self.bar.total)
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
