"""Squash as Triton kernels: the shared numerics (``squash_parts``, ``squash_from_parts``,
``squash_vjp``) used by every kernel, and row-tiled forward/backward kernels for any leading shape.

Numerics (float32 throughout, inputs of any float dtype):

    v = s * n / (1 + n^2),    n = ||s||

computed from ``t = s / max|s|`` (largest component exactly +-1, so ``1 <= ||t|| <= sqrt(D)``:
no overflow at 1e30, no underflow at 1e-30) and ``p = min(n, 1/n)``, in terms of which the length
and both Jacobian coefficients are bounded rational functions:

    n <  1:  |v| = p^2/(1+p^2),  n/(1+n^2) = p/(1+p^2),  n(1-n^2)/(1+n^2)^2 =  p(1-p^2)/(1+p^2)^2
    n >= 1:  |v| = 1/(1+p^2),    n/(1+n^2) = p/(1+p^2),  n(1-n^2)/(1+n^2)^2 = -p(1-p^2)/(1+p^2)^2

At ``s = 0`` everything is 0: the output and the whole Jacobian, never NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "squash_forward_kernel",
    "squash_backward_kernel",
    "squash_config",
    "squash_parts",
    "squash_from_parts",
    "squash_vjp",
]


@triton.jit
def squash_parts(b_x):
    """Split zero-padded rows ``b_x`` [ROWS, COLS] (float32) into the unit vector ``s / ||s||``
    (0 for a zero row), ``p = min(||s||, 1/||s||)`` [ROWS] and ``large = ||s|| >= 1`` [ROWS]."""
    b_amax = tl.max(tl.abs(b_x), axis=1)
    nonzero = b_amax > 0
    # Rows whose largest component is below 2^-64 are first multiplied by 2^64 (exact, a power of
    # two, and below 1 after it): the reciprocal of a subnormal largest component (< 2.9e-39)
    # overflows float32. The norm is scaled back by 2^-64, exactly again.
    tiny = b_amax < 5.421010862427522e-20  # 2^-64
    b_x = b_x * tl.where(tiny, 18446744073709551616.0, 1.0)[:, None]  # 2^64
    b_scale = tl.where(nonzero, b_amax * tl.where(tiny, 18446744073709551616.0, 1.0), 1.0)
    # IEEE reciprocal, one per row: Triton's `/` is div.full.f32, which returns 0 for divisors
    # above 2^126, so 1e38 inputs would lose their direction
    b_inv = tl.math.div_rn(1.0, b_scale)
    b_t = b_x * b_inv[:, None]
    b_m = tl.sqrt(tl.where(nonzero, tl.sum(b_t * b_t, axis=1), 1.0))
    # ||s||; may be inf for ||s|| > 3.4e38, then only the large branch is used
    b_n = b_scale * b_m * tl.where(tiny, 5.421010862427522e-20, 1.0)
    large = nonzero & (b_n >= 1.0)
    b_p = tl.where(large, b_inv / b_m, tl.where(nonzero, b_n, 0.0))
    return b_t / b_m[:, None], b_p, large


@triton.jit
def squash_from_parts(b_unit, b_p, large):
    """``squash(s)`` from :func:`squash_parts`."""
    b_p2 = b_p * b_p
    b_len = tl.where(large, 1.0, b_p2) / (1.0 + b_p2)
    return b_unit * b_len[:, None]


@triton.jit
def squash_vjp(b_x, b_dv):
    """``J_squash(s)^T dv`` for zero-padded rows ``b_x`` = s and ``b_dv`` [ROWS, COLS] (float32)."""
    b_unit, b_p, large = squash_parts(b_x)
    b_p2 = b_p * b_p
    b_q = 1.0 / (1.0 + b_p2)
    b_g1 = b_p * b_q  # n / (1 + n^2)
    b_g2 = tl.where(large, -b_g1, b_g1) * (1.0 - b_p2) * b_q  # n (1 - n^2) / (1 + n^2)^2
    b_dot = tl.sum(b_unit * b_dv, axis=1)
    return b_g1[:, None] * b_dv + b_unit * (b_dot * b_g2)[:, None]


@triton.jit(do_not_specialize=["R"])
def squash_forward_kernel(
    x_ptr,  # [R, D] input rows, any float dtype, strides (stride_xr, stride_xd)
    v_ptr,  # [R, D] output rows, dtype of x, contiguous
    R,  # number of rows (capsules): runtime, so batch size never recompiles
    D,  # capsule size
    stride_xr,
    stride_xd,
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    i_r = tl.program_id(0)
    o_r = (i_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)  # int32: the ops make rows with a huge column stride contiguous
    m_x = (o_r[:, None] < R) & (o_d[None, :] < D)
    b_x = tl.load(x_ptr + o_r[:, None] * stride_xr + o_d[None, :] * stride_xd, mask=m_x, other=0.0)
    b_unit, b_p, large = squash_parts(b_x.to(tl.float32))
    b_v = squash_from_parts(b_unit, b_p, large)
    tl.store(v_ptr + o_r[:, None] * D + o_d[None, :], b_v.to(v_ptr.dtype.element_ty), mask=m_x)


@triton.jit(do_not_specialize=["R"])
def squash_backward_kernel(
    x_ptr,  # [R, D] the forward input s, strides (stride_xr, stride_xd)
    dv_ptr,  # [R, D] incoming gradient, strides (stride_gr, stride_gd) (may be 0: expanded)
    dx_ptr,  # [R, D] gradient w.r.t. s, dtype of s, contiguous
    R,
    D,
    stride_xr,
    stride_xd,
    stride_gr,
    stride_gd,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_r = tl.program_id(0)
    o_r = (i_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)  # int32: the ops make rows with a huge column stride contiguous
    m_x = (o_r[:, None] < R) & (o_d[None, :] < D)
    b_x = tl.load(x_ptr + o_r[:, None] * stride_xr + o_d[None, :] * stride_xd, mask=m_x, other=0.0)
    b_dv = tl.load(dv_ptr + o_r[:, None] * stride_gr + o_d[None, :] * stride_gd, mask=m_x, other=0.0)
    b_dx = squash_vjp(b_x.to(tl.float32), b_dv.to(tl.float32))
    tl.store(dx_ptr + o_r[:, None] * D + o_d[None, :], b_dx.to(dx_ptr.dtype.element_ty), mask=m_x)


def squash_config(dim: int) -> dict:
    """Launch parameters for the squash kernels, from the capsule size alone (the number of rows
    never recompiles): at most 128 rows and 2048 elements a program, 8 warps from 1024 elements.
    Rows per thread are what cost registers (each row has its own norm, reciprocal and square
    root): 256 rows of 8 on 4 warps took 126 registers on sm_90, 128 rows on 8 warps 37
    (``bench/kernel_report.py``)."""
    block_d = triton.next_power_of_2(max(dim, 1))
    block_r = max(1, min(2048 // block_d, 128))
    num_warps = 8 if block_r * block_d >= 1024 else 4
    return {"BLOCK_R": block_r, "BLOCK_D": block_d, "num_warps": num_warps}
