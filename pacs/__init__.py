"""pacs: a thin RLVR trainer (PACS, GRPO, RLOO) on Hugging Face models, built on `pacs_kernels`."""

__version__ = "0.1.0"
