"""slimllm: structured pruning of LLM attention heads and MLP channels (SlimLLM, ICML 2025).

The numerical core is the native module ``slimllm._core`` (Rust); this package adds model
adapters, the block-by-block pruning pipeline, checkpoints and evaluation.
"""

from importlib.metadata import PackageNotFoundError, version

from slimllm.errors import *  # noqa: F403
from slimllm.errors import __all__ as _error_names

try:
    __version__ = version("slimllm")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

# The pruning API, imported on first use (it pulls in torch and transformers):
#   PruneConfig, prune_model (slimllm.pruning.pipeline), load_pruned,
#   load_tokenizer (slimllm.io.checkpoint),
#   load_calibration, CalibrationSet (slimllm.pruning.calibration).
_LAZY = {
    "PruneConfig": "slimllm.pruning.pipeline",
    "prune_model": "slimllm.pruning.pipeline",
    "load_pruned": "slimllm.io.checkpoint",
    "load_tokenizer": "slimllm.io.checkpoint",
    "load_calibration": "slimllm.pruning.calibration",
    "CalibrationSet": "slimllm.pruning.calibration",
}

__all__ = ["__version__", *_error_names, *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'slimllm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
