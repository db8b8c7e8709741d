"""What a result depends on beyond its settings: the library versions and the machine it ran on.

Shared by `pacs train` (config.json's "versions" and "hardware") and the benchmarks (their `_meta` records and
each row's library version: the device, the GPU's properties, the versions, the commit, torch's threads and the
machine's load). Imports torch and numpy only: a library named in `versions` is read from the loaded module, or
imported, and None where it is not installed; `package_version` reads an installed distribution's metadata.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

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


def package_version(name: str) -> str | None:
    """The installed version of the distribution `name` (torch: `torch.__version__`; pacs run from a checkout
    without installing: its `__version__`), None when it is not installed."""
    if name == "torch":
        return torch.__version__
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "pacs":
            import pacs

            return pacs.__version__
        return None


def gpu_properties(device: torch.device) -> dict:
    """{"capability": "9.0", "sms", "gpu_memory_gib"} of a CUDA device; {} for any other."""
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    return {"capability": "%d.%d" % torch.cuda.get_device_capability(device), "sms": props.multi_processor_count,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1)}


def load_state() -> dict:
    """What timings on a shared machine depend on: {"torch_threads", "omp_wait_policy" ($OMP_WAIT_POLICY or ''),
    "loadavg": the 1-, 5- and 15-minute load averages}."""
    return {"torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def git_commit(path: Path | None = None) -> str:
    """The short commit of the git checkout holding `path` (default: this package's), '' outside one."""
    where = path or Path(__file__).resolve().parent
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
