"""pytest set-up for `pytest benchmarks/ --benchmark-only` (the default `pytest` never collects this folder).

- Files named bench_*.py are collected here (pytest.ini's python_files default is test_*.py).
- Without a GPU, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set before any kernel is
  decorated, i.e. before pacs_kernels' Triton modules are imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
