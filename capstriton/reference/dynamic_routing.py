"""Dynamic routing (Sabour et al. 2017, Procedure 1), the pure-PyTorch reference."""

from __future__ import annotations

import torch

from ._common import compute_dtype, float_arithmetic
from .squash import squash

__all__ = ["dynamic_routing"]


@float_arithmetic
def dynamic_routing(
    u_hat: torch.Tensor, iterations: int = 3, grad_through_routing: bool = True
) -> torch.Tensor:
    """Routing by agreement (Procedure 1), literally: logits ``b``, softmax over output capsules.

    Args:
        u_hat: predictions ``[B, N_in, N_out, D]``.
        iterations: routing iterations ``R >= 1``.
        grad_through_routing: if False, ``u_hat`` is detached in every iteration except the last
            one's ``s = sum_i c_ij u_hat_ij`` (the coupling coefficients act as constants).

    Returns:
        ``v`` ``[B, N_out, D]``, dtype of ``u_hat``.
    """
    dtype = u_hat.dtype
    u = u_hat.to(compute_dtype(dtype))
    u_routing = u if grad_through_routing else u.detach()
    # Fresh zero logits per call and per example: not a parameter, not shared across the batch.
    b = u.new_zeros(u.shape[:3])
    v = None
    for r in range(iterations):
        last = r == iterations - 1
        c = torch.softmax(b, dim=2)  # over output capsules j: each input capsule's votes sum to 1
        s = torch.einsum("bij,bijd->bjd", c, u if last else u_routing)
        v = squash(s, dim=-1)
        if not last:
            b = b + torch.einsum("bijd,bjd->bij", u_routing, v)
    return v.to(dtype)
