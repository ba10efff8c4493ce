"""The public functional API: validation, then dispatch to the reference or the Triton ops.

Dispatch happens here, in Python, before any op is called (DESIGN.md section 3), so
``torch.compile`` sees either plain PyTorch or a registered ``triton_op``.
"""

from __future__ import annotations

import torch

from . import reference
from ._checks import (
    as_int,
    check_bool,
    check_class_indices,
    check_nonnegative,
    check_positive_sizes,
    check_real,
    check_same,
    check_size,
    check_tensor,
    resolve_backend,
)

__all__ = [
    "squash",
    "dynamic_routing",
    "capsule_routing",
    "efficient_squash",
    "self_attention_routing",
    "self_attention_capsule_routing",
    "margin_loss",
    "reconstruction_loss",
]

U_HAT_LAYOUT = "[B, N_in, N_out, D]"
U_LAYOUT = "[B, N_in, D_in]"
WEIGHT_LAYOUT = "[N_in, N_out, D_out, D_in]"


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The inputs of a matmul-like op under autocast: float16/bfloat16/float32 tensors cast to the
    autocast dtype of their device, as ``torch.matmul`` does (float64 is left alone, also as
    autocast does; None, an absent bias, passes through). The capsule layers follow that rule, so
    both backends return the autocast dtype; squash and routing on predictions are not
    matmul-like and keep their input dtype."""
    device_type = tensors[0].device.type
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):  # (no autocast on meta)
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t if t is None or t.dtype == torch.float64 else t.to(dtype) for t in tensors)


def _implementations(backend: str) -> dict:
    """The backend table: each algorithm's function on ``backend``, all with the reference's
    signatures. The triton modules are imported on first use (they import triton, which the
    torch backend never needs); constant keys, so dynamo traces the lookup."""
    if backend == "torch":
        return {
            "squash": reference.squash,
            "dynamic_routing": reference.dynamic_routing,
            "capsule_routing": reference.capsule_routing,
            "capsule_routing_unfused": reference.capsule_routing,
            "efficient_squash": reference.efficient_squash,
            "self_attention_routing": reference.self_attention_routing,
            "self_attention_capsule_routing": reference.self_attention_capsule_routing,
        }
    from . import ops

    return {
        "squash": ops.squash.squash,
        "dynamic_routing": ops.dynamic_routing.dynamic_routing,
        "capsule_routing": ops.fused_layer.capsule_routing,
        "capsule_routing_unfused": ops.fused_layer.capsule_routing_unfused,
        "efficient_squash": ops.squash.efficient_squash,
        "self_attention_routing": ops.self_attention_routing.self_attention_routing,
        "self_attention_capsule_routing": ops.self_attention_routing.self_attention_capsule_routing,
    }


def squash(s: torch.Tensor, dim: int = -1, *, backend: str = "auto") -> torch.Tensor:
    """Squash capsule vectors along ``dim``: ``v = s * ||s|| / (1 + ||s||^2)``.

    Same shape and dtype as ``s``; ``||v|| < 1`` up to rounding (in float32 from ``||s||`` of
    about 4e3 the length rounds to 1, and the norm of the rounded components may exceed 1 by an
    ulp); finite (and with a zero Jacobian) at ``s = 0``.

    Example:
        >>> v = squash(torch.randn(32, 1152, 8))  # [B, N, D] -> [B, N, D]
    """
    check_tensor("s", s)
    dim = _capsule_dim(s, dim)
    return _implementations(resolve_backend(backend, s))["squash"](s, dim)


def _capsule_dim(s: torch.Tensor, dim) -> int:
    """``dim`` as an int, after checking that ``s`` holds capsule vectors along it (a valid,
    non-empty dimension; Python's or NumPy's integers)."""
    if s.dim() == 0:
        raise ValueError("s must have at least 1 dimension (the capsule vector), got a scalar")
    index = as_int(dim)
    if index is None or not -s.dim() <= index < s.dim():
        raise ValueError(
            f"dim must be an int in [{-s.dim()}, {s.dim() - 1}] for s of shape {tuple(s.shape)}, got {dim!r}"
            + ("" if index is not None else f" (a {type(dim).__name__})")
        )
    if s.shape[index] == 0:
        raise ValueError(f"s must have a non-empty capsule dimension {index}, got shape {tuple(s.shape)}")
    return index


def efficient_squash(s: torch.Tensor, dim: int = -1, *, backend: str = "auto") -> torch.Tensor:
    """Efficient-CapsNet's squash along ``dim``: ``v = (1 - exp(-||s||)) s / ||s||``.

    Same shape and dtype as ``s``; ``||v|| < 1`` up to rounding (in float32 from ``||s||`` of
    about 17 the length rounds to 1, and the norm of the rounded components may exceed 1 by an
    ulp); exact limits without an epsilon: 0 with the
    identity Jacobian at ``s = 0``, the unit vector for huge ``s``.

    Example:
        >>> v = efficient_squash(torch.randn(32, 16, 8))  # [B, N, D] -> [B, N, D]
    """
    check_tensor("s", s)
    dim = _capsule_dim(s, dim)
    return _implementations(resolve_backend(backend, s))["efficient_squash"](s, dim)


def _check_bias(bias, like: torch.Tensor, n_in: int, n_out: int, given: tuple | None = None) -> None:
    if bias is None:
        return
    check_tensor("bias", bias, 2, "[N_in, N_out]")
    check_same("bias", bias, "u_hat" if like.dim() == 4 else "u", like, given)
    if tuple(bias.shape) != (n_in, n_out):
        raise ValueError(f"bias must have shape [N_in, N_out] = [{n_in}, {n_out}], got {tuple(bias.shape)}")


def self_attention_routing(
    u_hat: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """Self-attention routing (Efficient-CapsNet, Mazzia et al. 2021): one step, no iterations.

    ``S_j = sum_k u_hat_kj``; ``c_ij = softmax_j(u_hat_ij . S_j / sqrt(D)) + bias_ij``;
    ``v_j = efficient_squash(sum_i c_ij u_hat_ij)``.

    Args:
        u_hat: predictions ``[B, N_in, N_out, D]``.
        bias: ``[N_in, N_out]``, added to the coupling coefficients after the softmax (the
            official code's learned bias), or None.

    Returns:
        ``v`` ``[B, N_out, D]``, dtype of ``u_hat``.

    Example:
        >>> v = self_attention_routing(torch.randn(8, 16, 10, 16), torch.zeros(16, 10))  # -> [8, 10, 16]
    """
    check_tensor("u_hat", u_hat, 4, U_HAT_LAYOUT)
    check_positive_sizes("u_hat", u_hat, U_HAT_LAYOUT)
    _check_bias(bias, u_hat, u_hat.shape[1], u_hat.shape[2])
    return _implementations(resolve_backend(backend, u_hat, bias))["self_attention_routing"](u_hat, bias)


def self_attention_capsule_routing(
    u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """A fully connected capsule layer with self-attention routing (Efficient-CapsNet's FCCaps):
    predictions ``u_hat[b,i,j] = weight[i,j] @ u[b,i]``, then :func:`self_attention_routing`. On the
    triton backend the predictions are computed on chip and never stored, as in the fused
    :func:`capsule_routing`, with its float32 precision rule (3xTF32 or IEEE products at
    "highest", TF32 allowed at "high"/"medium"); matmul-like under autocast, as it is.

    Args:
        u: input capsules ``[B, N_in, D_in]``.
        weight: ``[N_in, N_out, D_out, D_in]``.
        bias: ``[N_in, N_out]`` or None.

    Returns:
        ``v`` ``[B, N_out, D_out]``, dtype of ``u``.

    Example:
        >>> w = 0.1 * torch.randn(16, 10, 16, 8)
        >>> v = self_attention_capsule_routing(torch.randn(4, 16, 8), w, torch.zeros(16, 10))  # -> [4, 10, 16]
    """
    if bias is not None:
        check_tensor("bias", bias, 2, "[N_in, N_out]")
    given = bias, u
    u, weight, bias = _layer_inputs(u, weight, bias)
    _check_bias(bias, u, weight.shape[0], weight.shape[1], given)
    implementation = _implementations(resolve_backend(backend, u, weight, bias))["self_attention_capsule_routing"]
    return implementation(u, weight, bias)


def dynamic_routing(
    u_hat: torch.Tensor,
    iterations: int = 3,
    *,
    grad_through_routing: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Dynamic routing between capsules (Sabour et al. 2017, Procedure 1).

    Args:
        u_hat: predictions ``[B, N_in, N_out, D]``.
        iterations: routing iterations (>= 1).
        grad_through_routing: gradients flow through every iteration (True, as the official
            implementation) or only through the last weighted sum, with the coupling
            coefficients treated as constants (False).
        backend: ``"auto"`` (triton for CUDA tensors, torch otherwise), ``"torch"``, ``"triton"``.

    Returns:
        ``v`` ``[B, N_out, D]``, dtype of ``u_hat``.

    Example:
        >>> v = dynamic_routing(torch.randn(8, 1152, 10, 16))  # -> [8, 10, 16]
    """
    check_tensor("u_hat", u_hat, 4, U_HAT_LAYOUT)
    check_positive_sizes("u_hat", u_hat, U_HAT_LAYOUT)
    iterations = check_size("iterations", iterations)
    check_bool("grad_through_routing", grad_through_routing)
    implementation = _implementations(resolve_backend(backend, u_hat))["dynamic_routing"]
    return implementation(u_hat, iterations, grad_through_routing)


def capsule_routing(
    u: torch.Tensor,
    weight: torch.Tensor,
    iterations: int = 3,
    *,
    grad_through_routing: bool = True,
    backend: str = "auto",
    fused: bool = True,
) -> torch.Tensor:
    """A fully connected capsule layer: predictions ``u_hat[b,i,j] = weight[i,j] @ u[b,i]``, then
    :func:`dynamic_routing`.

    On the triton backend the layer is fused: the predictions are computed on chip inside the
    routing kernels and never stored (a training step keeps only u, the weight and per-iteration
    [B, N_out, D_out] sums for the backward). Float32 products follow
    ``torch.get_float32_matmul_precision()``: "highest" (the default) multiplies as 3xTF32 on
    tensor cores (float32 accuracy) or IEEE float32, "high"/"medium" allow TF32. float16 inputs
    run as float32 (float16's range cannot hold the products' intermediates), outputs and
    gradients rounded once to float16. ``fused=False`` runs the predictions as a PyTorch matmul,
    then the routing kernels (for comparison; predictions in the input dtype, float16's in
    float32); the torch backend ignores it.

    Args:
        u: input capsules ``[B, N_in, D_in]``.
        weight: ``[N_in, N_out, D_out, D_in]``.

    Returns:
        ``v`` ``[B, N_out, D_out]``, dtype of ``u``.

    Example:
        >>> w = 0.01 * torch.randn(1152, 10, 16, 8)
        >>> v = capsule_routing(torch.randn(4, 1152, 8), w)  # -> [4, 10, 16]
    """
    u, weight = _layer_inputs(u, weight)
    iterations = check_size("iterations", iterations)
    check_bool("grad_through_routing", grad_through_routing)
    check_bool("fused", fused)
    algorithm = "capsule_routing" if fused else "capsule_routing_unfused"
    implementation = _implementations(resolve_backend(backend, u, weight))[algorithm]
    return implementation(u, weight, iterations, grad_through_routing)


def _layer_inputs(u: torch.Tensor, weight: torch.Tensor, *more: torch.Tensor | None) -> tuple:
    """``u``, ``weight`` (and ``more``) checked, after autocast's casts (:func:`autocast_inputs`):
    under autocast a half ``u`` and a float32 weight are the usual pair, as for ``torch.matmul``,
    so the dtypes must agree only after the casts."""
    check_tensor("u", u, 3, U_LAYOUT)
    check_tensor("weight", weight, 4, WEIGHT_LAYOUT)
    given = u, weight, *more
    u, weight, *more = autocast_inputs(u, weight, *more)
    check_same("u", u, "weight", weight, given[:2])
    check_positive_sizes("weight", weight, WEIGHT_LAYOUT, skip_first=False)
    if u.shape[1] != weight.shape[0] or u.shape[2] != weight.shape[3]:
        raise ValueError(
            f"u {U_LAYOUT} and weight {WEIGHT_LAYOUT} disagree: u has shape {tuple(u.shape)}, "
            f"weight {tuple(weight.shape)} (N_in and D_in must match)"
        )
    return (u, weight, *more)


def margin_loss(
    lengths: torch.Tensor,
    target: torch.Tensor,
    m_pos: float = 0.9,
    m_neg: float = 0.1,
    lam: float = 0.5,
) -> torch.Tensor:
    """Margin loss (Sabour et al. 2017, Eq. 4): per class
    ``T_k max(0, m_pos - ||v_k||)^2 + lam (1 - T_k) max(0, ||v_k|| - m_neg)^2``,
    summed over classes, mean over the batch (0 for an empty batch). Computed in float32 for half
    ``lengths`` (float64 for float64): the loss has that dtype, as losses under autocast do.

    Args:
        lengths: capsule lengths ``[B, K]``.
        target: class indices ``[B]`` (integer, in ``[0, K)``) or targets ``[B, K]`` (float).
        m_pos, m_neg: the margins (finite); lam: down-weighting of absent classes (>= 0).
    """
    check_tensor("lengths", lengths, 2, "[B, K]")
    m_pos, m_neg, lam = check_margins(m_pos, m_neg, lam)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != lengths.device:
        raise ValueError(f"lengths and target must be on the same device, got {lengths.device} and {target.device}")
    if target.is_floating_point():
        if target.shape != lengths.shape:
            raise ValueError(
                f"a float target must have the shape of lengths {tuple(lengths.shape)} [B, K], "
                f"got {tuple(target.shape)}"
            )
    elif target.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        if target.shape != lengths.shape[:1]:
            raise ValueError(
                f"an integer target must have shape [B] = {tuple(lengths.shape[:1])}, got {tuple(target.shape)}"
            )
        check_class_indices("target", target, lengths.shape[1])
        target = target.long()
    else:
        raise TypeError(f"target must hold class indices (integer) or per-class targets (float), got {target.dtype}")
    return reference.margin_loss(lengths, target, m_pos, m_neg, lam)


def check_margins(m_pos, m_neg, lam) -> tuple[float, float, float]:
    """The margin loss's constants: finite margins, ``lam >= 0`` (a negative weight would reward
    long capsules of absent classes); returns them as floats."""
    return check_real("m_pos", m_pos), check_real("m_neg", m_neg), check_nonnegative("lam", lam)


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Sum of squared pixel errors per image, mean over the batch (0 for an empty batch; unscaled:
    CapsuleLoss applies the paper's 0.0005). Computed in the wider of the two dtypes, at least
    float32 (a half reconstruction from autocast against float32 images is the usual mixed case);
    the loss has that dtype.

    Args:
        reconstruction: ``[B, P]`` (or any ``[B, ...]`` with P values per image).
        images: ``[B, ...]`` with the same number of pixels per image, on the same device.
    """
    check_tensor("reconstruction", reconstruction)
    check_tensor("images", images)
    if reconstruction.device != images.device:
        raise ValueError(
            f"reconstruction and images must be on the same device, got {reconstruction.device} and {images.device}"
        )
    for name, t in (("reconstruction", reconstruction), ("images", images)):
        if t.dim() < 2:
            raise ValueError(f"{name} must have a batch dimension and pixels [B, ...], got shape {tuple(t.shape)}")
    if reconstruction.shape[:1] != images.shape[:1] or reconstruction.shape[1:].numel() != images.shape[1:].numel():
        raise ValueError(
            f"reconstruction {tuple(reconstruction.shape)} and images {tuple(images.shape)} must hold "
            "the same number of images with the same number of pixels"
        )
    return reference.reconstruction_loss(reconstruction, images)
