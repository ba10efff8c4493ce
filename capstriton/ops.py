"""Triton kernels registered as PyTorch operators, with autograd.

Each op is a ``torch.library.triton_op`` whose body launches kernels through ``wrap_triton``, so
``torch.compile(fullgraph=True)`` traces straight through it (the graph holds a
``triton_kernel_wrapper`` node) and inductor can schedule it. Autograd is attached with
``register_autograd``; the backward ops are ``triton_op`` s too.

    capstriton::squash_forward(s [R, D]) -> v
    capstriton::squash_backward(grad [R, D], s [R, D]) -> ds
    capstriton::routing_forward(u_hat [B, N_in, N_out, D], iterations, grad_through_routing)
        -> (v [B, N_out, D], s_saved [R, B, N_out, D], vsum_saved [R, B, N_out, D])
    capstriton::routing_backward(grad_v, u_hat, s_saved, vsum_saved, iterations,
        grad_through_routing) -> grad_u_hat

Inputs are validated by ``capstriton.functional`` before they get here.
"""

from __future__ import annotations

import torch
import triton
from torch.library import triton_op, wrap_triton
from triton.runtime.jit import JITFunction

from .kernels.routing import (
    routing_backward_final_kernel,
    routing_backward_reduce_kernel,
    routing_backward_sum_kernel,
    routing_config,
    routing_finalize_kernel,
    routing_forward_kernel,
)
from .kernels.squash import squash_backward_kernel, squash_config, squash_forward_kernel

__all__ = ["squash", "dynamic_routing"]

_F32 = torch.float32


def _launcher(kernel):
    """``wrap_triton(kernel)``, through which torch.compile traces the launch. Under
    TRITON_INTERPRET the kernels are interpreter functions that run eagerly on CPU tensors:
    torch 2.13's wrap_triton hands them back unchanged, torch 2.11's refuses them, so they are
    launched directly."""
    if isinstance(kernel, JITFunction):
        return wrap_triton(kernel)
    return kernel


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer of the ops comes from here (uninitialised memory: each
    kernel writes every element it owns). Tests replace it with a NaN-filled allocation so that
    an element a kernel forgot to write, or a buffer read before it was written, fails loudly."""
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# squash over the last dimension


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [R, D] rows: a view whenever the strides allow one. The kernels index columns
    with int32 (fewer registers than int64 offsets), so a column stride that could overflow
    it (squash over a moved dimension of a huge tensor) gets a contiguous copy instead."""
    rows = t.reshape(-1, t.shape[-1])
    if rows.stride(1) * rows.shape[1] >= 2**31:
        rows = rows.contiguous()
    return rows


@triton_op("capstriton::squash_forward", mutates_args=())
def squash_forward(s: torch.Tensor) -> torch.Tensor:
    x = _rows(s)
    v = _empty(x.shape, s.dtype, s.device)
    rows, dim = x.shape
    if rows > 0:
        cfg = squash_config(dim)
        grid = (triton.cdiv(rows, cfg["BLOCK_R"]),)
        _launcher(squash_forward_kernel)[grid](
            x, v, rows, dim, x.stride(0), x.stride(1),
            BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
        )
    return v.view(s.shape)


@triton_op("capstriton::squash_backward", mutates_args=())
def squash_backward(grad: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    x = _rows(s)
    g = _rows(grad)  # stays a stride-0 view for expanded gradients
    ds = _empty(x.shape, s.dtype, s.device)
    rows, dim = x.shape
    if rows > 0:
        cfg = squash_config(dim)
        grid = (triton.cdiv(rows, cfg["BLOCK_R"]),)
        _launcher(squash_backward_kernel)[grid](
            x, g, ds, rows, dim, x.stride(0), x.stride(1), g.stride(0), g.stride(1),
            BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
        )
    return ds.view(s.shape)


def _squash_setup_context(ctx, inputs, output):
    (s,) = inputs
    ctx.save_for_backward(s)


def _squash_backward(ctx, grad):
    (s,) = ctx.saved_tensors
    return squash_backward(grad, s)


squash_forward.register_autograd(_squash_backward, setup_context=_squash_setup_context)


def _no_double_backward(op: str):
    """The autograd formula of a backward op: reached only when a gradient is differentiated again
    (``create_graph=True``, ``torch.autograd.grad`` of a gradient), which the kernels do not
    support. Without it PyTorch says that no formula is registered for an internal op."""

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"capstriton: double backward (differentiating a gradient, create_graph=True) through "
            f"the triton {op} kernels is not supported; use backend='torch', whose reference "
            "supports every order of differentiation"
        )

    return backward


squash_backward.register_autograd(_no_double_backward("squash"))


def squash(s: torch.Tensor) -> torch.Tensor:
    """Squash over the last dimension of ``s`` with the Triton kernels."""
    return squash_forward(s)


# --------------------------------------------------------------------------------------------
# dynamic routing


def _saved_buffers(u_hat: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, _, n_out, d = u_hat.shape
    shape = (iterations, b, n_out, d)
    return _empty(shape, _F32, u_hat.device), _empty(shape, _F32, u_hat.device)


@triton_op("capstriton::routing_forward", mutates_args=())
def routing_forward(
    u_hat: torch.Tensor, iterations: int, grad_through_routing: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, n_in, n_out, d = u_hat.shape
    v = _empty((batch, n_out, d), u_hat.dtype, u_hat.device)
    s_saved, vsum_saved = _saved_buffers(u_hat, iterations)
    if batch == 0:
        return v, s_saved, vsum_saved
    cfg = routing_config(int(n_in), int(n_out), int(d), batch)
    split = cfg["SPLIT"]
    partials = [_empty((batch, split, n_out, d), _F32, u_hat.device) for _ in range(2)]
    for r in range(iterations):
        _launcher(routing_forward_kernel)[(batch, split)](
            u_hat, partials[(r + 1) % 2], partials[r % 2], s_saved, vsum_saved,
            batch, n_in, n_out, d, split, cfg["caps_per_split"], r,
            *u_hat.stride(),
            BLOCK_I=cfg["BLOCK_I"], BLOCK_J=cfg["BLOCK_J"], BLOCK_D=cfg["BLOCK_D"],
            FIRST=r == 0, num_warps=cfg["num_warps"],
        )
    _launcher(routing_finalize_kernel)[(batch,)](
        partials[(iterations - 1) % 2], s_saved, v, batch, n_out, d, split, iterations - 1,
        BLOCK_J=cfg["BLOCK_J"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps_caps"],
    )
    return v, s_saved, vsum_saved


@triton_op("capstriton::routing_backward", mutates_args=())
def routing_backward(
    grad_v: torch.Tensor,
    u_hat: torch.Tensor,
    s_saved: torch.Tensor,
    vsum_saved: torch.Tensor,
    iterations: int,
    grad_through_routing: bool,
) -> torch.Tensor:
    batch, n_in, n_out, d = u_hat.shape
    du = _empty((batch, n_in, n_out, d), u_hat.dtype, u_hat.device)
    if batch == 0:
        return du
    cfg = routing_config(int(n_in), int(n_out), int(d), batch)
    split = cfg["SPLIT_BWD"]  # its own split: the forward's partials are not read here
    ds_saved = _empty(s_saved.shape, _F32, u_hat.device)
    dpartials = _empty((batch, split, n_out, d), _F32, u_hat.device)  # one step's, reused
    dv_sum = _empty((batch, n_out, d), _F32, u_hat.device)  # sum of the later steps' dV
    blocks = {"BLOCK_I": cfg["BLOCK_I_BWD"], "BLOCK_J": cfg["BLOCK_J"], "BLOCK_D": cfg["BLOCK_D"]}
    # dv_r, the gradient reaching v_r: the output gradient for the last step, the running sum
    # of the later steps' dV for the others (chosen here, so no kernel selects at run time)
    dv_in = grad_v
    if grad_through_routing:
        for r in range(iterations - 1, 0, -1):
            _launcher(routing_backward_reduce_kernel)[(batch, split)](
                u_hat, dv_in, s_saved, vsum_saved, ds_saved, dpartials,
                batch, n_in, n_out, d, split, cfg["caps_per_split_bwd"], r,
                *u_hat.stride(), *dv_in.stride(),
                **blocks, num_warps=cfg["num_warps"],
            )
            _launcher(routing_backward_sum_kernel)[(batch,)](
                dpartials, dv_sum, batch, n_out, d, split,
                BLOCK_J=cfg["BLOCK_J"], BLOCK_D=cfg["BLOCK_D"], FIRST=r == iterations - 1,
                num_warps=cfg["num_warps_caps"],
            )
            dv_in = dv_sum
    _launcher(routing_backward_final_kernel)[(batch, split)](
        u_hat, dv_in, s_saved, vsum_saved, ds_saved, du,
        batch, n_in, n_out, d, cfg["caps_per_split_bwd"], iterations,
        *u_hat.stride(), *dv_in.stride(),
        **blocks, GRAD_THROUGH=grad_through_routing, num_warps=cfg["num_warps"],
    )
    return du


def _routing_setup_context(ctx, inputs, output):
    u_hat, iterations, grad_through_routing = inputs
    _, s_saved, vsum_saved = output
    ctx.save_for_backward(u_hat, s_saved, vsum_saved)
    ctx.iterations = iterations
    ctx.grad_through_routing = grad_through_routing


def _routing_backward(ctx, grad_v, _grad_s_saved, _grad_vsum_saved):
    u_hat, s_saved, vsum_saved = ctx.saved_tensors
    if grad_v is None:
        return None, None, None
    du = routing_backward(
        grad_v, u_hat, s_saved, vsum_saved, ctx.iterations, ctx.grad_through_routing
    )
    return du, None, None


routing_forward.register_autograd(_routing_backward, setup_context=_routing_setup_context)
routing_backward.register_autograd(_no_double_backward("dynamic routing"))


def dynamic_routing(u_hat: torch.Tensor, iterations: int, grad_through_routing: bool) -> torch.Tensor:
    """Routing with the Triton kernels: ``u_hat`` [B, N_in, N_out, D] -> ``v`` [B, N_out, D]."""
    return routing_forward(u_hat, iterations, grad_through_routing)[0]
