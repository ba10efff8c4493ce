"""A port-style CapsNet: the paper's MNIST model written the way most public PyTorch ports write it,
as the baseline of ``bench/model_bench.py`` (not part of the library).

What makes it "port-style" (and what capstriton does differently):

- the DigitCaps weight is one parameter ``W`` [1, N_in, N_out, D_out, D_in] broadcast over the batch:
  ``u_hat = (W @ u[:, :, None, :, None]).squeeze(-1)`` materialises per-example copies of the
  weight's products in autograd (capstriton: one batched matmul, or the fused kernels);
- a logits tensor ``b`` [B, N_in, N_out] of zeros on every call, ``softmax`` over the output
  capsules, u_hat detached in the intermediate iterations (gradient only through the last
  weighted sum: ``CapsNet(grad_through_routing=False)``);
- squash with a small epsilon, ``s * |s|^2 / ((1 + |s|^2) * sqrt(|s|^2 + eps))``;
- the same convolutions (capsule channel ``c * 8 + k`` is component k of type c) and decoder.

Same parameters (8,215,568) and, with the same weights, the same function as
``ct.models.CapsNet(grad_through_routing=False)`` up to the epsilon (``tests/test_model_bench.py``).
"""

from __future__ import annotations

import torch
from torch import nn


def squash(s: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    sq = (s * s).sum(dim=-1, keepdim=True)
    return s * sq / ((1.0 + sq) * torch.sqrt(sq + eps))


class PortCapsNet(nn.Module):
    """Conv1 256 9x9 -> PrimaryCaps 32 x 8D (9x9 stride 2) -> DigitCaps 10 x 16D, 3 routing
    iterations -> decoder 160 -> 512 -> 1024 -> 784. ``forward(x, target=None)`` returns the class
    capsules [B, 10, 16] and the reconstruction [B, 784] (masked by ``target`` when given, else by
    the longest capsule)."""

    def __init__(self, iterations: int = 3, eps: float = 1e-8):
        super().__init__()
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.iterations, self.eps = iterations, eps
        self.conv1 = nn.Conv2d(1, 256, 9)
        self.primary = nn.Conv2d(256, 32 * 8, 9, stride=2)
        self.W = nn.Parameter(0.01 * torch.randn(1, 1152, 10, 16, 8))
        self.decoder = nn.Sequential(
            nn.Linear(160, 512), nn.ReLU(), nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 784), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None):
        y = self.primary(torch.relu(self.conv1(x)))
        b_, _, h, w = y.shape
        u = y.view(b_, 32, 8, h, w).permute(0, 1, 3, 4, 2).reshape(b_, 32 * h * w, 8)
        u = squash(u, self.eps)
        u_hat = (self.W @ u[:, :, None, :, None]).squeeze(-1)  # [B, 1152, 10, 16]
        u_hat_detached = u_hat.detach()
        logits = torch.zeros(u_hat.shape[:3], device=x.device, dtype=u_hat.dtype)
        for r in range(self.iterations):
            c = torch.softmax(logits, dim=2)
            last = r == self.iterations - 1
            s = (c[..., None] * (u_hat if last else u_hat_detached)).sum(dim=1)
            v = squash(s, self.eps)
            if not last:
                logits = logits + (u_hat_detached * v[:, None]).sum(dim=-1)
        index = target if target is not None else v.norm(dim=-1).argmax(dim=-1)
        mask = nn.functional.one_hot(index, 10).to(v.dtype)
        reconstruction = self.decoder((v * mask[..., None]).flatten(1))
        return v, reconstruction

    def load_from_capstriton(self, model: nn.Module) -> PortCapsNet:
        """Copy the weights of a ``ct.models.CapsNet()`` (the paper's sizes) into this port."""
        with torch.no_grad():
            self.conv1.load_state_dict(model.conv.state_dict())
            self.primary.load_state_dict(model.primary.conv.state_dict())
            self.W.copy_(model.digit.weight[None])
            self.decoder.load_state_dict(model.decoder.net.state_dict())
        return self


def port_loss(v: torch.Tensor, target: torch.Tensor, reconstruction: torch.Tensor, images: torch.Tensor):
    """The ports' loss: margin loss (m+ 0.9, m- 0.1, lambda 0.5) plus 0.0005 x the per-image sum
    of squared reconstruction errors, both mean over the batch."""
    lengths = v.norm(dim=-1)
    t = nn.functional.one_hot(target, lengths.shape[1]).to(lengths.dtype)
    margin = t * torch.relu(0.9 - lengths) ** 2 + 0.5 * (1 - t) * torch.relu(lengths - 0.1) ** 2
    recon = ((reconstruction - images.flatten(1)) ** 2).sum(dim=1)
    return (margin.sum(dim=1) + 0.0005 * recon).mean()
