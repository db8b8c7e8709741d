"""Test set-up: without a GPU, Triton kernels run in its CPU interpreter.

TRITON_INTERPRET must be set before any kernel is decorated, i.e. before pacs_kernels' Triton modules are imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
