"""What the image classifiers share: the input check, the decoder and the outputs."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_bool, check_size, check_tensor
from ..nn import CapsuleDecoder, capsule_lengths

__all__ = ["CapsuleClassifier"]


class CapsuleClassifier(nn.Module):
    """Images ``[B, in_channels, image_size, image_size]`` -> class capsules (the subclass's
    :meth:`capsules`) -> an optional reconstruction decoder.

    ``forward(x, target=None, mask=None)`` returns ``(v, reconstruction)``: the class capsules
    ``v`` ``[B, num_classes, out_dim]`` (or their lengths ``[B, num_classes]`` when
    ``return_lengths``) and the reconstruction ``[B, in_channels * H * W]`` (``None`` without a
    decoder), the decoder masked by ``target`` in training, by the longest capsule in
    evaluation, or by ``mask``.
    """

    def __init__(self, in_channels: int, image_size: int, return_lengths: bool):
        super().__init__()
        self.in_channels = check_size("in_channels", in_channels)
        self.image_size = check_size("image_size", image_size)
        self.return_lengths = check_bool("return_lengths", return_lengths)
        self.decoder: CapsuleDecoder | None = None

    def _add_decoder(self, num_classes: int, out_dim: int, decoder_hidden: tuple[int, ...] | None) -> None:
        """The decoder (registered last: the parameter order, which checkpoints' optimizer
        states follow, ends with it)."""
        if decoder_hidden is not None:
            if not isinstance(decoder_hidden, (tuple, list)):
                raise TypeError(
                    f"decoder_hidden must be a tuple of layer sizes or None, got {type(decoder_hidden).__name__}"
                )
            pixels = self.in_channels * self.image_size * self.image_size
            self.decoder = CapsuleDecoder(num_classes, out_dim, tuple(decoder_hidden), pixels)

    def capsules(self, x: torch.Tensor) -> torch.Tensor:
        """The class capsules ``[B, num_classes, out_dim]`` of checked images."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        target: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        check_tensor("x", x, 4, "[B, in_channels, H, W]")
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.shape[1:] != expected:
            raise ValueError(
                f"x must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}], got {tuple(x.shape)}"
            )
        v = self.capsules(x)
        reconstruction = None if self.decoder is None else self.decoder(v, target, mask)
        return (capsule_lengths(v) if self.return_lengths else v), reconstruction
