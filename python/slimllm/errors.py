"""The exception hierarchy of slimllm.

Every error slimllm raises on purpose is a :class:`SlimLLMError`. The numerical core's errors
(one class per Rust ``SlimError`` variant) are defined in the native module ``slimllm._core``;
the classes below are raised by the Python side (model loading, calibration, checkpoints).
"""

from slimllm._core import (
    EmptyAccumulatorError,
    InvalidCountError,
    InvalidRatioError,
    NonFiniteError,
    NotPositiveDefiniteError,
    ShapeMismatchError,
    SlimLLMError,
)


class ConfigError(SlimLLMError, ValueError):
    """A user setting is invalid (ratio outside [0, 1), unknown mode, bad device, ...)."""


class UnsupportedArchitectureError(SlimLLMError, ValueError):
    """The model's architecture has no slimllm adapter; the message names it."""


class CalibrationError(SlimLLMError, ValueError):
    """Calibration data is missing, unreadable, empty or too short for the request."""


class CheckpointError(SlimLLMError, OSError):
    """A model folder or file is missing, corrupt, or could not be written."""


class DistributedError(SlimLLMError, ValueError):
    """A run over several processes (torchrun) asked for something it cannot do exactly."""


class MissingDependencyError(SlimLLMError, ImportError):
    """An optional package a feature needs is not installed; the message names it and how to
    install it."""


__all__ = [
    "SlimLLMError",
    "ShapeMismatchError",
    "NonFiniteError",
    "InvalidCountError",
    "InvalidRatioError",
    "EmptyAccumulatorError",
    "NotPositiveDefiniteError",
    "ConfigError",
    "UnsupportedArchitectureError",
    "CalibrationError",
    "CheckpointError",
    "DistributedError",
    "MissingDependencyError",
]
