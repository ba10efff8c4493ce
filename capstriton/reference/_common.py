"""What every reference module shares: the dtype the arithmetic runs in, and autocast switched off."""

from __future__ import annotations

import functools

import torch

__all__ = ["compute_dtype", "float_arithmetic", "scaled_norm"]


def float_arithmetic(fn):
    """Run ``fn`` with autocast off on its first argument's device: the arithmetic is float32 (or
    float64) as documented, never downcast by an enclosing ``torch.autocast`` (which would run
    the einsums and matmuls in bfloat16). Callers apply autocast's casts to the inputs first."""

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args, **kwargs):
        if x.device.type == "meta":  # no autocast there (shape inference on meta tensors)
            return fn(x, *args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapper


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: float64 stays, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scaled_norm(s: torch.Tensor, dim: int):
    """The squashes' exact-range norm: ``s`` in the compute dtype (``x``), divided by its largest
    absolute component along ``dim`` (``scale``, 1 for zero vectors; a constant for autograd: the
    squashes do not depend on it, so gradients stay exact), the scaled vector ``t`` (largest
    component +-1, so 1 <= ||t|| <= sqrt(D) for s != 0: no overflow at 1e30, no underflow at
    1e-30) and ``m = ||t||`` kept away from 0 for zero vectors (``nonzero`` marks the others; a
    vector with a NaN component counts as nonzero, so NaN reaches every component of the result,
    as in the kernels)."""
    x = s.to(compute_dtype(s.dtype))
    with torch.no_grad():
        amax = x.abs().amax(dim=dim, keepdim=True)
    nonzero = amax != 0  # True for NaN
    scale = torch.where(nonzero, amax, torch.ones_like(amax))
    t = x / scale
    m = (t * t).sum(dim=dim, keepdim=True).clamp_min(0.5).sqrt()
    return x, t, m, scale, nonzero
