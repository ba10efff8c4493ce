"""What every reference module shares: the dtype the arithmetic runs in, and autocast switched off."""

from __future__ import annotations

import functools

import torch

__all__ = ["compute_dtype", "float_arithmetic"]


def float_arithmetic(fn):
    """Run ``fn`` with autocast off on its first argument's device: the arithmetic is float32 (or
    float64) as documented, never downcast by an enclosing ``torch.autocast`` (which would run
    the einsums and matmuls in bfloat16). Callers apply autocast's casts to the inputs first."""

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapper


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: float64 stays, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
