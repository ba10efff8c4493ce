"""The paper's MNIST CapsNet (Sabour, Frosst & Hinton 2017), with configurable sizes."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_size
from ..nn import PrimaryCapsules, RoutingCapsules
from ._base import CapsuleClassifier

__all__ = ["CapsNet"]


class CapsNet(CapsuleClassifier):
    """Conv1 -> PrimaryCaps -> DigitCaps (dynamic routing) -> decoder.

    The defaults are the paper's MNIST model (8,215,568 parameters; 6,804,224 without the
    decoder): Conv1 256 channels 9x9 + ReLU; PrimaryCaps 32 types of 8D, 9x9 stride 2
    (1152 capsules); DigitCaps 10 capsules of 16D, 3 routing iterations; decoder
    160 -> 512 -> 1024 -> 784.

    ``forward(x, target=None, mask=None)`` takes images ``[B, in_channels, H, W]`` and returns
    ``(v, reconstruction)``: the class capsules ``v`` ``[B, num_classes, out_dim]`` (or their
    lengths ``[B, num_classes]`` when ``return_lengths=True``) and the reconstruction
    ``[B, in_channels * H * W]`` (``None`` when built with ``decoder_hidden=None``). The decoder
    is masked by ``target`` in training, by the longest capsule in evaluation, or by ``mask``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        conv_channels: int = 256,
        conv_kernel: int = 9,
        primary_types: int = 32,
        primary_dim: int = 8,
        primary_kernel: int = 9,
        primary_stride: int = 2,
        num_classes: int = 10,
        out_dim: int = 16,
        iterations: int = 3,
        grad_through_routing: bool = True,
        decoder_hidden: tuple[int, ...] | None = (512, 1024),
        backend: str = "auto",
        init_std: float = 0.01,
        return_lengths: bool = False,
        fused: bool = True,
    ):
        super().__init__(in_channels, image_size, return_lengths)
        self.conv = nn.Conv2d(
            in_channels, check_size("conv_channels", conv_channels), check_size("conv_kernel", conv_kernel)
        )
        conv_size = image_size - conv_kernel + 1
        if conv_size < check_size("primary_kernel", primary_kernel):
            raise ValueError(
                f"image_size={image_size} is too small for conv_kernel={conv_kernel} "
                f"and primary_kernel={primary_kernel}"
            )
        self.primary = PrimaryCapsules(
            conv_channels, primary_types, primary_dim, primary_kernel, primary_stride, backend
        )
        in_caps = self.primary.output_caps(conv_size, conv_size)
        self.digit = RoutingCapsules(
            in_caps, primary_dim, num_classes, out_dim, iterations, grad_through_routing, backend, init_std, fused
        )
        self._add_decoder(num_classes, out_dim, decoder_hidden)

    def capsules(self, x: torch.Tensor) -> torch.Tensor:
        return self.digit(self.primary(torch.relu(self.conv(x))))
