"""Capsule layers and losses as ``torch.nn`` modules. They only call ``capstriton.functional``."""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from ._checks import as_int, check_backend, check_bool, check_class_indices, check_nonnegative, check_size, check_tensor

__all__ = [
    "Squash",
    "PrimaryCapsules",
    "RoutingCapsules",
    "EfficientPrimaryCapsules",
    "SelfAttentionCapsules",
    "CapsuleDecoder",
    "MarginLoss",
    "CapsuleLoss",
    "capsule_lengths",
]


def capsule_lengths(v: torch.Tensor) -> torch.Tensor:
    """Lengths ``||v||`` of capsules ``[..., D] -> [...]`` (gradient 0, not NaN, at zero)."""
    check_tensor("v", v)
    if v.dim() == 0:
        raise ValueError("v must have at least 1 dimension (the capsule vector), got a scalar")
    return torch.linalg.vector_norm(v, dim=-1)


def _check_images(x: torch.Tensor, in_channels: int) -> None:
    """``x`` is a batch of ``in_channels``-channel images for a convolutional capsule layer."""
    check_tensor("x", x, 4, "[B, in_channels, H, W]")
    if x.shape[1] != in_channels:
        raise ValueError(f"x must have in_channels={in_channels} channels [B, {in_channels}, H, W], "
                         f"got shape {tuple(x.shape)}")


class Squash(nn.Module):
    """Module form of :func:`capstriton.squash` over ``dim``."""

    def __init__(self, dim: int = -1, backend: str = "auto"):
        super().__init__()
        self.dim = as_int(dim)
        if self.dim is None:
            raise TypeError(f"dim must be an int, got {type(dim).__name__} {dim!r}")
        self.backend = check_backend(backend)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return F.squash(s, self.dim, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, backend={self.backend!r}"


class PrimaryCapsules(nn.Module):
    """Convolutional capsules: a conv with ``caps_types * caps_dim`` channels, grouped so that
    channel ``c * caps_dim + k`` is component ``k`` of capsule type ``c``, then squashed.

    Input ``[B, in_channels, H, W]``; output ``[B, caps_types * H' * W', caps_dim]`` with the
    capsules ordered type-major (type, row, column). The paper: 256 -> 32 types of 8D, 9x9
    stride 2, giving 32 x 6 x 6 = 1152 capsules on MNIST.
    """

    def __init__(
        self,
        in_channels: int = 256,
        caps_types: int = 32,
        caps_dim: int = 8,
        kernel_size: int = 9,
        stride: int = 2,
        backend: str = "auto",
    ):
        super().__init__()
        self.caps_types = check_size("caps_types", caps_types)
        self.caps_dim = check_size("caps_dim", caps_dim)
        self.backend = check_backend(backend)
        self.conv = nn.Conv2d(
            check_size("in_channels", in_channels),
            caps_types * caps_dim,
            check_size("kernel_size", kernel_size),
            check_size("stride", stride),
        )

    def output_caps(self, height: int, width: int) -> int:
        """Number of capsules produced for an input of ``height x width``."""
        k, st = self.conv.kernel_size, self.conv.stride
        return self.caps_types * ((height - k[0]) // st[0] + 1) * ((width - k[1]) // st[1] + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.conv.in_channels)
        y = self.conv(x)
        b, _, h, w = y.shape
        u = y.view(b, self.caps_types, self.caps_dim, h, w).permute(0, 1, 3, 4, 2)
        return F.squash(u.reshape(b, self.caps_types * h * w, self.caps_dim), backend=self.backend)


class RoutingCapsules(nn.Module):
    """Fully connected capsule layer with dynamic routing (the paper's DigitCaps).

    On the triton backend the layer is fused (predictions computed on chip, never stored);
    ``fused=False`` runs a PyTorch matmul, then the routing kernels (see
    :func:`capstriton.capsule_routing`).

    ``weight`` ``[in_caps, out_caps, out_dim, in_dim]`` is initialised as ``init_std * randn``:
    with the softmax over output capsules, larger weights saturate the squash and the coupling
    coefficients at the start of training.

    Input ``u`` ``[B, in_caps, in_dim]``, output ``v`` ``[B, out_caps, out_dim]`` of u's dtype; a
    weight of another floating dtype is cast to it for the call (as autocast casts a layer's
    weight; a module kept in float32 with float16 or bfloat16 inputs multiplies by their rounding).
    """

    def __init__(
        self,
        in_caps: int = 1152,
        in_dim: int = 8,
        out_caps: int = 10,
        out_dim: int = 16,
        iterations: int = 3,
        grad_through_routing: bool = True,
        backend: str = "auto",
        init_std: float = 0.01,
        fused: bool = True,
    ):
        super().__init__()
        self.in_caps = check_size("in_caps", in_caps)
        self.in_dim = check_size("in_dim", in_dim)
        self.out_caps = check_size("out_caps", out_caps)
        self.out_dim = check_size("out_dim", out_dim)
        self.iterations = check_size("iterations", iterations)
        self.grad_through_routing = check_bool("grad_through_routing", grad_through_routing)
        self.backend = check_backend(backend)
        self.init_std = check_nonnegative("init_std", init_std)
        self.fused = check_bool("fused", fused)
        self.weight = nn.Parameter(torch.empty(in_caps, out_caps, out_dim, in_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        check_tensor("u", u, 3, "[B, in_caps, in_dim]")
        if u.shape[1:] != (self.in_caps, self.in_dim):
            raise ValueError(
                f"u must have shape [B, in_caps={self.in_caps}, in_dim={self.in_dim}], got {tuple(u.shape)}"
            )
        return F.capsule_routing(
            u,
            self.weight.to(u.dtype),
            self.iterations,
            grad_through_routing=self.grad_through_routing,
            backend=self.backend,
            fused=self.fused,
        )

    def extra_repr(self) -> str:
        return (
            f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, "
            f"out_dim={self.out_dim}, iterations={self.iterations}, "
            f"grad_through_routing={self.grad_through_routing}, backend={self.backend!r}, fused={self.fused}"
        )


class EfficientPrimaryCapsules(nn.Module):
    """Efficient-CapsNet's primary capsules: a depthwise convolution (one ``kernel_size`` filter per
    channel), its ``in_channels`` outputs grouped into capsules of ``caps_dim`` and squashed with
    :func:`capstriton.efficient_squash`.

    Input ``[B, in_channels, H, W]``; output ``[B, H' * W' * in_channels / caps_dim, caps_dim]``,
    the capsules in channels-last order (row, column, group): channel ``c`` at a position is
    component ``c % caps_dim`` of capsule ``c // caps_dim`` there (the official Keras reshape of
    ``[H', W', C]``). The paper: 128 channels of a 9 x 9 map and a 9 x 9 kernel give 16
    capsules of 8D.
    """

    def __init__(self, in_channels: int = 128, caps_dim: int = 8, kernel_size: int = 9, backend: str = "auto"):
        super().__init__()
        check_size("in_channels", in_channels)
        self.caps_dim = check_size("caps_dim", caps_dim)
        if in_channels % caps_dim:
            raise ValueError(f"in_channels={in_channels} must be a multiple of caps_dim={caps_dim}")
        self.backend = check_backend(backend)
        self.conv = nn.Conv2d(in_channels, in_channels, check_size("kernel_size", kernel_size), groups=in_channels)

    def output_caps(self, height: int, width: int) -> int:
        """Number of capsules produced for an input of ``height x width``."""
        k = self.conv.kernel_size
        return (height - k[0] + 1) * (width - k[1] + 1) * self.conv.out_channels // self.caps_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.conv.in_channels)
        y = self.conv(x).permute(0, 2, 3, 1)  # channels last, as the official reshape reads them
        b, h, w, c = y.shape  # (the capsules counted, not -1: an empty batch cannot infer it)
        u = y.reshape(b, h * w * c // self.caps_dim, self.caps_dim)
        return F.efficient_squash(u, backend=self.backend)


class SelfAttentionCapsules(nn.Module):
    """Fully connected capsule layer with self-attention routing (Efficient-CapsNet's FCCaps).

    ``weight`` ``[in_caps, out_caps, out_dim, in_dim]`` is initialised He-normal as in the
    official code (standard deviation ``sqrt(2 / (out_caps * in_caps * in_dim))``, its Keras
    fan-in), ``bias`` ``[in_caps, out_caps]`` with zeros (``bias=False``: none). On the triton
    backend the predictions are computed on chip (see
    :func:`capstriton.self_attention_capsule_routing`).

    Input ``u`` ``[B, in_caps, in_dim]``, output ``v`` ``[B, out_caps, out_dim]``.
    """

    def __init__(
        self,
        in_caps: int = 16,
        in_dim: int = 8,
        out_caps: int = 10,
        out_dim: int = 16,
        bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        self.in_caps = check_size("in_caps", in_caps)
        self.in_dim = check_size("in_dim", in_dim)
        self.out_caps = check_size("out_caps", out_caps)
        self.out_dim = check_size("out_dim", out_dim)
        self.backend = check_backend(backend)
        self.weight = nn.Parameter(torch.empty(in_caps, out_caps, out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(in_caps, out_caps)) if check_bool("bias", bias) else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=(2.0 / (self.out_caps * self.in_caps * self.in_dim)) ** 0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        check_tensor("u", u, 3, "[B, in_caps, in_dim]")
        if u.shape[1:] != (self.in_caps, self.in_dim):
            raise ValueError(
                f"u must have shape [B, in_caps={self.in_caps}, in_dim={self.in_dim}], got {tuple(u.shape)}"
            )
        bias = None if self.bias is None else self.bias.to(u.dtype)
        return F.self_attention_capsule_routing(u, self.weight.to(u.dtype), bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, out_dim={self.out_dim}, "
            f"bias={self.bias is not None}, backend={self.backend!r}"
        )


class CapsuleDecoder(nn.Module):
    """Reconstruction network fed with the capsule outputs masked to one capsule.

    The mask is, in order of precedence: ``mask`` if given (``[B, num_caps]``, float or bool);
    the one-hot ``target`` while training; otherwise the longest capsule (evaluation).
    Input ``v`` ``[B, num_caps, caps_dim]``; output ``[B, out_features]`` in ``(0, 1)``.
    """

    def __init__(
        self,
        num_caps: int = 10,
        caps_dim: int = 16,
        hidden: tuple[int, ...] = (512, 1024),
        out_features: int = 784,
    ):
        super().__init__()
        self.num_caps = check_size("num_caps", num_caps)
        self.caps_dim = check_size("caps_dim", caps_dim)
        if not isinstance(hidden, (tuple, list)):
            raise TypeError(f"hidden must be a tuple of layer sizes, got {type(hidden).__name__}")
        hidden = tuple(check_size(f"hidden[{i}]", h) for i, h in enumerate(hidden))
        sizes = [num_caps * caps_dim, *hidden, check_size("out_features", out_features)]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            layers.append(nn.ReLU() if i < len(sizes) - 2 else nn.Sigmoid())
        self.net = nn.Sequential(*layers)

    def make_mask(self, v: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The ``[B, num_caps]`` one-hot mask the decoder uses when none is given."""
        if self.training and target is not None:
            index = target.long()
        else:
            index = capsule_lengths(v.detach()).argmax(dim=-1)
        # by comparison: F.one_hot synchronises with the host on CUDA to find its size
        return (index.unsqueeze(-1) == torch.arange(self.num_caps, device=v.device)).to(v.dtype)

    def forward(
        self,
        v: torch.Tensor,
        target: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_tensor("v", v, 3, "[B, num_caps, caps_dim]")
        if v.shape[1:] != (self.num_caps, self.caps_dim):
            raise ValueError(
                f"v must have shape [B, num_caps={self.num_caps}, caps_dim={self.caps_dim}], got {tuple(v.shape)}"
            )
        for name, t in (("target", target), ("mask", mask)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
            if t is not None and t.device != v.device:
                raise ValueError(f"v and {name} must be on the same device, got {v.device} and {t.device}")
        if mask is None:
            if target is not None:
                if target.is_floating_point() or target.dtype == torch.bool or target.shape != v.shape[:1]:
                    raise ValueError(
                        f"target must hold class indices of shape [B] = {tuple(v.shape[:1])}, "
                        f"got {tuple(target.shape)} {target.dtype}"
                    )
                if self.training:  # the mask is then made from it
                    check_class_indices("target", target, self.num_caps)
            mask = self.make_mask(v, target)
        elif mask.shape != v.shape[:2]:
            raise ValueError(f"mask must have shape [B, num_caps] = {tuple(v.shape[:2])}, got {tuple(mask.shape)}")
        masked = v * mask.to(v.dtype).unsqueeze(-1)
        return self.net(masked.flatten(1).to(self.net[0].weight.dtype))


class MarginLoss(nn.Module):
    """:func:`capstriton.margin_loss` as a module."""

    def __init__(self, m_pos: float = 0.9, m_neg: float = 0.1, lam: float = 0.5):
        super().__init__()
        self.m_pos, self.m_neg, self.lam = F.check_margins(m_pos, m_neg, lam)

    def forward(self, lengths: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.margin_loss(lengths, target, self.m_pos, self.m_neg, self.lam)

    def extra_repr(self) -> str:
        return f"m_pos={self.m_pos}, m_neg={self.m_neg}, lam={self.lam}"


class CapsuleLoss(nn.Module):
    """Margin loss plus ``reconstruction_weight`` (0.0005 in the paper) times the per-image sum
    of squared pixel errors, both mean over the batch.

    ``forward(lengths, target, reconstruction=None, images=None)``: ``reconstruction`` and
    ``images`` come together (one without the other is an error); without them it is the margin
    loss alone. ``reconstruction_weight`` and ``lam`` must be >= 0.
    """

    def __init__(
        self,
        reconstruction_weight: float = 0.0005,
        m_pos: float = 0.9,
        m_neg: float = 0.1,
        lam: float = 0.5,
    ):
        super().__init__()
        self.reconstruction_weight = check_nonnegative("reconstruction_weight", reconstruction_weight)
        self.margin = MarginLoss(m_pos, m_neg, lam)

    def forward(
        self,
        lengths: torch.Tensor,
        target: torch.Tensor,
        reconstruction: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        loss = self.margin(lengths, target)
        if (reconstruction is None) != (images is None):
            raise ValueError(
                "reconstruction and images must be given together (the reconstruction term needs both), "
                f"got reconstruction={'None' if reconstruction is None else 'a tensor'} and "
                f"images={'None' if images is None else 'a tensor'}"
            )
        if reconstruction is not None:
            recon = F.reconstruction_loss(reconstruction, images)
            if reconstruction.shape[:1] != lengths.shape[:1]:
                raise ValueError(
                    f"reconstruction {tuple(reconstruction.shape)} and lengths {tuple(lengths.shape)} must hold "
                    "the same number of examples (each term is a mean over the batch)"
                )
            loss = loss + self.reconstruction_weight * recon
        return loss

    def extra_repr(self) -> str:
        return f"reconstruction_weight={self.reconstruction_weight}"
