"""The TRL side of the plug-in: the imports (TRL is an optional extra), the tested releases and `check_trl`."""

from __future__ import annotations

import inspect
import warnings

try:
    import trl
    from accelerate.utils import is_peft_model
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer import grpo_trainer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"pacs.integrations.trl needs TRL ({err}); install it with: pip install -e \".[trl]\" (in a "
                      "clone of pacs)") from err

__all__ = ["GRPOConfig", "GRPOTrainer", "TESTED_TRL", "check_trl", "grpo_trainer", "is_peft_model", "trl"]

# The TRL releases the plug-in is tested against (and the `trl` extra's pin in setup.py).
TESTED_TRL = ">=1.16,<2"
_TESTED_MIN, _TESTED_MAX = (1, 16), (2, 0)

# What the plug-in overrides or calls: GRPOTrainer methods, names in trl.trainer.grpo_trainer, and a fragment of
# the source of a method that must still be there (the contract the fused head plugs into).
_TRAINER_METHODS = ("_compute_loss", "_generate_and_score_completions", "_get_per_token_logps_and_entropies",
                    "_prepare_inputs", "_calculate_rewards")
_MODULE_NAMES = ("split_pixel_values_by_grid", "unsplit_pixel_values_by_grid", "split_tensor_dict")
_SOURCE_CONTRACT = {
    "_get_per_token_logps_and_entropies": ("fused_lm_head=True", "outputs.log_probs", "outputs.entropy"),
    "_compute_loss": ('inputs.get("old_per_token_logps")', "self._get_per_token_logps_and_entropies"),
    "_prepare_inputs": ("self._buffered_inputs", "steps_per_generation"),
}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_trl() -> None:
    """Raise RuntimeError when the installed TRL lacks an internal the plug-in relies on; warn outside the tested
    range (`TESTED_TRL`) when everything is there."""
    version = getattr(trl, "__version__", "unknown")
    missing = [f"GRPOTrainer.{name}" for name in _TRAINER_METHODS if not callable(getattr(GRPOTrainer, name, None))]
    missing += [f"trl.trainer.grpo_trainer.{name}" for name in _MODULE_NAMES if not hasattr(grpo_trainer, name)]
    for method, fragments in _SOURCE_CONTRACT.items():
        fn = getattr(GRPOTrainer, method, None)
        try:
            source = inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):  # no source shipped: nothing more to check
            continue
        missing += [f"{fragment!r} in GRPOTrainer.{method}" for fragment in fragments if fragment not in source]
    if missing:
        raise RuntimeError(
            f"pacs.integrations.trl was tested with trl{TESTED_TRL}, and the installed trl {version} differs in "
            f"internals it relies on: {', '.join(missing)}. Install a tested release: pip install \"trl{TESTED_TRL}\""
        )
    if not (_TESTED_MIN <= _version_tuple(version) < _TESTED_MAX):
        warnings.warn(f"pacs.integrations.trl was tested with trl{TESTED_TRL}; trl {version} is installed. Its "
                      "internals look the same, but check the losses against GRPOTrainer's.", stacklevel=3)

