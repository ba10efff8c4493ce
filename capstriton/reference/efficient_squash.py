"""Efficient-CapsNet's squash (Mazzia et al. 2021), the pure-PyTorch reference:

    efficient_squash(s) = (1 - exp(-||s||)) * s / ||s||

the official ``(1 - 1/(e^n + eps)) s / (n + eps)`` without its epsilon, with the exact limits: 0 at
``s = 0`` with a Jacobian equal to the identity (``(1 - e^-n) / n -> 1``), and the unit vector for
huge ``s``. Computed from the scaled vector of :func:`~capstriton.reference.squash` (no overflow of
the norm at 1e30, no underflow at 1e-30): ``v = s * f(n)`` with the Taylor polynomial of
``f(n) = (1 - e^-n) / n`` below ``n = 1/4`` (the direct form cancels there), ``v = unit * (1 - e^-n)``
above.
"""

from __future__ import annotations

import math

import torch

from ._common import float_arithmetic, scaled_norm

__all__ = ["efficient_squash", "SERIES_BELOW", "F_COEFFS"]

#: Below this norm f(n) = (1 - e^-n) / n is its Taylor polynomial; above it the direct form,
#: whose cancellation is then below 3e-7 relative in float32 (5e-16 in float64).
SERIES_BELOW = 0.25
#: Taylor coefficients of f(n) = sum_k (-n)^k / (k + 1)!, k = 0..12: the first term left out,
#: n^13 / 14! < 1e-19 at n = 1/4, is below float64's rounding (the float32 kernels stop at k = 6).
F_COEFFS = tuple((-1) ** k / math.factorial(k + 1) for k in range(13))


def _f_series(n: torch.Tensor) -> torch.Tensor:
    acc = torch.full_like(n, F_COEFFS[-1])
    for c in reversed(F_COEFFS[:-1]):
        acc = acc * n + c
    return acc


@float_arithmetic
def efficient_squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``(1 - exp(-||s||)) s / ||s||`` over ``dim``; finite and exact for every finite input."""
    dtype = s.dtype
    x, t, m, scale, nonzero = scaled_norm(s, dim)  # ||t|| in [1, sqrt(D)] for s != 0
    n = torch.where(nonzero, scale * m, torch.zeros_like(m))  # ||s||, inf past the float range
    # Each branch sees only inputs safe for it, so no inf or NaN reaches the other's gradient.
    small = n < SERIES_BELOW
    v_small = x * _f_series(torch.where(small, n, torch.zeros_like(n)))  # s f(n): s itself at 0
    n_large = torch.where(small, torch.full_like(n, SERIES_BELOW), n)
    v_large = (t / m) * (1 - torch.exp(-n_large))  # the unit vector times 1 - e^-n, 1 at inf
    return torch.where(small, v_small, v_large).to(dtype)
