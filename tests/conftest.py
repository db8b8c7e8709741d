"""Test set-up: without a GPU, Triton kernels run in its CPU interpreter; the `gpu` and `cpu` markers.

TRITON_INTERPRET must be set before any kernel is decorated, i.e. before pacs_kernels' Triton modules are imported.

Tests run on `tests.helpers.DEVICE`: "cuda" where a CUDA device is present, else "cpu". `@pytest.mark.gpu` tests
need CUDA and are skipped without it; `@pytest.mark.cpu` tests need the CPU (the Triton interpreter, or behaviour
only the CPU path has) and are skipped on a CUDA run. `CUDA_VISIBLE_DEVICES= pytest` runs the CPU suite, the
interpreter included, on a GPU machine.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()

if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    needs_gpu = pytest.mark.skip(reason="needs a CUDA device")
    needs_cpu = pytest.mark.skip(reason="CPU only (the Triton interpreter or CPU-only behaviour); this run has CUDA: "
                                        "CUDA_VISIBLE_DEVICES= pytest runs it")
    for item in items:
        if not CUDA and item.get_closest_marker("gpu") is not None:
            item.add_marker(needs_gpu)
        if CUDA and item.get_closest_marker("cpu") is not None:
            item.add_marker(needs_cpu)
