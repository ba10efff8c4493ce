"""The fully connected capsule layer: predictions ``u_hat[b,i,j] = weight[i,j] @ u[b,i]``, then
dynamic routing; the pure-PyTorch reference of ``ct.capsule_routing`` (and of the fused layer)."""

from __future__ import annotations

import torch

from ._common import compute_dtype, float_arithmetic
from .dynamic_routing import dynamic_routing

__all__ = ["capsule_predictions", "capsule_routing"]


@float_arithmetic
def capsule_predictions(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``u_hat[b, i, j, :] = weight[i, j] @ u[b, i, :]``.

    Args:
        u: input capsules ``[B, N_in, D_in]``.
        weight: ``[N_in, N_out, D_out, D_in]``.

    Returns:
        ``u_hat`` ``[B, N_in, N_out, D_out]``. One batched matmul over input capsules: the
        weight is never copied per example.
    """
    n_in, n_out, d_out, d_in = weight.shape
    # [N_in, B, D_in] @ [N_in, D_in, N_out*D_out] -> [N_in, B, N_out*D_out]
    w = weight.permute(0, 3, 1, 2).reshape(n_in, d_in, n_out * d_out)
    u_hat = torch.bmm(u.transpose(0, 1), w)
    return u_hat.view(n_in, u.shape[0], n_out, d_out).transpose(0, 1)


@float_arithmetic
def capsule_routing(
    u: torch.Tensor,
    weight: torch.Tensor,
    iterations: int = 3,
    grad_through_routing: bool = True,
) -> torch.Tensor:
    """Predictions from ``u`` ``[B, N_in, D_in]`` and ``weight`` ``[N_in, N_out, D_out, D_in]``,
    then :func:`dynamic_routing`; returns ``v`` ``[B, N_out, D_out]``."""
    dtype = u.dtype
    cd = compute_dtype(dtype)
    u_hat = capsule_predictions(u.to(cd), weight.to(cd))
    return dynamic_routing(u_hat, iterations, grad_through_routing).to(dtype)
