"""pacs inside other training frameworks.

- `pacs.integrations.trl`: `PACSTrainer` / `PACSConfig`, drop-in subclasses of TRL's `GRPOTrainer` / `GRPOConfig`
  (install with `pip install -e ".[trl]"` in a clone): the PACS loss on TRL's batches, and
  `pacs_kernels.linear_logprob` as the LM head for every TRL loss type.

Nothing here is imported by `pacs` itself, so the frameworks stay optional.
"""
