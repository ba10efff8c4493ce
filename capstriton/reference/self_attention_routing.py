"""Self-attention routing (Efficient-CapsNet, Mazzia, Salvetti & Chiaberge 2021), the pure-PyTorch
reference, in this library's layout ``u_hat`` [B, N_in, N_out, D]; one step, no iterations:

    S_j  = sum_k u_hat_kj                          # [N_out, D] per example
    a_ij = u_hat_ij . S_j / sqrt(D)                # = sum_k u_hat_ij . u_hat_kj / sqrt(D)
    c_ij = softmax_j(a_ij) + bias_ij               # bias [N_in, N_out], added after the softmax
    s_j  = sum_i c_ij u_hat_ij
    v_j  = efficient_squash(s_j)

Finite values, with the exact limits, for every input whose sums S and s and agreements
u_hat . S / max |S| are within the float range (components of u_hat up to about float max /
(N_in D)): zero, 1e-30 and 1e30 in float32 included; finite gradients too, except where the sums
S nearly cancel (the gradient grows as |u_hat|^2 there, as the exact one does). Near the bound
the logits reach 1e76 and their softmax is decided by rounding.
"""

from __future__ import annotations

import math

import torch

from ._common import compute_dtype, float_arithmetic
from .capsule_routing import capsule_predictions
from .efficient_squash import efficient_squash

__all__ = ["self_attention_routing", "self_attention_capsule_routing"]


@float_arithmetic
def self_attention_routing(u_hat: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``u_hat`` [B, N_in, N_out, D] (and ``bias`` [N_in, N_out]) -> ``v`` [B, N_out, D]."""
    dtype = u_hat.dtype
    u = u_hat.to(compute_dtype(dtype))
    total = u.sum(dim=1)  # S [B, N_out, D]
    # The logits u_hat . S reach 1e61 for inputs of 1e30, past float32; their differences, all the
    # softmax needs, are formed as sigma * (u_hat . S / sigma - max) with sigma = max(1, max |S|)
    # per example (a constant: the value and the gradient are those of the plain logits), which
    # overflows at most to -inf, the exact limit.
    with torch.no_grad():
        sigma = total.abs().amax(dim=(1, 2)).clamp_min(1.0)[:, None, None]
    scaled = torch.einsum("bijd,bjd->bij", u, total / sigma) / math.sqrt(u.shape[-1])
    with torch.no_grad():
        top = scaled.amax(dim=2, keepdim=True)
    c = torch.softmax(sigma * (scaled - top), dim=2)  # over the output capsules j
    if bias is not None:
        c = c + bias.to(u.dtype)
    s = torch.einsum("bij,bijd->bjd", c, u)
    return efficient_squash(s, dim=-1).to(dtype)


@float_arithmetic
def self_attention_capsule_routing(
    u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Predictions ``u_hat[b,i,j] = weight[i,j] @ u[b,i]`` from ``u`` [B, N_in, D_in] and ``weight``
    [N_in, N_out, D_out, D_in], then :func:`self_attention_routing`; ``v`` [B, N_out, D_out]."""
    dtype = u.dtype
    cd = compute_dtype(dtype)
    u_hat = capsule_predictions(u.to(cd), weight.to(cd))
    return self_attention_routing(u_hat, None if bias is None else bias.to(cd)).to(dtype)
