"""The pure-PyTorch reference (``backend="torch"``): the oracle of every test and the CPU path.

Everything here is plain differentiable PyTorch (no custom autograd), so its gradients come from
autograd and are independent of the hand-written backward kernels, and it compiles with
``torch.compile(fullgraph=True)`` on any device. Semantics: DESIGN.md section 1 and the README.

Half-precision inputs are computed in float32 and cast back; float64 stays float64 (the tests
use it as the exact reference). No argument checking here: the public functions in
``capstriton.functional`` validate before they call in.
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "squash",
    "dynamic_routing",
    "capsule_predictions",
    "capsule_routing",
    "margin_loss",
    "reconstruction_loss",
]


def float_arithmetic(fn):
    """Run ``fn`` with autocast off on its first argument's device: the arithmetic is float32 (or
    float64) as documented, never downcast by an enclosing ``torch.autocast`` (which would run
    the einsums and matmuls in bfloat16). Callers apply autocast's casts to the inputs first."""

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapper


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: float64 stays, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@float_arithmetic
def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Squash (Eq. 1 of Sabour et al. 2017) over ``dim``: ``v = s * ||s|| / (1 + ||s||^2)``.

    Finite for every finite input and differentiable everywhere, with an exactly zero Jacobian
    at ``s = 0``:

    - ``s`` is divided by its largest absolute component (a constant for autograd: the function
      does not depend on that choice, so the gradient stays exact). The scaled vector ``t`` has
      ``1 <= ||t|| <= sqrt(D)``, so the norm of 1e30 vectors neither overflows nor does a 1e-30
      one underflow, and the ``sqrt`` never sees 0 (where its derivative is infinite).
    - The length ``L = n^2 / (1 + n^2)`` with ``n = ||s||`` is evaluated as ``n^2 / (1 + n^2)``
      below 1 and as ``1 / (1 + (1/n)^2)`` above, each branch fed only values that are safe for
      it, so no Inf/NaN appears in the forward or in the gradient of the branch not taken.
    - ``v = (t / ||t||) * L``.
    """
    dtype = s.dtype
    x = s.to(compute_dtype(dtype))
    with torch.no_grad():
        amax = x.abs().amax(dim=dim, keepdim=True)
    nonzero = amax > 0
    scale = torch.where(nonzero, amax, torch.ones_like(amax))
    t = x / scale
    # ||t||^2 >= 1 whenever s != 0 (the largest component is exactly +-1); the clamp only
    # keeps the sqrt away from 0 for zero vectors, whose length is forced to 0 below.
    m = (t * t).sum(dim=dim, keepdim=True).clamp_min(0.5).sqrt()
    n = scale * m  # ||s||; may overflow to inf only in the large branch, which does not use it
    large = n >= 1
    inv_scale = torch.where(large, scale, torch.ones_like(scale)).reciprocal()
    r = torch.where(large, inv_scale / m, torch.zeros_like(m))  # 1/||s|| when large
    n_small = torch.where(large | ~nonzero, torch.zeros_like(n), n)
    length = torch.where(
        large, 1.0 / (1.0 + r * r), n_small * n_small / (1.0 + n_small * n_small)
    )
    return (t * (length / m)).to(dtype)


@float_arithmetic
def dynamic_routing(
    u_hat: torch.Tensor, iterations: int = 3, grad_through_routing: bool = True
) -> torch.Tensor:
    """Routing by agreement (Procedure 1), literally: logits ``b``, softmax over output capsules.

    Args:
        u_hat: predictions ``[B, N_in, N_out, D]``.
        iterations: routing iterations ``R >= 1``.
        grad_through_routing: if False, ``u_hat`` is detached in every iteration except the last
            one's ``s = sum_i c_ij u_hat_ij`` (the coupling coefficients act as constants).

    Returns:
        ``v`` ``[B, N_out, D]``, dtype of ``u_hat``.
    """
    dtype = u_hat.dtype
    u = u_hat.to(compute_dtype(dtype))
    u_routing = u if grad_through_routing else u.detach()
    # Fresh zero logits per call and per example: not a parameter, not shared across the batch.
    b = u.new_zeros(u.shape[:3])
    v = None
    for r in range(iterations):
        last = r == iterations - 1
        c = torch.softmax(b, dim=2)  # over output capsules j: each input capsule's votes sum to 1
        s = torch.einsum("bij,bijd->bjd", c, u if last else u_routing)
        v = squash(s, dim=-1)
        if not last:
            b = b + torch.einsum("bijd,bjd->bij", u_routing, v)
    return v.to(dtype)


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
