"""Squash over the last dimension, as row-tiled Triton kernels for any leading shape: Sabour et
al.'s Eq. 1, ``s ||s|| / (1 + ||s||^2)`` (:func:`.common.squash_parts`: finite for every finite
input, a zero Jacobian at ``s = 0``), or with ``EFFICIENT`` Efficient-CapsNet's
``(1 - e^-||s||) s / ||s||`` (:func:`.common.efficient_squash_parts`: 0 with the identity Jacobian
at ``s = 0``)."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import efficient_squash_parts, efficient_squash_vjp, squash_from_parts, squash_parts, squash_vjp

__all__ = ["squash_fwd_kernel", "squash_bwd_kernel"]


@triton.jit(do_not_specialize=["R"])
def squash_fwd_kernel(
    x_ptr,  # [R, D] input rows s, any float dtype, strides (stride_xr, stride_xd)
    v_ptr,  # [R, D] output rows, dtype of x, contiguous
    R,  # number of rows (capsules): runtime, so batch size never recompiles
    D,  # capsule size
    stride_xr,
    stride_xd,
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= D
    EFFICIENT: tl.constexpr,  # Efficient-CapsNet's squash instead of Eq. 1
):
    i_r = tl.program_id(0)
    o_r = (i_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)  # int32: the ops make rows with a huge column stride contiguous
    m_x = (o_r[:, None] < R) & (o_d[None, :] < D)
    b_x = tl.load(x_ptr + o_r[:, None] * stride_xr + o_d[None, :] * stride_xd, mask=m_x, other=0.0)
    if EFFICIENT:
        b_unit, b_g, _, _ = efficient_squash_parts(b_x.to(tl.float32))
        b_v = b_unit * b_g[:, None]
    else:
        b_unit, b_p, large = squash_parts(b_x.to(tl.float32))
        b_v = squash_from_parts(b_unit, b_p, large)
    tl.store(v_ptr + o_r[:, None] * D + o_d[None, :], b_v.to(v_ptr.dtype.element_ty), mask=m_x)


@triton.jit(do_not_specialize=["R"])
def squash_bwd_kernel(
    x_ptr,  # [R, D] the forward input s, strides (stride_xr, stride_xd)
    dv_ptr,  # [R, D] incoming gradient, strides (stride_gr, stride_gd) (may be 0: expanded)
    dx_ptr,  # [R, D] gradient of s, dtype of s, contiguous
    R,
    D,
    stride_xr,
    stride_xd,
    stride_gr,
    stride_gd,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EFFICIENT: tl.constexpr,
):
    i_r = tl.program_id(0)
    o_r = (i_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)  # int32: the ops make rows with a huge column stride contiguous
    m_x = (o_r[:, None] < R) & (o_d[None, :] < D)
    b_x = tl.load(x_ptr + o_r[:, None] * stride_xr + o_d[None, :] * stride_xd, mask=m_x, other=0.0)
    b_dv = tl.load(dv_ptr + o_r[:, None] * stride_gr + o_d[None, :] * stride_gd, mask=m_x, other=0.0)
    if EFFICIENT:
        b_dx = efficient_squash_vjp(b_x.to(tl.float32), b_dv.to(tl.float32))
    else:
        b_dx = squash_vjp(b_x.to(tl.float32), b_dv.to(tl.float32))
    tl.store(dx_ptr + o_r[:, None] * D + o_d[None, :], b_dx.to(dx_ptr.dtype.element_ty), mask=m_x)
