"""Triton kernels of pacs_kernels. Imported lazily: `pacs_kernels` itself works without Triton."""
