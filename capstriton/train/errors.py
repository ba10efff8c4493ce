"""The errors ``capstriton-train`` reports as one line and an exit status (see :func:`main`)."""

from __future__ import annotations

__all__ = ["SetupError", "CheckpointError", "TrainingError"]


class SetupError(ValueError):
    """An option that contradicts the data, the checkpoint or the process group."""


class CheckpointError(SetupError):
    """A ``--resume`` checkpoint that is damaged, truncated or not written by capstriton-train."""


class TrainingError(RuntimeError):
    """Training cannot go on: a loss or a parameter became non-finite."""
