"""Squash over the last dimension as ``torch.library.triton_op`` s, with autograd: Sabour et al.'s
(``squash``) and Efficient-CapsNet's (``efficient_squash``), one row kernel pair for both.

    capstriton::squash_fwd(s [..., D]) -> v
    capstriton::squash_bwd(grad [..., D], s [..., D]) -> ds
    capstriton::efficient_squash_fwd(s [..., D]) -> v
    capstriton::efficient_squash_bwd(grad [..., D], s [..., D]) -> ds
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch.library import triton_op

from ..kernels.squash import squash_bwd_kernel, squash_fwd_kernel
from ._launch import empty, launch
from ._transforms import no_double_backward

__all__ = [
    "SquashConfig",
    "squash",
    "squash_fwd",
    "squash_bwd",
    "efficient_squash",
    "efficient_squash_fwd",
    "efficient_squash_bwd",
]


@dataclass(frozen=True)
class SquashConfig:
    """Launch parameters of the squash kernels, from the capsule size alone (the number of rows
    never recompiles): at most 128 rows and 2048 elements a program, 8 warps from 1024 elements.
    Rows per thread are what cost registers (each row has its own norm, reciprocal and square
    root): see bench/results/kernel_report/NOTES.md."""

    block_r: int
    block_d: int
    num_warps: int

    @classmethod
    def for_dim(cls, dim: int) -> SquashConfig:
        block_d = triton.next_power_of_2(max(dim, 1))
        block_r = max(1, min(2048 // block_d, 128))
        return cls(block_r, block_d, 8 if block_r * block_d >= 1024 else 4)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [R, D] rows: a view whenever the strides allow one. The kernels index columns
    with int32 (fewer registers than int64 offsets), so a column stride that could overflow
    it (squash over a moved dimension of a huge tensor) gets a contiguous copy instead."""
    rows = t.reshape(-1, t.shape[-1])
    if rows.stride(1) * rows.shape[1] >= 2**31:
        rows = rows.contiguous()
    return rows


def _forward(s: torch.Tensor, efficient: bool) -> torch.Tensor:
    x = _rows(s)
    v = empty(x.shape, s.dtype, s.device)
    rows, dim = x.shape
    if rows > 0:
        cfg = SquashConfig.for_dim(dim)
        launch(
            squash_fwd_kernel, (triton.cdiv(rows, cfg.block_r),),
            x_ptr=x, v_ptr=v, R=rows, D=dim, stride_xr=x.stride(0), stride_xd=x.stride(1),
            BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d, EFFICIENT=efficient, num_warps=cfg.num_warps,
        )
    return v.view(s.shape)


def _backward_rows(grad: torch.Tensor, s: torch.Tensor, efficient: bool) -> torch.Tensor:
    x = _rows(s)
    g = _rows(grad)  # stays a stride-0 view for expanded gradients
    ds = empty(x.shape, s.dtype, s.device)
    rows, dim = x.shape
    if rows > 0:
        cfg = SquashConfig.for_dim(dim)
        launch(
            squash_bwd_kernel, (triton.cdiv(rows, cfg.block_r),),
            x_ptr=x, dv_ptr=g, dx_ptr=ds, R=rows, D=dim,
            stride_xr=x.stride(0), stride_xd=x.stride(1), stride_gr=g.stride(0), stride_gd=g.stride(1),
            BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d, EFFICIENT=efficient, num_warps=cfg.num_warps,
        )
    return ds.view(s.shape)


@triton_op("capstriton::squash_fwd", mutates_args=())
def squash_fwd(s: torch.Tensor) -> torch.Tensor:
    return _forward(s, False)


@triton_op("capstriton::squash_bwd", mutates_args=())
def squash_bwd(grad: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return _backward_rows(grad, s, False)


@triton_op("capstriton::efficient_squash_fwd", mutates_args=())
def efficient_squash_fwd(s: torch.Tensor) -> torch.Tensor:
    return _forward(s, True)


@triton_op("capstriton::efficient_squash_bwd", mutates_args=())
def efficient_squash_bwd(grad: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return _backward_rows(grad, s, True)


def _setup_context(ctx, inputs, output):
    (s,) = inputs
    ctx.save_for_backward(s)


def _backward(ctx, grad):
    (s,) = ctx.saved_tensors
    return squash_bwd(grad, s)


def _efficient_backward(ctx, grad):
    (s,) = ctx.saved_tensors
    return efficient_squash_bwd(grad, s)


squash_fwd.register_autograd(_backward, setup_context=_setup_context)
squash_bwd.register_autograd(no_double_backward("squash"))
efficient_squash_fwd.register_autograd(_efficient_backward, setup_context=_setup_context)
efficient_squash_bwd.register_autograd(no_double_backward("efficient squash"))


def _along(op, s: torch.Tensor, dim: int) -> torch.Tensor:
    if dim in (-1, s.dim() - 1):
        return op(s)
    return op(s.movedim(dim, -1)).movedim(-1, dim)


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Squash over ``dim`` of ``s`` with the Triton kernels (validated by capstriton.functional)."""
    return _along(squash_fwd, s, dim)


def efficient_squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Efficient-CapsNet's squash over ``dim`` with the Triton kernels (validated by functional)."""
    return _along(efficient_squash_fwd, s, dim)
