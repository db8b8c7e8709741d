"""What a result depends on beyond its settings: the library versions and the machine it ran on.

Shared by `pacs train` (config.json's "versions" and "hardware") and the benchmarks (their `_meta` records).
Imports torch and numpy only: a library named in `versions` is read from the loaded module, or imported, and
None where it is not installed.
"""

from __future__ import annotations

import os
import platform
import sys

import numpy as np
import torch


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def module_version(name: str) -> str | None:
    """`name.__version__` of the loaded module (imported here if needed); None when it does not import."""
    module = sys.modules.get(name)
    if module is None:
        try:
            module = __import__(name)
        except ImportError:
            return None
    return getattr(module, "__version__", None)


def versions(extra: tuple[str, ...] = ("transformers", "triton")) -> dict:
    """{"python", "torch", "numpy", and each of `extra`: version or None}."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    out.update({name: module_version(name) for name in extra})
    return out


def hardware(device: torch.device) -> dict:
    """The CPU, its core count, torch's CPU threads, the OS; the GPU and CUDA version on a CUDA device."""
    out = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "platform": platform.platform()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["cuda"] = torch.version.cuda
    return out


def environment_info(device: torch.device) -> dict:
    """{"versions": ..., "hardware": ...}: what config.json records beside the options."""
    return {"versions": versions(), "hardware": hardware(device)}


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' on a CUDA device, else the CPU's model name with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores)"
