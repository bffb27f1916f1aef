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

__all__ = ["__version__", *_error_names]
