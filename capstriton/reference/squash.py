"""Squash (Sabour et al. 2017, Eq. 1), the pure-PyTorch reference."""

from __future__ import annotations

import torch

from ._common import float_arithmetic, scaled_norm

__all__ = ["squash"]


@float_arithmetic
def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Squash (Eq. 1 of Sabour et al. 2017) over ``dim``: ``v = s * ||s|| / (1 + ||s||^2)``.

    Finite for every finite input and differentiable everywhere, with an exactly zero Jacobian
    at ``s = 0``:

    - ``s`` is divided by its largest absolute component (a constant for autograd: the function
      does not depend on that choice, so the gradient stays exact). The scaled vector ``t`` has
      ``1 <= ||t|| <= sqrt(D)``, so the norm of 1e30 vectors neither overflows nor does a 1e-30
      one underflow, and the ``sqrt`` never sees 0 (where its derivative is infinite).
    - The length ``L = n^2 / (1 + n^2)`` with ``n = ||s||`` is evaluated as ``n^2 / (1 + n^2)``
      below 1 and as ``1 / (1 + (1/n)^2)`` above, each branch fed only values that are safe for
      it, so no Inf/NaN appears in the forward or in the gradient of the branch not taken.
    - ``v = (t / ||t||) * L`` for ``n >= 1``; below, ``v = s * n / (1 + n^2)`` with ``n`` taken as
      ``s . (t / ||t||)``, the same function written so that autograd's intermediates keep the
      gradient's own scale: the gradient ``n I + s s^T / n`` of a 1e-25 vector is about 1e-25,
      while the product form's ``L`` (1e-50) and the chain through ``n = scale ||t||`` underflow
      float32 and returned 0. Below about 1e-19 in float32 (1.5e-154 in float64) the second
      derivatives lose the term through ``t / ||t||`` (see the comment in the code).
    """
    dtype = s.dtype
    # ||t||^2 >= 1 whenever s != 0 (the largest component is exactly +-1); the clamp in m only
    # keeps the sqrt away from 0 for zero vectors, whose length is forced to 0 below.
    x, t, m, scale, nonzero = scaled_norm(s, dim)
    unit = t / m
    n = scale * m  # ||s||; may overflow to inf only in the large branch, which does not use it
    large = n >= 1
    inv_scale = torch.where(large, scale, torch.ones_like(scale)).reciprocal()
    r = torch.where(large, inv_scale / m, torch.zeros_like(m))  # 1/||s|| when large
    v_large = unit / (1.0 + r * r)
    # ||s|| as s . unit: its gradient is unit itself, of order 1, where scale * m passes it through
    # a product with the scale. The path through unit adds s . d(unit), zero but for rounding, of
    # terms of order scale^2: below TINY they are subnormal, their rounding is not small, and that
    # path is cut (first derivatives stay exact; second ones lose a term there)
    x_small = torch.where(large, torch.zeros_like(x), x)
    tiny = scale < torch.finfo(x.dtype).tiny ** 0.5
    unit_n = torch.where(tiny, unit.detach(), unit)
    n_small = torch.where(large | ~nonzero, torch.zeros_like(n), (x_small * unit_n).sum(dim=dim, keepdim=True))
    v_small = x_small * (n_small / (1.0 + n_small * n_small))
    return torch.where(large, v_large, v_small).to(dtype)
