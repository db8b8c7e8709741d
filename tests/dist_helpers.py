"""Multi-process tests on the CPU: gloo process groups on 127.0.0.1, workers started with spawn.

Worker functions must live at module level of an importable module (spawn pickles them by name). Every worker
gets a 120 s collective timeout, and `run_workers` kills its own workers after `timeout` seconds, so a hang in a
collective fails the test instead of blocking the suite.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, fn, world, port, args):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two workers on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_workers(fn, world: int, *args, timeout: float = 300.0) -> None:
    """Run fn(rank, world, *args) in `world` spawned processes of one gloo group; raise if any fails or hangs."""
    context = mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{world} workers of {fn.__name__} still running after {timeout:.0f} s")
