"""Dynamic routing (Sabour et al. 2017, Procedure 1) as Triton kernels, forward and backward.
Launch configuration: ``capstriton.ops.dynamic_routing``; semantics: DESIGN.md section 1.

Notation (0-based iterations r = 0..R-1): ``u`` = u_hat [B, N_in, N_out, D]; ``V_r = v_0 + ... +
v_{r-1}`` (``V_0 = 0``), so that the logits are ``b_r[i, j] = u[i, j] . V_r[j]`` and the kernels
never store logits or coupling coefficients: ``c_r = softmax_j(b_r)`` is recomputed from a tile of
``u`` and the running sum ``V_r`` (N_out x D per example).

Work decomposition: program ``(b, k)`` owns example ``b`` and a contiguous slice of the input
capsules (split ``k`` of ``SPLIT``; the backward launches choose their own tile and split), walked
in tiles of ``BLOCK_I`` capsules held as ``[BLOCK_I, BLOCK_J, BLOCK_D]`` blocks in registers.
Each launch is one pass over ``u``:

forward, iteration r (``dynamic_routing_fwd_kernel``): reduce the previous iteration's per-split
    partial sums ``s_{r-1}`` in a fixed order (deterministic), squash to ``v_{r-1}``, form
    ``V_r``; then accumulate this split's partial ``s_r = sum_i c_r[i, j] u[i, j]``.
    ``dynamic_routing_finalize_kernel`` (``common.py``, as every algorithm's split sums) reduces
    the last partials and writes ``v = v_{R-1}``.
    Saved for the backward: ``s_r`` and ``V_r`` for every r (2 x R x N_out x D per example).

backward (DESIGN.md section 1), gradient through routing: ``dynamic_routing_bwd_reduce_kernel`` for
    r = R-1 .. 1 computes ``ds_r = J_squash(s_r)^T dv_r`` with ``dv_r = dv`` (r = R-1) or the sum
    of the later steps' ``dV_q = sum_i g_q[i, j] u[i, j]`` (q > r), and this split's partial of
    ``dV_r``, where ``g_r = c_r (u . ds_r - sum_k c_r u . ds_r)``; after each such launch
    ``dynamic_routing_bwd_sum_kernel`` adds the partials (in split order) to the running sum
    ``dv_{r-1}``, once per example, so that no program re-reads all the splits' partials (that
    would be SPLIT^2 blocks per example and step). Then one
    ``dynamic_routing_bwd_final_kernel`` pass writes ``du = sum_r c_r ds_r + g_r V_r`` with every
    step's terms accumulated in registers, so ``du`` is written once and nothing of u's size is
    stored per iteration. Without gradient through routing only ``du = c_{R-1} ds_{R-1}`` remains.

The gradient block a backward launch reads (the output gradient for the last step, the running
sum of the later steps' dV for the others) is chosen by the launch, not by a run-time test in the
kernel: a scalar condition in a block mask is mistyped by triton 3.9's interpreter, and a load on
each side of a branch failed triton 3.6's coalescing pass.

All arithmetic is float32 whatever the input dtype. Offsets into ``u`` are int64. Arguments that
change with the batch size (``B``, ``SPLIT``, ``caps_per_split``) or the iteration are excluded
from Triton's integer specialisation (``== 1``, divisibility by 16), so neither recompiles.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    caps_block,
    load_caps_block,
    load_prediction_tile,
    softmax_over_outputs,
    softmax_over_outputs_vjp,
    squash_from_parts,
    squash_parts,
    squash_vjp,
    sum_splits,
)

__all__ = [
    "dynamic_routing_fwd_kernel",
    "dynamic_routing_bwd_reduce_kernel",
    "dynamic_routing_bwd_final_kernel",
]


@triton.jit
def _coupling(b_u, b_V, m_j):
    """Coupling coefficients ``c = softmax_j(u . V)`` [BLOCK_I, BLOCK_J] for a tile of u."""
    return softmax_over_outputs(tl.sum(b_u * b_V[None, :, :], axis=2), m_j)


@triton.jit
def _logit_grad(b_u, b_c, b_ds):
    """``g = dL/db`` [BLOCK_I, BLOCK_J] of one step: ``c (u . ds - sum_k c_k u_k . ds_k)``."""
    return softmax_over_outputs_vjp(b_c, tl.sum(b_u * b_ds[None, :, :], axis=2))


@triton.jit(do_not_specialize=["B", "SPLIT", "caps_per_split", "r"])
def dynamic_routing_fwd_kernel(
    u_ptr,  # [B, N_in, N_out, D] predictions u_hat, any float dtype, strides stride_u*
    part_in_ptr,  # [B, SPLIT, N_out, D] f32 partial s of iteration r-1 (unused when FIRST)
    part_out_ptr,  # [B, SPLIT, N_out, D] f32 partial s of iteration r (written)
    s_buf_ptr,  # [R, B, N_out, D] f32 saved s_r (slot r-1 written here)
    vsum_buf_ptr,  # [R, B, N_out, D] f32 saved V_r (slot r written here, r-1 read)
    B,  # batch size (runtime: never a constexpr)
    N_in,
    N_out,
    D,
    SPLIT,  # programs per example along the input capsules
    caps_per_split,  # input capsules per split, a multiple of BLOCK_I
    r,  # this iteration (0-based)
    stride_ub,
    stride_ui,
    stride_uj,
    stride_ud,
    BLOCK_I: tl.constexpr,  # input capsules per tile
    BLOCK_J: tl.constexpr,  # next power of two >= N_out (never split: the softmax couples it)
    BLOCK_D: tl.constexpr,  # next power of two >= D
    FIRST: tl.constexpr,  # r == 0: V_0 = 0, uniform coupling, no previous partials
):
    i_b = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1)
    o_j, o_d, m_j, m_jd, o_jd = caps_block(N_out, D, BLOCK_J, BLOCK_D)
    caps_size = N_out * D
    if FIRST:
        b_V = tl.zeros([BLOCK_J, BLOCK_D], dtype=tl.float32)
    else:
        b_s = sum_splits(part_in_ptr + i_b * SPLIT * caps_size, SPLIT, caps_size, o_jd, m_jd)
        b_unit, b_p, large = squash_parts(b_s)
        b_V = tl.load(vsum_buf_ptr + ((r - 1) * B + i_b) * caps_size + o_jd, mask=m_jd, other=0.0)
        b_V += squash_from_parts(b_unit, b_p, large)
    # One program per example writes the saved state. A branch on the program id rather than
    # a mask `m_jd & (i_k == 0)`: a scalar condition broadcast into a block mask is mistyped
    # by triton 3.9's interpreter ("mask has unsupported dtype"), and a uniform branch skips
    # the stores instead of predicating them off lane by lane.
    if i_k == 0:
        if not FIRST:
            tl.store(s_buf_ptr + ((r - 1) * B + i_b) * caps_size + o_jd, b_s, mask=m_jd)
        tl.store(vsum_buf_ptr + (r * B + i_b) * caps_size + o_jd, b_V, mask=m_jd)

    i_start = i_k * caps_per_split
    i_end = tl.minimum(i_start + caps_per_split, N_in)
    p_ub = u_ptr + i_b * stride_ub
    # Accumulated per tile row and reduced over the input capsules once, after the loop: a
    # reduction over the tile's first axis crosses warps (shared memory and a barrier).
    b_acc = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_D], dtype=tl.float32)
    for i0 in range(i_start, i_end, BLOCK_I):
        o_i = i0 + tl.arange(0, BLOCK_I)
        m_u = (o_i < i_end)[:, None, None] & m_jd[None, :, :]
        b_u = load_prediction_tile(p_ub, o_i, m_u, o_j, o_d, stride_ui, stride_uj, stride_ud)
        if FIRST:
            b_acc += b_u  # softmax of zero logits: 1 / N_out, applied once below
        else:
            b_acc += _coupling(b_u, b_V, m_j)[:, :, None] * b_u
    b_s = tl.sum(b_acc, axis=0)
    if FIRST:
        b_s = b_s / N_out
    tl.store(part_out_ptr + (i_b * SPLIT + i_k) * caps_size + o_jd, b_s, mask=m_jd)


@triton.jit(do_not_specialize=["B", "SPLIT", "caps_per_split", "r"])
def dynamic_routing_bwd_reduce_kernel(
    u_ptr,  # [B, N_in, N_out, D] predictions, strides stride_u*
    dv_ptr,  # [B, N_out, D] dv_r: the gradient of v (r = R-1, strides may be 0: expanded) or
    # the f32 running sum sum_{q > r} dV_q; strides stride_g*
    s_buf_ptr,  # [R, B, N_out, D] f32 saved s_r
    vsum_buf_ptr,  # [R, B, N_out, D] f32 saved V_r
    ds_buf_ptr,  # [R, B, N_out, D] f32 ds_r (slot r written here)
    dpart_ptr,  # [B, SPLIT, N_out, D] f32 this step's partials of dV_r (written)
    B,
    N_in,
    N_out,
    D,
    SPLIT,
    caps_per_split,
    r,  # the step this launch reverses, 1 <= r <= R-1
    stride_ub,
    stride_ui,
    stride_uj,
    stride_ud,
    stride_gb,
    stride_gj,
    stride_gd,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1)
    o_j, o_d, m_j, m_jd, o_jd = caps_block(N_out, D, BLOCK_J, BLOCK_D)
    caps_size = N_out * D
    o_saved = (r * B + i_b) * caps_size + o_jd
    b_dv = load_caps_block(dv_ptr + i_b * stride_gb, o_j, o_d, m_jd, stride_gj, stride_gd)
    b_ds = squash_vjp(tl.load(s_buf_ptr + o_saved, mask=m_jd, other=0.0), b_dv)
    if i_k == 0:  # one program per example saves ds_r (a branch: see dynamic_routing_fwd_kernel)
        tl.store(ds_buf_ptr + o_saved, b_ds, mask=m_jd)
    b_V = tl.load(vsum_buf_ptr + o_saved, mask=m_jd, other=0.0)

    i_start = i_k * caps_per_split
    i_end = tl.minimum(i_start + caps_per_split, N_in)
    p_ub = u_ptr + i_b * stride_ub
    b_acc = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_D], dtype=tl.float32)  # reduced after the loop
    for i0 in range(i_start, i_end, BLOCK_I):
        o_i = i0 + tl.arange(0, BLOCK_I)
        m_u = (o_i < i_end)[:, None, None] & m_jd[None, :, :]
        b_u = load_prediction_tile(p_ub, o_i, m_u, o_j, o_d, stride_ui, stride_uj, stride_ud)
        b_g = _logit_grad(b_u, _coupling(b_u, b_V, m_j), b_ds)
        b_acc += b_g[:, :, None] * b_u
    b_dV = tl.sum(b_acc, axis=0)
    tl.store(dpart_ptr + (i_b * SPLIT + i_k) * caps_size + o_jd, b_dV, mask=m_jd)


@triton.jit(do_not_specialize=["B", "caps_per_split"])
def dynamic_routing_bwd_final_kernel(
    u_ptr,  # [B, N_in, N_out, D] predictions, strides stride_u*
    dv_ptr,  # [B, N_out, D] gradient of the lowest step's v, strides stride_g*: dv_0 =
    # sum_{q >= 1} dV_q (f32) through routing with R > 1, else the gradient of v
    s_buf_ptr,  # [R, B, N_out, D] f32 saved s_r
    vsum_buf_ptr,  # [R, B, N_out, D] f32 saved V_r
    ds_buf_ptr,  # [R, B, N_out, D] f32 ds_r for r >= 1 (from the reduce launches)
    du_ptr,  # [B, N_in, N_out, D] gradient of u_hat, dtype of u_hat, contiguous
    B,
    N_in,
    N_out,
    D,
    caps_per_split,
    R,
    stride_ub,
    stride_ui,
    stride_uj,
    stride_ud,
    stride_gb,
    stride_gj,
    stride_gd,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GRAD_THROUGH: tl.constexpr,  # gradient through every iteration, else only the last s
):
    i_b = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1)
    o_j, o_d, m_j, m_jd, o_jd = caps_block(N_out, D, BLOCK_J, BLOCK_D)
    caps_size = N_out * D
    # The lowest step with a gradient: 0 through routing, else only the last one.
    if GRAD_THROUGH:
        r_lo = 0
    else:
        r_lo = R - 1
    o_lo = (r_lo * B + i_b) * caps_size + o_jd
    b_dv = load_caps_block(dv_ptr + i_b * stride_gb, o_j, o_d, m_jd, stride_gj, stride_gd)
    b_ds_lo = squash_vjp(tl.load(s_buf_ptr + o_lo, mask=m_jd, other=0.0), b_dv)
    if GRAD_THROUGH:
        b_ds_lo = b_ds_lo / N_out  # step 0: V_0 = 0, so c_0 = 1 / N_out with no softmax to run
    else:
        b_V_lo = tl.load(vsum_buf_ptr + o_lo, mask=m_jd, other=0.0)

    i_start = i_k * caps_per_split
    i_end = tl.minimum(i_start + caps_per_split, N_in)
    p_ub = u_ptr + i_b * stride_ub
    p_dub = du_ptr + i_b * N_in * caps_size
    for i0 in range(i_start, i_end, BLOCK_I):
        o_i = i0 + tl.arange(0, BLOCK_I)
        m_u = (o_i < i_end)[:, None, None] & m_jd[None, :, :]
        b_u = load_prediction_tile(p_ub, o_i, m_u, o_j, o_d, stride_ui, stride_uj, stride_ud)
        # Step r_lo: 0 through routing (uniform coupling, no logit-gradient term: V_0 = 0), else
        # the last step, whose coupling coefficients are constants.
        if GRAD_THROUGH:
            b_du = tl.broadcast_to(b_ds_lo[None, :, :], [BLOCK_I, BLOCK_J, BLOCK_D])
            for r in range(1, R):
                o_r = (r * B + i_b) * caps_size + o_jd
                b_V = tl.load(vsum_buf_ptr + o_r, mask=m_jd, other=0.0)
                b_ds = tl.load(ds_buf_ptr + o_r, mask=m_jd, other=0.0)
                b_c = _coupling(b_u, b_V, m_j)
                b_g = _logit_grad(b_u, b_c, b_ds)
                b_du += b_c[:, :, None] * b_ds[None, :, :] + b_g[:, :, None] * b_V[None, :, :]
        else:
            b_du = _coupling(b_u, b_V_lo, m_j)[:, :, None] * b_ds_lo[None, :, :]
        o_du = o_i[:, None, None].to(tl.int64) * caps_size + o_jd[None, :, :]
        tl.store(p_dub + o_du, b_du.to(du_ptr.dtype.element_ty), mask=m_u)
