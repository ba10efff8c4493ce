"""Efficient-CapsNet (Mazzia, Salvetti & Chiaberge, Scientific Reports 2021), with configurable sizes."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_size
from ..nn import EfficientPrimaryCapsules, SelfAttentionCapsules
from ._base import CapsuleClassifier

__all__ = ["EfficientCapsNet"]


class EfficientCapsNet(CapsuleClassifier):
    """Convolutions -> depthwise primary capsules -> self-attention routing -> optional decoder.

    The defaults are the paper's MNIST model (161,824 trainable parameters without the decoder,
    the paper's count; 1,573,168 with it): convolutions of 32 5x5, 64 3x3, 64 3x3 and 128 3x3
    stride 2 filters, each followed by ReLU then batch normalisation as in the official code
    (28 -> 24 -> 22 -> 20 -> 9);
    primary capsules 16 x 8D from a 9x9 depthwise convolution; 10 class capsules of 16D by
    self-attention routing (weight [16, 10, 16, 8], bias [16, 10]); decoder 160 -> 512 -> 1024
    -> 784 fed the class capsules masked by the label in training, by the longest capsule in
    evaluation, or by ``mask``.

    ``forward(x, target=None, mask=None)`` takes images ``[B, in_channels, H, W]`` and returns
    ``(v, reconstruction)`` as :class:`~capstriton.models.CapsNet` does (``reconstruction`` None
    without a decoder; capsule lengths instead of ``v`` with ``return_lengths=True``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        channels: tuple[int, int, int, int] = (32, 64, 64, 128),
        primary_dim: int = 8,
        num_classes: int = 10,
        out_dim: int = 16,
        decoder_hidden: tuple[int, ...] | None = (512, 1024),
        backend: str = "auto",
        return_lengths: bool = False,
    ):
        super().__init__(in_channels, image_size, return_lengths)
        if not isinstance(channels, (tuple, list)):
            raise TypeError(f"channels must be a tuple of the 4 convolutions' widths, got {type(channels).__name__}")
        if len(channels) != 4:
            raise ValueError(f"channels must give the 4 convolutions' widths, got {channels!r}")
        c1, c2, c3, c4 = (check_size(f"channels[{i}]", c) for i, c in enumerate(channels))
        layers, size, prev = [], image_size, in_channels
        for width, kernel, stride in ((c1, 5, 1), (c2, 3, 1), (c3, 3, 1), (c4, 3, 2)):
            size = (size - kernel) // stride + 1
            if size < 1:
                raise ValueError(f"image_size={image_size} is too small for the convolutions")
            layers += [nn.Conv2d(prev, width, kernel, stride), nn.ReLU(), nn.BatchNorm2d(width)]
            prev = width
        self.features = nn.Sequential(*layers)
        # the depthwise kernel covers the whole feature map: one capsule group per channel block
        self.primary = EfficientPrimaryCapsules(c4, primary_dim, size, backend)
        in_caps = self.primary.output_caps(size, size)
        self.routing = SelfAttentionCapsules(in_caps, primary_dim, num_classes, out_dim, True, backend)
        self._add_decoder(num_classes, out_dim, decoder_hidden)

    def capsules(self, x: torch.Tensor) -> torch.Tensor:
        return self.routing(self.primary(self.features(x)))
