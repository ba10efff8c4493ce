"""The fully connected capsule layer (``ct.capsule_routing``) on the triton backend: predictions
``u_hat[b,i,j] = weight[i,j] @ u[b,i]``, then dynamic routing.

Today the predictions are one PyTorch batched matmul and the routing kernels read them back from
memory: u_hat is written once and read once per iteration.
"""

from __future__ import annotations

import torch

from ..reference.capsule_routing import capsule_predictions
from .dynamic_routing import dynamic_routing

__all__ = ["capsule_routing"]


def capsule_routing(
    u: torch.Tensor, weight: torch.Tensor, iterations: int, grad_through_routing: bool
) -> torch.Tensor:
    """``u`` [B, N_in, D_in], ``weight`` [N_in, N_out, D_out, D_in] -> ``v`` [B, N_out, D_out]
    (validated by capstriton.functional)."""
    return dynamic_routing(capsule_predictions(u, weight), iterations, grad_through_routing)
