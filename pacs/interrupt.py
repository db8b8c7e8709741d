"""SIGINT/SIGTERM during `pacs train`: stop after the current step with a checkpoint, not in the middle of one."""

from __future__ import annotations

import signal

from tqdm.auto import tqdm


class StopFlag:
    """SIGINT/SIGTERM set a flag; the warm-up or the RL loop saves a checkpoint after the current step (an
    evaluation under way finishes first) and stops. A second signal acts at once (KeyboardInterrupt for SIGINT).
    `agreed()` is what every rank acts on: a signal reaches the ranks of a torchrun job at different moments, so
    all stop if any got one (`Distribution.any`, one all-reduce)."""

    def __init__(self, dist):
        self.dist = dist
        self.stop = False
        self._previous = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with their owner
                pass
        return self

    def _handle(self, signum, frame):
        self.stop = True
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping (again to "
                   "stop at once)")
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second signal acts at once

    def agreed(self) -> bool:
        """Whether to stop (every rank alike)."""
        self.stop = self.dist.any(self.stop)
        return self.stop

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
