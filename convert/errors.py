"""The project's exception types. They live here because convert/ is imported by fastft_jax,
never the reverse; fastft_jax re-exports them."""

from __future__ import annotations


class FastFTError(Exception):
    """Base class: every error the project raises on bad input."""


class ConfigError(FastFTError, ValueError):
    """A run config, YAML key, argument or dtype is wrong."""


class CheckpointError(FastFTError, ValueError):
    """A checkpoint directory, file or tensor is missing or does not match."""


class UnsupportedModelError(FastFTError, NotImplementedError):
    """The checkpoint asks for math this project does not implement."""


class DataError(FastFTError, ValueError):
    """A dataset is missing, empty, or lacks a field."""
