"""The paper's losses: margin loss (Eq. 4) and the reconstruction loss, pure PyTorch."""

from __future__ import annotations

import torch

from ._common import compute_dtype

__all__ = ["margin_loss", "reconstruction_loss"]


def margin_loss(
    lengths: torch.Tensor,
    target: torch.Tensor,
    m_pos: float = 0.9,
    m_neg: float = 0.1,
    lam: float = 0.5,
) -> torch.Tensor:
    """Margin loss (Eq. 4), summed over classes, mean over the batch.

    Args:
        lengths: capsule lengths ``[B, K]``.
        target: class indices ``[B]`` (integer) or per-class targets ``T`` ``[B, K]`` (float).
    """
    x = lengths.to(compute_dtype(lengths.dtype))
    if target.is_floating_point():
        t = target.to(x.dtype)
    else:
        # one-hot by comparison: F.one_hot synchronises with the host on CUDA to find its size
        t = (target.unsqueeze(-1) == torch.arange(x.shape[-1], device=target.device)).to(x.dtype)
    present = t * torch.relu(m_pos - x).square()
    absent = lam * (1.0 - t) * torch.relu(x - m_neg).square()
    # the mean over the batch, 0 (not NaN) for an empty one
    return (present + absent).sum() / max(x.shape[0], 1)


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Sum of squared pixel errors per image, mean over the batch (unscaled)."""
    cd = compute_dtype(torch.promote_types(reconstruction.dtype, images.dtype))
    diff = reconstruction.to(cd) - images.reshape(reconstruction.shape).to(cd)
    return diff.square().sum() / max(diff.shape[0], 1)  # mean over the batch; 0 when empty
