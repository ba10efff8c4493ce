"""The fully connected capsule layer with dynamic routing, fused: the predictions
``u_hat[b, i, j, :] = W[i, j] @ u[b, i, :]`` are computed on chip, tile by tile, inside the routing
passes, forward and backward, and never exist in global memory (DESIGN.md sections 1 and 5).

Notation as in ``dynamic_routing``: 0-based iterations r = 0..R-1, ``V_r = v_0 + ... + v_{r-1}``,
logits ``b_r[i, j] = u_hat[i, j] . V_r[j]``, coupling ``c_r = softmax_j(b_r)``. Shapes: ``u``
[B, N_in, D_in], ``W`` [N_in, N_out, D_out, D_in]; an example's [N_out, D_out] block is flattened
to ``n = j * BLOCK_D + d`` (``BLOCK_N = BLOCK_J * BLOCK_D``) for the products.

Two kinds of passes. With products on tensor cores (half inputs, float32 as TF32 or 3xTF32) every
pass works in input-capsule space (the sections before ``fused_layer_state_kernel`` and before
``fused_layer_bwd_input_kernel`` below): no tile of predictions at all. With IEEE float32
products (the op's "ieee" precision) the passes walk tiles of predictions: a program owns a tile
of ``BLOCK_B`` examples and a run of input capsules (split ``k`` of ``SPLIT``) and walks it one
capsule at a time, the tile's predictions of capsule i made by D_in rank-one updates, then the
routing arithmetic of ``dynamic_routing`` in float32 on [BLOCK_B, BLOCK_J, BLOCK_D] blocks:

forward, iteration r (``fused_layer_fwd_kernel``): reduce the previous iteration's per-split
    partial sums ``s_{r-1}`` in split order, squash, form ``V_r``; accumulate this split's partial
    ``s_r``. Both kinds end with ``dynamic_routing_finalize_kernel`` (``common.py``), which reduces the last
    partials and writes ``v``. Saved for the backward: ``s_r`` and ``V_r`` (2 x R x N_out x D_out
    per example).

backward through routing (``fused_layer_bwd_reduce_kernel``, r = R-1 .. 1, each followed by
    ``dynamic_routing_bwd_sum_kernel``): as in ``dynamic_routing``, with the predictions
    recomputed. ``fused_layer_bwd_ds_kernel`` then forms ``ds`` of the lowest step with a
    gradient (0 through routing, R-1 detached), and ``fused_layer_bwd_final_kernel`` writes
    ``du[b, i] = W[i]^T du_hat[b, i]`` and this batch group's ``dW[i] = sum_b du_hat[b, i]
    u[b, i]^T``, with ``du_hat = sum_r c_r ds_r + g_r V_r`` recomputed tile by tile. Its programs
    own a run of input capsules and a group of example tiles (outer loop over capsules, inner
    over tiles), so each weight gradient block is accumulated in its group's part by one program,
    in tile order; ``fused_layer_bwd_dw_sum_kernel`` adds the groups in order. Deterministic: no
    atomics, every sum in a fixed order.

All routing arithmetic is float32. Offsets into ``u`` are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    caps_block,
    coefficient_parts,
    dot_f32,
    dot_parts,
    factor_parts,
    half_parts,
    half_product_parts,
    half_products,
    layer_input_grads,
    layer_predictions,
    layer_weight_tile,
    load_caps_block,
    load_prediction_tile,
    predictions,
    softmax_over_outputs,
    softmax_over_outputs_vjp,
    squash_from_parts,
    squash_parts,
    squash_vjp,
    sum_splits,
    tile_block,
    tile_offsets,
    weight_offsets,
)

__all__ = [
    "fused_layer_fwd_kernel",
    "fused_layer_bwd_reduce_kernel",
    "fused_layer_bwd_ds_kernel",
    "fused_layer_bwd_final_kernel",
    "fused_layer_state_kernel",
    "fused_layer_logits_kernel",
    "fused_layer_sums_kernel",
    "fused_layer_coupled_sums_kernel",
    "fused_layer_weight_chunks_kernel",
    "fused_layer_uniform_sums_kernel",
    "fused_layer_bwd_input_kernel",
    "fused_layer_bwd_weight_kernel",
]


@triton.jit
def _squash_rows(b_s, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """squash of every capsule of a [BLOCK_B, BLOCK_J, BLOCK_D] block."""
    b_unit, b_p, large = squash_parts(tl.reshape(b_s, [BLOCK_B * BLOCK_J, BLOCK_D]))
    return tl.reshape(squash_from_parts(b_unit, b_p, large), [BLOCK_B, BLOCK_J, BLOCK_D])


@triton.jit
def _squash_vjp_rows(b_s, b_dv, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """``J_squash(s)^T dv`` of every capsule of [BLOCK_B, BLOCK_J, BLOCK_D] blocks."""
    b_ds = squash_vjp(tl.reshape(b_s, [BLOCK_B * BLOCK_J, BLOCK_D]), tl.reshape(b_dv, [BLOCK_B * BLOCK_J, BLOCK_D]))
    return tl.reshape(b_ds, [BLOCK_B, BLOCK_J, BLOCK_D])


@triton.jit(do_not_specialize=["B", "SPLIT", "caps_per_split", "r"])
def fused_layer_fwd_kernel(
    u_ptr,  # [B, N_in, D_in] input capsules, any float dtype, strides stride_u*
    w_ptr,  # [N_in, N_out, D, D_in] weight, dtype of u, strides stride_w*
    part_in_ptr,  # [B, SPLIT, N_out, D] f32 partial s of iteration r-1 (unused when FIRST)
    part_out_ptr,  # [B, SPLIT, N_out, D] f32 partial s of iteration r (written)
    s_buf_ptr,  # [R, B, N_out, D] f32 saved s_r (slot r-1 written here)
    vsum_buf_ptr,  # [R, B, N_out, D] f32 saved V_r (slot r written here, r-1 read)
    B,  # batch size (runtime: never a constexpr)
    N_in,
    N_out,
    D,
    D_in,
    SPLIT,  # programs per example tile along the input capsules
    caps_per_split,  # input capsules per split
    r,  # this iteration (0-based)
    stride_ub,
    stride_ui,
    stride_uk,
    stride_wi,
    stride_wj,
    stride_wd,
    stride_wk,
    BLOCK_B: tl.constexpr,  # examples per tile
    BLOCK_J: tl.constexpr,  # next power of two >= N_out (never split: the softmax couples it)
    BLOCK_D: tl.constexpr,  # next power of two >= D
    FIRST: tl.constexpr,  # r == 0: V_0 = 0, uniform coupling, no previous partials
):
    i_tb = tl.program_id(0)
    i_k = tl.program_id(1)
    caps_size = N_out * D
    o_b, m_b, m_j, o_jd, m_bjd = tile_block(i_tb, B, N_out, D, BLOCK_B, BLOCK_J, BLOCK_D)
    o_wn, _, m_n = weight_offsets(N_out, D, stride_wj, stride_wd, BLOCK_J, BLOCK_D)
    if FIRST:
        b_V = tl.zeros([BLOCK_B, BLOCK_J, BLOCK_D], dtype=tl.float32)
    else:
        b_s = sum_splits(part_in_ptr, SPLIT, caps_size, tile_offsets(o_jd, o_b * SPLIT, caps_size), m_bjd)
        b_V = tl.load(vsum_buf_ptr + tile_offsets(o_jd, (r - 1) * B + o_b, caps_size), mask=m_bjd, other=0.0)
        b_V += _squash_rows(b_s, BLOCK_B, BLOCK_J, BLOCK_D)
    if i_k == 0:  # one program per tile writes the saved state (a branch: see dynamic_routing)
        if not FIRST:
            tl.store(s_buf_ptr + tile_offsets(o_jd, (r - 1) * B + o_b, caps_size), b_s, mask=m_bjd)
        tl.store(vsum_buf_ptr + tile_offsets(o_jd, r * B + o_b, caps_size), b_V, mask=m_bjd)

    i_start = i_k * caps_per_split
    i_end = tl.minimum(i_start + caps_per_split, N_in)
    b_acc = tl.zeros([BLOCK_B, BLOCK_J, BLOCK_D], dtype=tl.float32)
    for i in range(i_start, i_end):
        b_uh = predictions(  # rank-one updates: IEEE float32 products
            u_ptr + i * tl.cast(stride_ui, tl.int64), w_ptr + i * tl.cast(stride_wi, tl.int64), o_b, m_b, o_wn, m_n,
            D_in, stride_ub, stride_uk, stride_wk, BLOCK_B, BLOCK_J, BLOCK_D, 1, False, "ieee", False,
        )
        if FIRST:
            b_acc += b_uh  # softmax of zero logits: 1 / N_out, applied once below
        else:
            b_c = softmax_over_outputs(tl.sum(b_uh * b_V, axis=2), m_j)
            b_acc += b_c[:, :, None] * b_uh
    if FIRST:
        b_acc = b_acc / N_out
    tl.store(part_out_ptr + tile_offsets(o_jd, o_b * SPLIT + i_k, caps_size), b_acc, mask=m_bjd)


@triton.jit(do_not_specialize=["B", "SPLIT", "caps_per_split", "r"])
def fused_layer_bwd_reduce_kernel(
    u_ptr,  # [B, N_in, D_in] input capsules, strides stride_u*
    w_ptr,  # [N_in, N_out, D, D_in] weight, strides stride_w*
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
    D_in,
    SPLIT,
    caps_per_split,
    r,  # the step this launch reverses, 1 <= r <= R-1
    stride_ub,
    stride_ui,
    stride_uk,
    stride_wi,
    stride_wj,
    stride_wd,
    stride_wk,
    stride_gb,
    stride_gj,
    stride_gd,
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_tb = tl.program_id(0)
    i_k = tl.program_id(1)
    caps_size = N_out * D
    o_b, m_b, m_j, o_jd, m_bjd = tile_block(i_tb, B, N_out, D, BLOCK_B, BLOCK_J, BLOCK_D)
    o_wn, _, m_n = weight_offsets(N_out, D, stride_wj, stride_wd, BLOCK_J, BLOCK_D)
    o_saved = tile_offsets(o_jd, r * B + o_b, caps_size)
    o_j = tl.arange(0, BLOCK_J)
    o_d = tl.arange(0, BLOCK_D)
    b_dv = load_prediction_tile(dv_ptr, o_b, m_bjd, o_j, o_d, stride_gb, stride_gj, stride_gd)  # [B, N_out, D] block
    b_ds = _squash_vjp_rows(tl.load(s_buf_ptr + o_saved, mask=m_bjd, other=0.0), b_dv, BLOCK_B, BLOCK_J, BLOCK_D)
    if i_k == 0:  # one program per tile saves ds_r
        tl.store(ds_buf_ptr + o_saved, b_ds, mask=m_bjd)
    b_V = tl.load(vsum_buf_ptr + o_saved, mask=m_bjd, other=0.0)

    i_start = i_k * caps_per_split
    i_end = tl.minimum(i_start + caps_per_split, N_in)
    b_acc = tl.zeros([BLOCK_B, BLOCK_J, BLOCK_D], dtype=tl.float32)
    for i in range(i_start, i_end):
        b_uh = predictions(
            u_ptr + i * tl.cast(stride_ui, tl.int64), w_ptr + i * tl.cast(stride_wi, tl.int64), o_b, m_b, o_wn, m_n,
            D_in, stride_ub, stride_uk,
            stride_wk, BLOCK_B, BLOCK_J, BLOCK_D, 1, False, "ieee", False,  # rank-one: IEEE products
        )
        b_c = softmax_over_outputs(tl.sum(b_uh * b_V, axis=2), m_j)
        b_g = softmax_over_outputs_vjp(b_c, tl.sum(b_uh * b_ds, axis=2))
        b_acc += b_g[:, :, None] * b_uh
    tl.store(dpart_ptr + tile_offsets(o_jd, o_b * SPLIT + i_k, caps_size), b_acc, mask=m_bjd)


@triton.jit(do_not_specialize=["B", "r"])
def fused_layer_bwd_ds_kernel(
    dv_ptr,  # [B, N_out, D] gradient of the lowest step's v (see the final kernel), strides stride_g*
    s_buf_ptr,  # [R, B, N_out, D] f32 saved s_r
    ds_buf_ptr,  # [R, B, N_out, D] f32 ds_r (slot r written here)
    vsum_buf_ptr,  # [R, B, N_out, D] f32 saved V_r (slot r read; PARTS only)
    vparts_ptr,  # [2, B, N_out, D] V_r's two parts (written; PARTS only)
    dsparts_ptr,  # [2, B, N_out, D] ds_r's two parts (written; DS_PARTS only)
    B,
    N_out,
    D,
    r,  # the lowest step with a gradient: 0 through routing, R-1 detached
    stride_gb,
    stride_gj,
    stride_gd,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PARTS: tl.constexpr,  # a logits pass of step r follows: V_r split for it (factor_parts)
    DS_PARTS: tl.constexpr,  # and ds_r (the pass through routing)
):
    """``ds_r = J_squash(s_r)^T dv_r`` for one example, once, instead of in every capsule's
    iteration of the final pass."""
    i_b = tl.program_id(0).to(tl.int64)
    o_j, o_d, m_j, m_jd, o_jd = caps_block(N_out, D, BLOCK_J, BLOCK_D)
    caps_size = N_out * D
    o_saved = (r * B + i_b) * caps_size + o_jd
    b_dv = load_caps_block(dv_ptr + i_b * stride_gb, o_j, o_d, m_jd, stride_gj, stride_gd)
    b_ds = squash_vjp(tl.load(s_buf_ptr + o_saved, mask=m_jd, other=0.0), b_dv)
    tl.store(ds_buf_ptr + o_saved, b_ds, mask=m_jd)
    o_part = i_b * caps_size + o_jd
    n_part = tl.cast(B, tl.int64) * caps_size  # elements a part
    if PARTS:
        _store_parts(vparts_ptr, o_part, m_jd, tl.load(vsum_buf_ptr + o_saved, mask=m_jd, other=0.0), n_part)
    if DS_PARTS:
        _store_parts(dsparts_ptr, o_part, m_jd, b_ds, n_part)


@triton.jit(do_not_specialize=["B", "caps_per_split", "tiles_per_group"])
def fused_layer_bwd_final_kernel(
    u_ptr,  # [B, N_in, D_in] input capsules, strides stride_u*
    w_ptr,  # [N_in, N_out, D, D_in] weight, strides stride_w*
    vsum_buf_ptr,  # [R, B, N_out, D] f32 saved V_r
    ds_buf_ptr,  # [R, B, N_out, D] f32 ds_r (every step through routing, else the last)
    du_ptr,  # [B, N_in, D_in] gradient of u, dtype of u, contiguous
    dw_part_ptr,  # [G, N_in, N_out, D, D_in] f32 this group's part of the weight gradient (written)
    B,
    N_in,
    N_out,
    D,
    D_in,
    R,
    caps_per_split,  # input capsules per program along axis 0
    tiles_per_group,  # example tiles per program along axis 1 (group g)
    stride_ub,
    stride_ui,
    stride_uk,
    stride_wi,
    stride_wj,
    stride_wd,
    stride_wk,
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,  # next power of two >= D_in
    GRAD_THROUGH: tl.constexpr,  # gradient through every iteration, else only the last s
):
    i_s = tl.program_id(0)
    i_g = tl.program_id(1)
    caps_size = N_out * D
    o_wn, o_n, m_n = weight_offsets(N_out, D, stride_wj, stride_wd, BLOCK_J, BLOCK_D)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < D_in
    if GRAD_THROUGH:
        r_lo = 0
    else:
        r_lo = R - 1
    tb_start = i_g * tiles_per_group
    tb_end = tl.minimum(tb_start + tiles_per_group, tl.cdiv(B, BLOCK_B))
    i_start = i_s * caps_per_split
    i_end = tl.minimum(i_start + caps_per_split, N_in)
    for i in range(i_start, i_end):
        p_u = u_ptr + i * tl.cast(stride_ui, tl.int64)
        p_w = w_ptr + i * tl.cast(stride_wi, tl.int64)
        p_dw = dw_part_ptr + (i_g * N_in + i) * tl.cast(caps_size * D_in, tl.int64)
        # rank-one products (IEEE float32), dW[i] of the group accumulated in its part in memory
        b_wt, b_dw = layer_weight_tile(p_w, o_k, o_wn, m_n, D_in, stride_wk, BLOCK_J, BLOCK_D, BLOCK_K, False)
        for tb in range(tb_start, tb_end):
            o_b, m_b, m_j, o_jd, m_bjd = tile_block(tb, B, N_out, D, BLOCK_B, BLOCK_J, BLOCK_D)
            b_uh, b_u = layer_predictions(
                p_u, p_w, b_wt, o_b, m_b, o_k, o_wn, m_n, D_in, stride_ub, stride_uk, stride_wk,
                BLOCK_B, BLOCK_J, BLOCK_D, BLOCK_K, False, "ieee", False,
            )
            b_ds = tl.load(ds_buf_ptr + tile_offsets(o_jd, r_lo * B + o_b, caps_size), mask=m_bjd, other=0.0)
            if GRAD_THROUGH:
                # step 0: V_0 = 0, so c_0 = 1 / N_out and no logit-gradient term
                b_duh = b_ds / N_out
                for r in range(1, R):
                    o_r = tile_offsets(o_jd, r * B + o_b, caps_size)
                    b_V = tl.load(vsum_buf_ptr + o_r, mask=m_bjd, other=0.0)
                    b_ds = tl.load(ds_buf_ptr + o_r, mask=m_bjd, other=0.0)
                    b_c = softmax_over_outputs(tl.sum(b_uh * b_V, axis=2), m_j)
                    b_g = softmax_over_outputs_vjp(b_c, tl.sum(b_uh * b_ds, axis=2))
                    b_duh += b_c[:, :, None] * b_ds + b_g[:, :, None] * b_V
            else:
                b_V = tl.load(vsum_buf_ptr + tile_offsets(o_jd, r_lo * B + o_b, caps_size), mask=m_bjd, other=0.0)
                b_duh = softmax_over_outputs(tl.sum(b_uh * b_V, axis=2), m_j)[:, :, None] * b_ds
            b_dw = layer_input_grads(
                tl.reshape(b_duh, [BLOCK_B, BLOCK_J * BLOCK_D]), b_u, b_wt, b_dw, p_u, p_w, p_dw,
                du_ptr + o_b * (N_in * D_in) + i * D_in, o_b, m_b, o_k, m_k, o_wn, o_n, m_n, D_in,
                stride_ub, stride_uk, stride_wk, False, False, "ieee", False,
            )


# ---------------------------------------------------------------------------------------------
# The forward on tensor cores, in input-capsule space: the routing arithmetic on [examples x
# (input capsule, D_in)] tiles, one output capsule j at a time, never on [examples x N_out x D]
# blocks of predictions. For one output capsule j and a run of input capsules:
#
#     logits   b[b, i, j] = u_hat[b, i, j] . V[b, j] = u[b, i] . (W[i, j]^T V[b, j])
#              Z_j = V_j @ W_j            [BLOCK_B, D] x [D, (i, k)]   (tensor cores; the columns
#                                         ordered (k, i) where a chunk has 8 capsules or more)
#              b[:, i, j] = sum_k u[:, i, k] Z_j[:, i, k]
#     sums     s[b, j] = sum_i c[b, i, j] W[i, j] u[b, i] = X_j @ W_j^T,
#              X_j[b, (i, k)] = c[b, i, j] u[b, i, k]   [BLOCK_B, (i, k)] x [(i, k), D]  (tensor cores)
#
# so the elementwise work is on D_in numbers per (example, input capsule, output capsule) instead
# of D_out, the products run on tensor cores with K = D_out and K = (input capsules x D_in), and
# no tile of predictions or padded output capsules is held in registers. The softmax over j
# couples the output capsules: ``fused_layer_logits_kernel`` writes the coupling coefficients of
# a run of input capsules for every j (logits, their softmax over j in place), then
# ``fused_layer_sums_kernel`` reads those of one output capsule and forms the partial sums of it
# over runs of its own (longer than the logits pass's: the output capsules are its third grid
# axis). Iteration 0 couples uniformly: ``fused_layer_uniform_sums_kernel`` forms s_0 as the one
# product u @ W^T over blocks of every output capsule's outputs. ``fused_layer_state_kernel``
# reduces the partials of the previous iteration per example (in split order), squashes and
# writes the saved s and V.
# bfloat16 inputs (``HALF``): the float32 factors (V, X) enter the products as two bfloat16 parts
# (hi + lo: ``half_parts``, about 15 significant bits), each multiplied exactly on tensor cores,
# so nothing is rounded to the input dtype. (float16 inputs run as float32 at 3xTF32: the ops
# layer's ``float16_as_float32``.) The logits pass's V_r and ds_r
# (with float32 at 3xTF32 too) come split already (``factor_parts``, ``dot_parts``): the kernels
# that form them per example (``fused_layer_state_kernel``, ``fused_layer_bwd_ds_kernel``) write
# their two parts, instead of every (chunk, output capsule) of the pass splitting them again.
# With bfloat16 inputs X = c u (and g u, here and in the weight gradient) is formed in those two
# parts directly by packed half arithmetic from c's parts and u (``half_products``: three fused
# multiply-adds a pair of elements, about 13.7 significant bits), not as a float32 product split
# afterwards.


@triton.jit
def _caps_chunk(i0, i_end, BLOCK_IC: tl.constexpr, BLOCK_KIN: tl.constexpr):
    """A chunk of ``BLOCK_IC`` input capsules from ``i0`` flattened with their components
    (``c = i * BLOCK_KIN + k``): capsule index ``o_i`` [BLOCK_IC * BLOCK_KIN], ``o_k`` and the mask,
    a bound on ``c`` (constant over each capsule's components: the loads are vectorised)."""
    o_c = tl.arange(0, BLOCK_IC * BLOCK_KIN)
    return i0 + o_c // BLOCK_KIN, o_c % BLOCK_KIN, o_c < (i_end - i0) * BLOCK_KIN


@triton.jit
def _u_chunk(u_ptr, o_b, m_b, i0, m_c, stride_ub, BLOCK_IC: tl.constexpr, BLOCK_KIN: tl.constexpr):
    """u[b, i, k] of the tile and the chunk, [BLOCK_B, BLOCK_IC * BLOCK_KIN], zero padded (u's
    capsules contiguous, BLOCK_KIN components each)."""
    o_c = tl.cast(i0, tl.int64) * BLOCK_KIN + tl.arange(0, BLOCK_IC * BLOCK_KIN)
    return tl.load(u_ptr + o_b[:, None] * stride_ub + o_c[None, :], mask=m_b[:, None] & m_c[None, :], other=0.0)


@triton.jit
def _w_chunk(w_ptr, j, o_i, o_k, m_c, D, stride_wi, stride_wj, BLOCK_DK: tl.constexpr, BLOCK_KIN: tl.constexpr):
    """W[i, j, d, k] of the chunk for output capsule j, [BLOCK_DK, BLOCK_IC * BLOCK_KIN] (each [D,
    BLOCK_KIN] block of W contiguous)."""
    o_d = tl.arange(0, BLOCK_DK)
    return _w_rows(w_ptr, j * stride_wj + o_d * BLOCK_KIN, o_d < D, o_i, o_k, m_c, stride_wi)


@triton.jit
def _w_rows(w_ptr, o_wn, m_n, o_i, o_k, m_c, stride_wi):
    """Rows ``o_wn`` (offsets of W[0, j, d, 0], mask ``m_n``) of W over the chunk's (capsule,
    component) columns: [rows, BLOCK_IC * BLOCK_KIN], zero padded; the logits pass loads u's
    capsule-major chunks with it too (rows ``b * stride_ub``, capsules ``stride_wi = BLOCK_KIN`` apart)."""
    o_w = o_wn[:, None] + (o_i.to(tl.int64) * stride_wi + o_k)[None, :]
    return tl.load(w_ptr + o_w, mask=m_n[:, None] & m_c[None, :], other=0.0)


@triton.jit
def _dot_split(
    b_a, b_w, HALF: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr, RIGHT: tl.constexpr = False
):
    """``a @ w`` (``RIGHT``: ``w @ a``) in float32 for a float32 ``a`` and ``w`` of the input dtype:
    with half inputs ``a`` enters as hi + lo parts of that dtype (two exact tensor-core products),
    else as float32 at ``PRECISION``."""
    if HALF:
        b_hi, b_lo = half_parts(b_a, b_w.dtype)
        b_out = _dot_sided(b_hi, b_w, PRECISION, DOT_F32, RIGHT) + _dot_sided(b_lo, b_w, PRECISION, DOT_F32, RIGHT)
    else:
        b_out = _dot_sided(b_a, b_w, PRECISION, DOT_F32, RIGHT)
    return b_out


@triton.jit
def _dot_sided(b_a, b_w, PRECISION: tl.constexpr, DOT_F32: tl.constexpr, RIGHT: tl.constexpr):
    if RIGHT:
        b_out = dot_f32(b_w, b_a, PRECISION, DOT_F32)
    else:
        b_out = dot_f32(b_a, b_w, PRECISION, DOT_F32)
    return b_out


@triton.jit
def _oriented(b_x, CHUNK_M: tl.constexpr):
    """A [examples x chunk] block of the final pass as it is accumulated: transposed when CHUNK_M."""
    if CHUNK_M:
        b_x = tl.trans(b_x)
    return b_x


@triton.jit
def _oriented_product(
    b_y, b_w, HALF: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr, CHUNK_M: tl.constexpr
):
    """``y @ w`` [examples x chunk] for float32 rows ``y`` [examples x D] and a W chunk [D x chunk];
    ``CHUNK_M``: its transpose ``w^T @ y^T``, the chunk as the product's M. On sm_90 a product of M
    64 or more runs as the warpgroup MMA (wgmma, twice mma.sync's rate), which the final pass's
    16 examples a program cannot feed (64 examples spilled)."""
    if CHUNK_M:
        b_out = _dot_split(tl.trans(b_y), tl.trans(b_w), HALF, PRECISION, DOT_F32, True)
    else:
        b_out = _dot_split(b_y, b_w, HALF, PRECISION, DOT_F32)
    return b_out


@triton.jit
def _caps_rows(p_x, o_b, m_b, D, stride_xb, BLOCK_DK: tl.constexpr):
    """[BLOCK_B, BLOCK_DK] rows of one output capsule of a [.., N_out, D] buffer (V, ds, their parts):
    ``p_x`` at its example 0, rows ``stride_xb`` apart, zero padded."""
    o_d = tl.arange(0, BLOCK_DK)
    return tl.load(p_x + o_b[:, None] * stride_xb + o_d[None, :], mask=m_b[:, None] & (o_d < D)[None, :], other=0.0)


@triton.jit
def _per_component(b_x, BLOCK_B: tl.constexpr, BLOCK_IC: tl.constexpr, BLOCK_KIN: tl.constexpr):
    """A [BLOCK_B, BLOCK_IC] per-capsule block repeated over each capsule's components:
    [BLOCK_B, BLOCK_IC * BLOCK_KIN], as the sums and final passes lay out the chunks of u
    (capsule-major)."""
    if BLOCK_KIN > 1:
        b_x = tl.reshape(tl.broadcast_to(b_x[:, :, None], [BLOCK_B, BLOCK_IC, BLOCK_KIN]),
                         [BLOCK_B, BLOCK_IC * BLOCK_KIN])
    return b_x


@triton.jit
def _slot_buffers(c_ptr, g_ptr, slot, B, N_out, N_in):
    """The two [S, B, N_out, N_in] coupling buffers (coefficients, logit gradients) at ``slot``."""
    slot = tl.cast(slot, tl.int64) * B * N_out * N_in
    return c_ptr + slot, g_ptr + slot


@triton.jit
def _coupling_tile(p_x, o_e, m_bi, BLOCK_B: tl.constexpr, BLOCK_IC: tl.constexpr, BLOCK_KIN: tl.constexpr):
    """The coupling coefficients (or logit gradients) of a chunk and output capsule as
    ``fused_layer_logits_kernel`` stored them (offsets ``o_e`` into a [B, N_out, N_in] buffer),
    repeated over each capsule's components: [BLOCK_B, BLOCK_IC * BLOCK_KIN]."""
    return _per_component(tl.load(p_x + o_e, mask=m_bi, other=0.0), BLOCK_B, BLOCK_IC, BLOCK_KIN)


@triton.jit
def _chunk_logits(
    b_u, b_w, p_V, n_part, o_b, m_b, D, stride_vb, HALF: tl.constexpr, PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr, PARTS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_IC: tl.constexpr,
    BLOCK_KIN: tl.constexpr, BLOCK_DK: tl.constexpr,
):
    """Logits [BLOCK_B, BLOCK_IC] of one output capsule j for the chunk: ``u . (W^T V_j)``, from the
    u chunk, the W chunk of j (both ordered by ``_logits_operand``) and ``p_V`` at V[0, j, 0] (rows
    ``stride_vb`` apart): float32, or with ``PARTS`` its hi part there and its lo part ``n_part``
    elements on (``factor_parts``, split once by the kernel that formed V)."""
    if PARTS:
        b_z = dot_parts(_caps_rows(p_V, o_b, m_b, D, stride_vb, BLOCK_DK),
                        _caps_rows(p_V + n_part, o_b, m_b, D, stride_vb, BLOCK_DK), b_w, DOT_F32)
    else:
        b_z = _dot_split(_caps_rows(p_V, o_b, m_b, D, stride_vb, BLOCK_DK), b_w, HALF, PRECISION, DOT_F32)
    return _component_dots(b_u, b_z, BLOCK_IC, BLOCK_KIN)


@triton.jit
def _logits_operand(p_x, o_rows, m_rows, i0, i_end, stride_i, BLOCK_IC: tl.constexpr, BLOCK_KIN: tl.constexpr):
    """The chunk of u or of W_j at input capsule ``i0`` as the logits pass orders it, [rows,
    BLOCK_KIN * BLOCK_IC], zero padded, from the elements ``p_x + o_rows[row] + i * stride_i + k``
    (capsule i's component k): component-major, column ``k * BLOCK_IC + i``, for chunks of 8
    capsules or more (loaded as [rows, BLOCK_KIN, BLOCK_IC], contiguous along the components: vector
    loads, then reshaped), else capsule-major, ``i * BLOCK_KIN + k``, as the other passes load it
    (``_component_dots``)."""
    if BLOCK_IC >= 8:
        o_ic = i0 + tl.arange(0, BLOCK_IC)
        o_k = tl.arange(0, BLOCK_KIN)
        o_x = o_rows[:, None, None] + o_k[None, :, None] + (o_ic.to(tl.int64) * stride_i)[None, None, :]
        b_x = tl.load(p_x + o_x, mask=m_rows[:, None, None] & (o_ic < i_end)[None, None, :], other=0.0)
        b_x = tl.reshape(b_x, [o_rows.shape[0], BLOCK_KIN * BLOCK_IC])
    else:
        o_i, o_k, m_c = _caps_chunk(i0, i_end, BLOCK_IC, BLOCK_KIN)
        b_x = _w_rows(p_x, o_rows, m_rows, o_i, o_k, m_c, stride_i)
    return b_x


@triton.jit
def _component_dots(b_u, b_z, BLOCK_IC: tl.constexpr, BLOCK_KIN: tl.constexpr):
    """[rows, BLOCK_IC] dot products over each capsule's components of two blocks ordered as
    ``_logits_operand`` orders them (``u`` of the input dtype, ``z`` float32): ``u_0 z_0``, then
    one fused multiply-add a component, in component order (a product summed as a tree took 11
    instructions for 8 components, the chain 8). Component-major, capsule i's components are
    column i mod 8 of 8-column blocks of the MMA accumulator (every block for 8 capsules, every
    other one for 16), and a thread holds two adjacent columns of every block: the chain is
    in-thread. With fewer than 8 capsules a chunk (capsule-major) Triton gathers each capsule's
    components into a thread for the split; the kernel report shows no shuffles either way (the
    sum across lanes took 160 a thread and chunk in the 16-component layer's logits pass)."""
    us = _components(b_u.to(tl.float32), BLOCK_IC, BLOCK_KIN)
    zs = _components(b_z, BLOCK_IC, BLOCK_KIN)
    b_dot = us[0] * zs[0]
    for k in tl.static_range(1, BLOCK_KIN):
        b_dot = tl.fma(us[k], zs[k], b_dot)
    return b_dot


@triton.jit
def _components(b_x, BLOCK_IC: tl.constexpr, BLOCK_KIN: tl.constexpr):
    """A block ordered as ``_logits_operand`` orders it as a tuple of ``BLOCK_KIN`` [rows,
    BLOCK_IC] blocks, component k of every capsule at index k (component-major, in a chunk's MMA
    accumulator, the components lie in one thread's registers: splitting them moves no data)."""
    rows: tl.constexpr = b_x.shape[0]
    if BLOCK_IC >= 8:
        b_x = tl.permute(tl.reshape(b_x, [rows, BLOCK_KIN, BLOCK_IC]), (0, 2, 1))
    else:
        b_x = tl.reshape(b_x, [rows, BLOCK_IC, BLOCK_KIN])
    tl.static_assert(BLOCK_KIN <= 256, "components of a capsule: at most 2^8")
    parts = (b_x,)
    for _ in tl.static_range(8):  # halved while more than one component a part
        if parts[0].shape[2] > 1:
            halves = ()
            for p in tl.static_range(len(parts)):
                b_first, b_second = _halves(parts[p])
                halves = halves + (b_first, b_second)
            parts = halves
    blocks = ()
    for p in tl.static_range(len(parts)):
        blocks = blocks + (tl.reshape(parts[p], [rows, BLOCK_IC]),)
    return blocks


@triton.jit
def _halves(b_x):
    """[rows, cols, n] as its components below n / 2 and from n / 2, [rows, cols, n / 2] each."""
    n: tl.constexpr = b_x.shape[2]
    b_x = tl.permute(tl.reshape(b_x, [b_x.shape[0], b_x.shape[1], 2, n // 2]), (0, 1, 3, 2))
    return tl.split(b_x)


@triton.jit(do_not_specialize=["B", "SPLIT", "r"])
def fused_layer_state_kernel(
    part_ptr,  # [B, SPLIT, N_out, D] f32 partial s of iteration r-1
    s_buf_ptr,  # [R, B, N_out, D] f32 saved s_r (slot r-1 written here)
    vsum_buf_ptr,  # [R, B, N_out, D] f32 saved V_r (slot r written, r-1 read)
    vparts_ptr,  # [2, B, N_out, D] V_r's two parts for the logits pass (written; PARTS only)
    B,
    N_out,
    D,
    SPLIT,
    r,  # 1 <= r <= R-1
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PARTS: tl.constexpr,
):
    """Per example: ``s_{r-1}`` = the partials in split order, ``V_r = V_{r-1} + squash(s_{r-1})``;
    ``PARTS``: also V_r split into the two parts its products take (``factor_parts``)."""
    i_b = tl.program_id(0).to(tl.int64)
    o_j, o_d, m_j, m_jd, o_jd = caps_block(N_out, D, BLOCK_J, BLOCK_D)
    caps_size = N_out * D
    b_s = sum_splits(part_ptr + i_b * SPLIT * caps_size, SPLIT, caps_size, o_jd, m_jd)
    b_unit, b_p, large = squash_parts(b_s)
    o_prev = ((r - 1) * B + i_b) * caps_size + o_jd
    b_V = tl.load(vsum_buf_ptr + o_prev, mask=m_jd, other=0.0) + squash_from_parts(b_unit, b_p, large)
    tl.store(s_buf_ptr + o_prev, b_s, mask=m_jd)
    n_slot = tl.cast(B, tl.int64) * caps_size  # elements a slot (and a part)
    tl.store(vsum_buf_ptr + o_prev + n_slot, b_V, mask=m_jd)
    if PARTS:
        _store_parts(vparts_ptr, i_b * caps_size + o_jd, m_jd, b_V, n_slot)


@triton.jit
def _store_parts(p_parts, o, m, b_x, n):
    """float32 ``x`` at ``p_parts + o`` as its two parts (``factor_parts`` for the buffer's dtype):
    ``hi`` there, ``lo`` ``n`` elements on."""
    b_hi, b_lo = factor_parts(b_x, p_parts.dtype.element_ty)
    tl.store(p_parts + o, b_hi, mask=m)
    tl.store(p_parts + n + o, b_lo, mask=m)


# N_in not specialised: with N_in = 1 a compile-time constant the chunk loop vanished and ptxas,
# free to hoist every output capsule's loads, spilled the logits in registers (104 bytes on sm_90)
@triton.jit(do_not_specialize=["B", "N_in", "caps_per_split", "r", "slot"])
def fused_layer_logits_kernel(
    u_ptr,  # [B, N_in, BLOCK_KIN] input capsules (D_in zero padded), capsules contiguous
    w_ptr,  # [N_in, N_out, D, BLOCK_KIN] weight (D_in zero padded), dtype of u, [D, BLOCK_KIN] blocks contiguous
    v_ptr,  # V_r: [R, B, N_out, D] f32 the saved V (slot r read); PARTS: [2, B, N_out, D] its two parts (r = 0)
    c_ptr,  # [S, B, N_out, N_in] f32 the coupling coefficients of iteration r (slot written)
    ds_ptr,  # ds_r as V_r (slot r read; GRAD only)
    g_ptr,  # [S, B, N_out, N_in] f32 the logit gradients g = c (a - sum_j c a) (slot written; GRAD only)
    B,
    N_in,
    N_out,
    D,
    caps_per_split,
    r,  # the slot of V_r and ds_r in their buffers
    slot,  # the slot of the coupling buffers
    stride_ub,
    stride_wi,
    stride_wj,
    BLOCK_B: tl.constexpr,
    BLOCK_IC: tl.constexpr,  # input capsules a chunk
    BLOCK_KIN: tl.constexpr,  # next power of two >= D_in
    BLOCK_DK: tl.constexpr,  # next power of two >= D, at least 16 (the logits product's K)
    HALF: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    GRAD: tl.constexpr,  # the backward through step r: also a = u_hat . ds_r and sum_j c a
    PARTS: tl.constexpr,  # V_r and ds_r come as their two parts (``factor_parts``)
    N_OUT: tl.constexpr = 0,  # N_out (the launch passes both), for the logits in registers (not GRAD); 0: loops
):
    """The coupling coefficients of iteration r for the tile and a run of input capsules, stored
    as ``c[b, j, i]`` for the passes that read them: per chunk, three loops over the output
    capsules, each over the values the one before stored in place (the program's own chunk, in
    L2): the logits of every output capsule and their running maximum; ``e = exp(logit - max)``
    and ``inv = 1 / sum_j e``; ``c = e * inv``. Where the softmax saturates e is exactly 1 for the
    largest logit and 0 elsewhere, so c is exactly one-hot. ``GRAD``: also the agreements with the
    gradient of s, ``a = u . (W^T ds_r)``, and ``m = sum_j c a``, then the logit gradients
    ``g = c (a - m)`` in place of the agreements, exactly 0 where the softmax saturates (as
    softmax_over_outputs_vjp). ``N_OUT`` (without ``GRAD``, up to ``LOGITS_IN_REGISTERS`` output
    capsules): the loops unrolled and the logits kept in registers instead of the round trips
    through memory (``_chunk_coefficients``; V's parts loaded once, ``_factor_rows``), the same
    operations in the same order, so the same coefficients, bit for bit."""
    i_tb = tl.program_id(0)
    i_k = tl.program_id(1)
    o_b = (i_tb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    m_b = o_b < B
    n_part = tl.cast(B, tl.int64) * N_out * D  # elements a part (or a slot)
    p_V = v_ptr + r * n_part * (2 if PARTS else 1)
    p_ds = ds_ptr + r * n_part * (2 if PARTS else 1)
    c_ptr, g_ptr = _slot_buffers(c_ptr, g_ptr, slot, B, N_out, N_in)
    i_start = i_k * caps_per_split
    i_end = tl.minimum(i_start + caps_per_split, N_in)
    o_d = tl.arange(0, BLOCK_DK)
    o_ub = o_b * stride_ub
    if N_OUT > 0:
        tl.static_assert(not GRAD and PARTS, "the logits in registers: coefficients only, V as its two parts")
        v_parts = _factor_rows(p_V, n_part, o_b, m_b, D, N_OUT, BLOCK_DK)
    for i0 in range(i_start, i_end, BLOCK_IC):
        o_ic = i0 + tl.arange(0, BLOCK_IC)
        b_u = _logits_operand(u_ptr, o_ub, m_b, i0, i_end, BLOCK_KIN, BLOCK_IC, BLOCK_KIN)
        m_bi = m_b[:, None] & (o_ic < i_end)[None, :]
        o_e = o_b[:, None] * N_out * N_in + o_ic[None, :]  # c[b, 0, i]
        if N_OUT > 0:
            coefficients = _chunk_coefficients(b_u, w_ptr, v_parts, c_ptr, B, o_d, i0, i_end, D, stride_wi, stride_wj,
                                               N_OUT, DOT_F32, BLOCK_B, BLOCK_IC, BLOCK_KIN)
            for j in tl.static_range(N_OUT):
                tl.store(c_ptr + o_e + j * N_in, coefficients[j], mask=m_bi)
        else:
            b_max = tl.full([BLOCK_B, BLOCK_IC], float("-inf"), tl.float32)
            for j in range(0, N_out):
                b_w = _logits_operand(w_ptr + j * stride_wj, o_d * BLOCK_KIN, o_d < D, i0, i_end, stride_wi,
                                      BLOCK_IC, BLOCK_KIN)
                b_logit = _chunk_logits(b_u, b_w, p_V + j * D, n_part, o_b, m_b, D, N_out * D, HALF, PRECISION,
                                        DOT_F32, PARTS, BLOCK_B, BLOCK_IC, BLOCK_KIN, BLOCK_DK)
                tl.store(c_ptr + o_e + j * N_in, b_logit, mask=m_bi)
                b_max = tl.maximum(b_max, b_logit)
                if GRAD:
                    b_a = _chunk_logits(b_u, b_w, p_ds + j * D, n_part, o_b, m_b, D, N_out * D, HALF, PRECISION,
                                        DOT_F32, PARTS, BLOCK_B, BLOCK_IC, BLOCK_KIN, BLOCK_DK)
                    tl.store(g_ptr + o_e + j * N_in, b_a, mask=m_bi)
            tl.debug_barrier()  # the logits stored above are read back by other threads of the program
            b_sum = tl.zeros([BLOCK_B, BLOCK_IC], dtype=tl.float32)
            b_ca = tl.zeros([BLOCK_B, BLOCK_IC], dtype=tl.float32)
            for j in range(0, N_out):
                b_e = _exp(tl.load(c_ptr + o_e + j * N_in, mask=m_bi, other=0.0) - b_max, DOT_F32)
                tl.store(c_ptr + o_e + j * N_in, b_e, mask=m_bi)
                b_sum += b_e
                if GRAD:
                    b_ca += b_e * tl.load(g_ptr + o_e + j * N_in, mask=m_bi, other=0.0)
            b_inv = tl.math.div_rn(1.0, b_sum)
            b_mean = b_ca * b_inv
            tl.debug_barrier()  # read back as stored above (by other threads, should the layouts differ)
            for j in range(0, N_out):
                b_c = tl.load(c_ptr + o_e + j * N_in, mask=m_bi, other=0.0) * b_inv
                tl.store(c_ptr + o_e + j * N_in, b_c, mask=m_bi)
                if GRAD:
                    b_a = tl.load(g_ptr + o_e + j * N_in, mask=m_bi, other=0.0) - b_mean
                    tl.store(g_ptr + o_e + j * N_in, tl.where(b_c < 1.0, b_c * b_a, 0.0), mask=m_bi)


@triton.jit
def _factor_rows(p_V, n_part, o_b, m_b, D, N_OUT: tl.constexpr, BLOCK_DK: tl.constexpr):
    """V's two parts (``factor_parts``: hi at ``p_V``, lo ``n_part`` elements on, [.., N_OUT, D]
    rows) for the tile's examples, every output capsule's: a tuple of ``N_OUT`` (hi, lo) pairs of
    [BLOCK_B, BLOCK_DK] blocks, loaded once for all chunks (the compiler keeps them in shared
    memory, as the products' operands: 4 KB a capsule at 64 examples)."""
    parts = ()
    for j in tl.static_range(N_OUT):
        b_hi = _caps_rows(p_V + j * D, o_b, m_b, D, N_OUT * D, BLOCK_DK)
        b_lo = _caps_rows(p_V + n_part + j * D, o_b, m_b, D, N_OUT * D, BLOCK_DK)
        parts = parts + ((b_hi, b_lo),)
    return parts


@triton.jit
def _chunk_coefficients(
    b_u, w_ptr, v_parts, p_fence, B, o_d, i0, i_end, D, stride_wi, stride_wj, N_OUT: tl.constexpr,
    DOT_F32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_IC: tl.constexpr, BLOCK_KIN: tl.constexpr,
    W_CHUNKS: tl.constexpr = False,
):
    """The coupling coefficients of a chunk, a tuple of ``N_OUT`` [BLOCK_B, BLOCK_IC] blocks, from
    its u (``_logits_operand``), V's parts (``_factor_rows``) and W at ``w_ptr``, in the weight's
    own layout (strides ``stride_wi``, ``stride_wj``) or with ``W_CHUNKS`` in chunks
    (``_weight_chunk``; the same numbers in the same order): the logits of the output
    capsules unrolled and kept in registers (each as ``_chunk_logits`` forms it from V's parts),
    their running maximum, then the exponentials, their sum and c, as the logits pass's loops
    through memory compute them: the same operations in the same order (the same coefficients,
    bit for bit: ``test_logits_in_registers_are_the_loops_bit_for_bit``). Each logit passes through
    ``_consumed`` (its fence a store never made to ``p_fence``), which holds ptxas to forming it
    before the next capsule's product: left to itself ptxas issued five capsules' products ahead,
    five [64 x 64] float32 accumulators at once, and spilled (bench/results/kernel_report/NOTES.md)."""
    b_max = tl.full([BLOCK_B, BLOCK_IC], float("-inf"), tl.float32)
    logits = ()
    for j in tl.static_range(N_OUT):
        if W_CHUNKS:
            b_w = _weight_chunk(w_ptr, i0, j, N_OUT, BLOCK_IC, BLOCK_KIN, o_d.shape[0])
        else:
            b_w = _logits_operand(w_ptr + j * stride_wj, o_d * BLOCK_KIN, o_d < D, i0, i_end, stride_wi, BLOCK_IC,
                                  BLOCK_KIN)
        b_hi, b_lo = v_parts[j]
        b_logit = _component_dots(b_u, dot_parts(b_hi, b_lo, b_w, DOT_F32), BLOCK_IC, BLOCK_KIN)
        b_logit = _consumed(b_logit, p_fence, B, DOT_F32)
        b_max = tl.maximum(b_max, b_logit)
        logits = logits + (b_logit,)
    exps = ()
    b_sum = tl.zeros([BLOCK_B, BLOCK_IC], dtype=tl.float32)
    for j in tl.static_range(N_OUT):
        b_e = _exp(logits[j] - b_max, DOT_F32)
        b_sum += b_e
        exps = exps + (b_e,)
    b_inv = tl.math.div_rn(1.0, b_sum)
    coefficients = ()
    for j in tl.static_range(N_OUT):
        coefficients = coefficients + (exps[j] * b_inv,)
    return coefficients


@triton.jit
def _exp(b_x, INTERPRETED: tl.constexpr):
    """``e^x`` of float32 ``x`` as ``tl.exp`` computes it (``2^(x log2 e)`` by ``ex2.approx``), its
    subnormal results flushed to zero (``.ftz``: two instructions, where ``tl.exp``'s subnormal
    range took five, a compare and two predicated multiplies around the ``ex2``). For the softmax
    over output capsules: ``x = logit - max <= 0``, and an ``e`` below 2^-126 is a coefficient
    that vanishes next to the largest one's 1 either way. Triton's interpreter (``INTERPRETED``:
    the ``DOT_F32`` flag) runs no PTX: ``tl.exp2`` there."""
    b_x = b_x * 1.4426950408889634
    if INTERPRETED:
        b_e = tl.exp2(b_x)
    else:
        b_e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [b_x], dtype=tl.float32,
                                        is_pure=True, pack=1)
    return b_e


@triton.jit
def _consumed(b_x, p_any, B, INTERPRETED: tl.constexpr):
    """``b_x`` (float32) itself, through an ordering fence for ptxas: a store of it to ``p_any``
    under a predicate that is never true (``B < 0``: the batch size, which the kernel never
    specialises, so neither LLVM nor ptxas can know it), which ptxas must still issue before the
    next barrier, so ``b_x`` must be formed by then. Four elements a store (one vector store and
    its predicate a thread and output capsule at the logits' [64 x 8] blocks; one store an element
    took a branch around each pair and a reload of the address: 9 instructions against 2; Triton
    pads a thread's elements to a multiple of four with undefined ones, which are never stored
    either). Skipped by Triton's interpreter (``INTERPRETED``: the ``DOT_F32`` flag), which runs
    no PTX; the value is the same."""
    if not INTERPRETED:
        # one address (one register pair), as an integer: triton 3.6 refuses a pointer beside floats
        p_never = (p_any + tl.zeros(b_x.shape, tl.int32)).to(tl.int64)
        b_never = (tl.zeros(b_x.shape, tl.int32) + B) < 0
        b_x = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u32 p, $12, 0; @p st.global.v4.b32 [$8], {$4, $5, $6, $7}; "
            "mov.b32 $0, $4; mov.b32 $1, $5; mov.b32 $2, $6; mov.b32 $3, $7; }",
            "=r,=r,=r,=r,r,r,r,r,l,l,l,l,r,r,r,r", [b_x, p_never, b_never.to(tl.int32)], dtype=tl.float32,
            is_pure=True, pack=4,
        )
    return b_x


@triton.jit
def _whole(m, WHOLE: tl.constexpr):
    """The mask ``m``, or where ``WHOLE`` a constant all-true one (the compiler drops it)."""
    if WHOLE:
        m = tl.full(m.shape, 1, tl.int1)
    return m


@triton.jit
def _sums_chunk(
    b_acc, b_nacc, u_ptr, w_ptr, p_x, o_b, m_b, i0, i_end, j, N_out, N_in, o_d, D, stride_ub, stride_wi, stride_wj,
    BLOCK_IC: tl.constexpr, BLOCK_KIN: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    WHOLE: tl.constexpr,
):
    """``b_acc + (x u) W_j^T`` for the chunk at ``i0`` (x the coupling tile at ``p_x``); with
    bfloat16 inputs ``b_acc - b_nacc`` is that sum (``_coupled_parts``). ``WHOLE``: the chunk holds
    ``BLOCK_IC`` capsules and ``o_b``, ``o_d`` lie in range: loads without masks."""
    o_i, o_k, m_c = _caps_chunk(i0, i_end, BLOCK_IC, BLOCK_KIN)
    o_ic = i0 + tl.arange(0, BLOCK_IC)
    m_b = _whole(m_b, WHOLE)
    m_c = _whole(m_c, WHOLE)
    b_u = _u_chunk(u_ptr, o_b, m_b, i0, m_c, stride_ub, BLOCK_IC, BLOCK_KIN)
    b_w = _w_rows(w_ptr, j * stride_wj + o_d * BLOCK_KIN, _whole(o_d < D, WHOLE), o_i, o_k, m_c, stride_wi)
    m_bi = m_b[:, None] & _whole(o_ic < i_end, WHOLE)[None, :]
    o_e = (o_b[:, None] * N_out + j) * N_in + o_ic[None, :]
    if b_u.dtype == tl.bfloat16:
        # the hi parts' product goes to b_nacc, negated (_coupled_parts)
        b_nhi, b_lo = _coupled_parts(p_x, o_e, m_bi, b_u, BLOCK_IC, BLOCK_KIN, DOT_F32)
        b_acc = _dot_acc(b_lo, tl.trans(b_w), b_acc, DOT_F32)
        b_nacc = _dot_acc(b_nhi, tl.trans(b_w), b_nacc, DOT_F32)
    else:
        tl.static_assert(b_u.dtype == tl.float32, "float32 or bfloat16 inputs (float16 runs as float32)")
        b_x = _coupling_tile(p_x, o_e, m_bi, o_b.shape[0], BLOCK_IC, BLOCK_KIN) * b_u
        b_acc += dot_f32(b_x, tl.trans(b_w), PRECISION, DOT_F32)
    return b_acc, b_nacc


@triton.jit
def _coupled_parts(p_x, o_e, m_bi, b_u, BLOCK_IC: tl.constexpr, BLOCK_KIN: tl.constexpr, DOT_F32: tl.constexpr):
    """``x u`` for the coupling tile x at ``p_x`` (offsets ``o_e``, mask ``m_bi``, [rows, BLOCK_IC])
    and a bfloat16 u chunk [rows, BLOCK_IC * BLOCK_KIN] (capsule-major) as ``half_products``' two
    numbers ``(-hi, lo)``: x split once a coefficient, then repeated over the components."""
    b_nhi, b_hi, b_lo = coefficient_parts(tl.load(p_x + o_e, mask=m_bi, other=0.0))
    rows: tl.constexpr = b_u.shape[0]
    return half_products(
        _per_component(b_nhi, rows, BLOCK_IC, BLOCK_KIN),
        _per_component(b_hi, rows, BLOCK_IC, BLOCK_KIN),
        _per_component(b_lo, rows, BLOCK_IC, BLOCK_KIN),
        b_u,
        DOT_F32,
    )


@triton.jit
def _weight_grad_terms(
    b_dw, b_ndw, p_x, o_e, m_bi, b_u, b_y, BLOCK_IC: tl.constexpr, BLOCK_KIN: tl.constexpr, PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """``dw += (x u)^T y`` for the coupling tile x at ``p_x`` and the float32 rows ``y`` (ds or V).
    bfloat16 inputs: ``dw - ndw`` is the sum, ``x u`` as ``_coupled_parts`` (hi negated, into
    ``ndw``), ``y`` as ``half_parts``; three exact products, the lo x lo one dropped (about 2^-14
    of a term, each lo about 2^-7 of its factor or less)."""
    if b_u.dtype == tl.bfloat16:
        b_nhi, b_lo = _coupled_parts(p_x, o_e, m_bi, b_u, BLOCK_IC, BLOCK_KIN, DOT_F32)
        b_y_hi, b_y_lo = half_parts(b_y, b_u.dtype)
        b_dw = _dot_acc(tl.trans(b_lo), b_y_hi, b_dw, DOT_F32)
        b_ndw = _dot_acc(tl.trans(b_nhi), b_y_lo, b_ndw, DOT_F32)
        b_ndw = _dot_acc(tl.trans(b_nhi), b_y_hi, b_ndw, DOT_F32)
    else:
        tl.static_assert(b_u.dtype == tl.float32, "float32 or bfloat16 inputs (float16 runs as float32)")
        b_x = _coupling_tile(p_x, o_e, m_bi, b_u.shape[0], BLOCK_IC, BLOCK_KIN) * b_u
        b_dw += dot_f32(tl.trans(b_x), b_y, PRECISION, DOT_F32)
    return b_dw, b_ndw


@triton.jit
def _dot_acc(b_a, b_b, b_acc, DOT_F32: tl.constexpr):
    """``acc + a @ b`` for half ``a`` and ``b``, accumulated by the tensor cores (exact products)."""
    if DOT_F32:
        b_acc += dot_f32(b_a, b_b, "ieee", DOT_F32)
    else:
        b_acc = tl.dot(b_a, b_b, b_acc)
    return b_acc


@triton.jit(do_not_specialize=["B", "SPLIT", "caps_per_split", "slot"])
def fused_layer_sums_kernel(
    u_ptr,  # [B, N_in, BLOCK_KIN] input capsules (D_in zero padded), capsules contiguous
    w_ptr,  # [N_in, N_out, D, BLOCK_KIN] weight (D_in zero padded), dtype of u, [D, BLOCK_KIN] blocks contiguous
    c_ptr,  # [S, B, N_out, N_in] f32 coupling coefficients (slot read; unused when GRAD)
    g_ptr,  # [S, B, N_out, N_in] f32 logit gradients (slot read; GRAD only)
    part_ptr,  # [B, SPLIT, N_out, D] f32 partial s, or of dV (GRAD) (written)
    B,
    N_in,
    N_out,
    D,
    SPLIT,
    caps_per_split,
    slot,
    stride_ub,
    stride_wi,
    stride_wj,
    BLOCK_B: tl.constexpr,
    BLOCK_IC: tl.constexpr,
    BLOCK_KIN: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    GRAD: tl.constexpr,  # the backward: partial dV = sum_i g u_hat with g = c (a - sum_j c a)
):
    """This split's partial ``sum_i c[b, i, j] u_hat[b, i, j]`` of output capsule j (program axis 2)
    as the tensor-core product ``(c u) W_j^T`` chunk by chunk; ``GRAD``: the same with the logit
    gradient ``g`` in place of c (the backward's dV). Iteration 0 (uniform coupling) is
    ``fused_layer_uniform_sums_kernel``."""
    i_tb = tl.program_id(0)
    i_k = tl.program_id(1)
    j = tl.program_id(2)
    o_b = (i_tb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    m_b = o_b < B
    i_start = i_k * caps_per_split
    i_end = tl.minimum(i_start + caps_per_split, N_in)
    p_c, p_g = _slot_buffers(c_ptr, g_ptr, slot, B, N_out, N_in)
    p_x = p_g if GRAD else p_c  # the factor of u: g, or c
    o_d = tl.arange(0, BLOCK_DK)
    b_acc = tl.zeros([BLOCK_B, BLOCK_DK], dtype=tl.float32)
    b_nacc = tl.zeros([BLOCK_B, BLOCK_DK], dtype=tl.float32)  # the negated hi parts' products (bfloat16)
    # whole chunks without masks: the rows past the batch read the last example and the W rows past
    # D the last row (a product's rows depend on its left factor's rows alone, its columns on the
    # right factor's columns: neither is stored)
    i_whole = i_start + (i_end - i_start) // BLOCK_IC * BLOCK_IC
    o_b_in, o_d_in = tl.minimum(o_b, B - 1), tl.minimum(o_d, D - 1)
    for i0 in range(i_start, i_whole, BLOCK_IC):
        b_acc, b_nacc = _sums_chunk(b_acc, b_nacc, u_ptr, w_ptr, p_x, o_b_in, m_b, i0, i_end, j, N_out, N_in, o_d_in,
                                    D, stride_ub, stride_wi, stride_wj, BLOCK_IC, BLOCK_KIN, PRECISION, DOT_F32, True)
    if i_whole < i_end:
        b_acc, b_nacc = _sums_chunk(b_acc, b_nacc, u_ptr, w_ptr, p_x, o_b, m_b, i_whole, i_end, j, N_out, N_in, o_d, D,
                                    stride_ub, stride_wi, stride_wj, BLOCK_IC, BLOCK_KIN, PRECISION, DOT_F32, False)
    if u_ptr.dtype.element_ty == tl.bfloat16:
        b_acc -= b_nacc
    m_bd = m_b[:, None] & (o_d < D)[None, :]
    tl.store(part_ptr + ((o_b[:, None] * SPLIT + i_k) * N_out + j) * D + o_d[None, :], b_acc, mask=m_bd)


@triton.jit(do_not_specialize=["B", "N_in", "SPLIT", "caps_per_split"])
def fused_layer_coupled_sums_kernel(
    u_ptr,  # [B, N_in, BLOCK_KIN] bfloat16 input capsules (D_in zero padded), capsules contiguous
    w_ptr,  # [cdiv(N_in, BLOCK_IC), N_OUT, BLOCK_DK, BLOCK_KIN, BLOCK_IC] bfloat16 weight in chunks
    w_sums_ptr,  # the same weight again (the sums' loads: see below)
    vparts_ptr,  # [2, B, N_OUT, BLOCK_DK] bfloat16 V_r's two parts (``factor_parts``)
    part_ptr,  # [B, SPLIT, N_OUT, BLOCK_DK] f32 this split's partial s_r (written)
    B,
    N_in,
    SPLIT,
    caps_per_split,
    stride_uc,  # u's batch stride in capsules (BLOCK_KIN elements)
    BLOCK_B: tl.constexpr,
    BLOCK_IC: tl.constexpr,
    BLOCK_KIN: tl.constexpr,
    BLOCK_DK: tl.constexpr,  # D_out itself (16)
    DOT_F32: tl.constexpr,
    N_OUT: tl.constexpr,  # N_out: every output capsule unrolled
):
    """Iteration r >= 1 of the forward in one pass, with the coupling coefficients consumed on
    chip: per chunk the coefficients of every output capsule in registers (``_chunk_coefficients``,
    as the logits pass forms them: the same operations in the same order, the same numbers under
    the interpreter; compiled separately, FMA contraction may differ in the last bit), then for
    each output capsule j this split's partial ``s_r[b, j] += (c_j u) W_j^T`` on tensor cores, an
    accumulator per output capsule. Neither the coefficients nor u_hat reach memory, and u comes
    from DRAM once an iteration (the logits and sums passes wrote c in float32 and read it back,
    and each read u).

    Both products take the chunk in the logits' component-major order (``_logits_operand``,
    column ``k * BLOCK_IC + i``), so the sums reuse what the logits formed: u as the float32
    values the logits multiplied, packed back to bfloat16 pairs (``_bfloat16_pairs``), and each
    thread's own coefficients, which lie where the tensor-core operand ``c_j u`` needs them (the
    accumulator of the logits' product and the operand of the sums' share their layout).
    Capsule-major, the sums needed every capsule's coefficients in every thread of a quad: a
    round trip through shared memory per output capsule, and u and W loaded a second time.
    ``c_j u`` as ``half_product_parts`` (the two bfloat16 numbers of the sums pass's
    ``half_products``, with hi's sign restored): both products with the one W chunk into one
    accumulator. W comes in chunks (``fused_layer_weight_chunks_kernel``: each [D, chunk] block
    contiguous in this order), loaded with vector loads and staged into shared memory as loaded;
    from the weight's own layout the component-major block took a 16-bit store per element. The
    sums load it through ``w_sums_ptr``, the same tensor as ``w_ptr``: from one pointer LLVM
    merged those loads with the logits' and kept the ten output capsules' chunks in registers
    from the logits to the sums (140 to 184 bytes spilled on sm_90).

    bfloat16 inputs, D_out = 16, N_out <= ``LOGITS_IN_REGISTERS``, chunks of at least 8 capsules
    (``capstriton.ops.fused_layer.coupled_sums``). The sizes of an output capsule and of the
    weight's blocks are compile-time constants: each output capsule's V and W are then an
    immediate offset from one address (as runtime offsets, the twenty addresses of V's parts
    stayed live across the chunk loop and spilled on sm_90)."""
    tl.static_assert(BLOCK_DK == 16, "the coupled sums: output capsules of 16D")
    tl.static_assert(BLOCK_IC >= 8, "the coupled sums: chunks in the logits' component-major order")
    D: tl.constexpr = BLOCK_DK
    i_tb = tl.program_id(0)
    i_k = tl.program_id(1)
    o_b = (i_tb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    m_b = o_b < B
    n_part = tl.cast(B, tl.int64) * N_OUT * D  # elements a part of V
    i_start = i_k * caps_per_split
    i_end = tl.minimum(i_start + caps_per_split, N_in)
    o_d = tl.arange(0, BLOCK_DK)
    # u's rows whole capsules apart: aligned vector loads whatever the batch stride (as a stride
    # in elements, triton takes one not divisible by 16 as unaligned: a 1-capsule layer's scalar
    # loads spilled on sm_90); in int64, as the stride in elements may exceed int32
    stride_ub = tl.cast(stride_uc, tl.int64) * BLOCK_KIN
    o_ub = o_b * stride_ub
    v_parts = _factor_rows(vparts_ptr, n_part, o_b, m_b, D, N_OUT, BLOCK_DK)
    sums = ()
    for _ in tl.static_range(N_OUT):
        sums = sums + (tl.zeros([BLOCK_B, BLOCK_DK], dtype=tl.float32),)
    for i0 in range(i_start, i_end, BLOCK_IC):
        b_u = _logits_operand(u_ptr, o_ub, m_b, i0, i_end, BLOCK_KIN, BLOCK_IC, BLOCK_KIN)
        coefficients = _chunk_coefficients(b_u, w_ptr, v_parts, part_ptr, B, o_d, i0, i_end, D, None, None, N_OUT,
                                           DOT_F32, BLOCK_B, BLOCK_IC, BLOCK_KIN, W_CHUNKS=True)
        b_uh = _bfloat16_pairs(b_u.to(tl.float32), DOT_F32)
        updated = ()
        for j in tl.static_range(N_OUT):
            b_w = _weight_chunk(w_sums_ptr, i0, j, N_OUT, BLOCK_IC, BLOCK_KIN, BLOCK_DK)
            b_hi, b_lo = half_parts(coefficients[j], tl.bfloat16)
            b_xhi, b_xlo = half_product_parts(
                _over_components(_negated(b_hi, DOT_F32), BLOCK_KIN), _over_components(b_hi, BLOCK_KIN),
                _over_components(b_lo, BLOCK_KIN), b_uh, DOT_F32,
            )
            b_acc = _dot_acc(b_xlo, tl.trans(b_w), sums[j], DOT_F32)
            b_acc = _dot_acc(b_xhi, tl.trans(b_w), b_acc, DOT_F32)
            updated = updated + (b_acc,)
        sums = updated
    m_bd = m_b[:, None] & (o_d < D)[None, :]
    # the partial sums stored from the accumulators' own layout: with columns a known 1 apart
    # Triton converted the ten blocks to a vector-store layout through shared memory, and ptxas
    # kept that conversion's thread offsets across the chunk loop (8 bytes spilled on sm_80);
    # ``one`` is 1, which the compiler cannot know (B is never negative)
    one = 1 + (B < 0).to(tl.int32)
    for j in tl.static_range(N_OUT):
        p_part = part_ptr + ((o_b[:, None] * SPLIT + i_k) * N_OUT + j) * D
        tl.store(p_part + o_d[None, :] * one, sums[j], mask=m_bd)


@triton.jit
def _weight_chunk(w_ptr, i0, j, N_OUT: tl.constexpr, BLOCK_IC: tl.constexpr, BLOCK_KIN: tl.constexpr,
                  BLOCK_DK: tl.constexpr):
    """W_j of the chunk at input capsule ``i0`` (a multiple of ``BLOCK_IC``: runs are whole chunks)
    from the weight in chunks (``fused_layer_weight_chunks_kernel``), [BLOCK_DK, BLOCK_KIN *
    BLOCK_IC] component-major as ``_logits_operand`` orders it: one contiguous block, loaded
    without masks (zero padded past N_in and D)."""
    block: tl.constexpr = BLOCK_DK * BLOCK_KIN * BLOCK_IC
    p_w = w_ptr + (tl.cast(i0 // BLOCK_IC, tl.int64) * N_OUT + j) * block
    o_n = tl.arange(0, BLOCK_KIN * BLOCK_IC)
    return tl.load(p_w + tl.arange(0, BLOCK_DK)[:, None] * (BLOCK_KIN * BLOCK_IC) + o_n[None, :])


@triton.jit
def fused_layer_weight_chunks_kernel(
    w_ptr,  # [N_in, N_out, D, BLOCK_KIN] weight (D_in zero padded), [D, BLOCK_KIN] blocks contiguous
    out_ptr,  # [cdiv(N_in, BLOCK_IC), N_out, BLOCK_DK, BLOCK_KIN, BLOCK_IC] the weight in chunks (written)
    N_in,
    N_out,
    D,
    stride_wi,
    stride_wj,
    BLOCK_IC: tl.constexpr,
    BLOCK_KIN: tl.constexpr,
    BLOCK_DK: tl.constexpr,
):
    """The weight in chunks, as the coupled sums load it (``_weight_chunk``): per chunk of
    ``BLOCK_IC`` input capsules and output capsule j (a program each) the [BLOCK_DK, BLOCK_KIN *
    BLOCK_IC] block of W_j with column ``k * BLOCK_IC + i`` (component-major), contiguous, zero
    past N_in and D. Loaded from the weight's own layout that block takes a 16-bit store per
    element into shared memory, in every chunk, output capsule and program."""
    i_c = tl.program_id(0)
    j = tl.program_id(1)
    o_i = i_c * BLOCK_IC + tl.arange(0, BLOCK_IC)
    o_d = tl.arange(0, BLOCK_DK)
    o_k = tl.arange(0, BLOCK_KIN)
    o_w = (o_i.to(tl.int64) * stride_wi + tl.cast(j, tl.int64) * stride_wj)[:, None, None] \
        + (o_d * BLOCK_KIN)[None, :, None] \
        + o_k[None, None, :]
    m_w = (o_i < N_in)[:, None, None] & (o_d < D)[None, :, None]
    b_w = tl.permute(tl.load(w_ptr + o_w, mask=m_w, other=0.0), (1, 2, 0))  # [BLOCK_DK, BLOCK_KIN, BLOCK_IC]
    o_out = (o_d * BLOCK_KIN)[:, None, None] * BLOCK_IC + (o_k * BLOCK_IC)[None, :, None] \
        + tl.arange(0, BLOCK_IC)[None, None, :]
    p_out = out_ptr + (tl.cast(i_c, tl.int64) * N_out + j) * (BLOCK_DK * BLOCK_KIN * BLOCK_IC)
    tl.store(p_out + o_out, b_w)


@triton.jit
def _negated(b_x, INTERPRETED: tl.constexpr):
    """``-x`` of a bfloat16 block, exactly: its sign bits flipped, one logical operation a pair of
    elements (``coefficient_parts`` forms -hi as the hi part of ``c x -1``: two more a pair, and as
    16-bit integers the XOR took four: unpack, two XORs, repack). Triton's interpreter
    (``INTERPRETED``: the ``DOT_F32`` flag) runs no PTX: the 16-bit XOR there."""
    if INTERPRETED:
        b_y = (b_x.to(tl.int16, bitcast=True) ^ -32768).to(tl.bfloat16, bitcast=True)
    else:
        b_y = tl.inline_asm_elementwise("xor.b32 $0, $1, 0x80008000;", "=r,r", [b_x], dtype=tl.bfloat16,
                                        is_pure=True, pack=2)
    return b_y


@triton.jit
def _over_components(b_x, BLOCK_KIN: tl.constexpr):
    """A [rows, BLOCK_IC] per-capsule block repeated over each capsule's components in the
    component-major order of ``_logits_operand``: [rows, BLOCK_KIN * BLOCK_IC] (each thread's
    own values repeated in its registers: the layout of a chunk's accumulator keeps a capsule's
    components in one thread; ``_component_dots``)."""
    rows: tl.constexpr = b_x.shape[0]
    cols: tl.constexpr = b_x.shape[1]
    return tl.reshape(tl.broadcast_to(b_x[:, None, :], [rows, BLOCK_KIN, cols]), [rows, BLOCK_KIN * cols])


@triton.jit
def _bfloat16_pairs(b_x, INTERPRETED: tl.constexpr):
    """float32 ``x`` (bfloat16 numbers) as bfloat16, exactly, in pairs by one converting
    instruction where ``x`` lies (``cvt.rn.bf16x2.f32``: element 0 to the low half). Written as
    ``x.to(bfloat16)`` of ``u.to(float32)``, Triton folded the two conversions back to the loaded
    u, whose registers pair two components of one capsule, and each packed pair of the
    component-major chunk (two capsules' component) took a byte permute, in every output
    capsule's products (616 byte permutes a thread and chunk). Triton's interpreter (``INTERPRETED``: the
    ``DOT_F32`` flag) runs no PTX: the conversion itself there."""
    if INTERPRETED:
        b_y = b_x.to(tl.bfloat16)
    else:
        b_y = tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [b_x], dtype=tl.bfloat16,
                                        is_pure=True, pack=2)
    return b_y


@triton.jit(do_not_specialize=["B", "SPLIT", "caps_per_split"])
def fused_layer_uniform_sums_kernel(
    u_ptr,  # [B, N_in, BLOCK_KIN] input capsules (D_in zero padded), capsules contiguous
    w_ptr,  # [N_in, N_out, D, BLOCK_KIN] weight (D_in zero padded), dtype of u, [D, BLOCK_KIN] blocks contiguous
    part_ptr,  # [B, SPLIT, N_out, D] f32 partial s_0 (written)
    vsum_buf_ptr,  # [R, B, N_out, D] f32 saved V_r (slot 0, V_0 = 0, written)
    B,
    N_in,
    N_out,
    D,
    SPLIT,
    caps_per_split,
    stride_ub,
    stride_wi,
    stride_wj,
    BLOCK_B: tl.constexpr,
    BLOCK_IC: tl.constexpr,
    BLOCK_KIN: tl.constexpr,
    BLOCK_NF: tl.constexpr,  # flattened outputs n = j * D + d a program (program axis 2)
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Iteration 0, uniform coupling: this split's partial ``s_0 = (1 / N_out) sum_i u_hat[b, i]``
    of ``BLOCK_NF`` flattened outputs (every output capsule's, unpadded) as the tensor-core
    product ``u W^T`` chunk by chunk, one [examples x chunk] operand of u for all of them (the
    sums pass forms ``c u`` anew for each output capsule; here c is the same for all)."""
    i_tb = tl.program_id(0)
    i_k = tl.program_id(1)
    i_n = tl.program_id(2)
    o_b = (i_tb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    m_b = o_b < B
    o_n = i_n * BLOCK_NF + tl.arange(0, BLOCK_NF)
    m_n = o_n < N_out * D
    o_wn = (o_n // D).to(tl.int64) * stride_wj + (o_n % D) * BLOCK_KIN  # W[i, j, d, 0] less W[i, 0, 0, 0]
    i_start = i_k * caps_per_split
    i_end = tl.minimum(i_start + caps_per_split, N_in)
    b_acc = tl.zeros([BLOCK_B, BLOCK_NF], dtype=tl.float32)
    for i0 in range(i_start, i_end, BLOCK_IC):
        o_i, o_k, m_c = _caps_chunk(i0, i_end, BLOCK_IC, BLOCK_KIN)
        b_u = _u_chunk(u_ptr, o_b, m_b, i0, m_c, stride_ub, BLOCK_IC, BLOCK_KIN)
        b_w = _w_rows(w_ptr, o_wn, m_n, o_i, o_k, m_c, stride_wi)  # [BLOCK_NF, chunk]
        b_acc += dot_f32(b_u, tl.trans(b_w), PRECISION, DOT_F32)
    b_acc = b_acc / N_out
    m_bn = m_b[:, None] & m_n[None, :]
    if i_k == 0:  # one program per tile and block of outputs saves V_0 = 0
        tl.store(vsum_buf_ptr + o_b[:, None] * N_out * D + o_n[None, :], tl.zeros_like(b_acc), mask=m_bn)
    tl.store(part_ptr + (o_b[:, None] * SPLIT + i_k) * N_out * D + o_n[None, :], b_acc, mask=m_bn)


# ---------------------------------------------------------------------------------------------
# The final backward pass on tensor cores, in input-capsule space. With the prediction gradient
# du_hat[b, i, j] = sum_r c_r[b, i, j] ds_r[b, j] + g_r[b, i, j] V_r[b, j] (g_0 = 0: V_0 = 0):
#
#     du[b, i]   = sum_j W[i, j]^T du_hat[b, i, j]
#                = sum_j sum_r c_r (ds_r,j @ W_j) + g_r (V_r,j @ W_j)     per (i, k): [B, D] x [D, (i, k)]
#     dW[i, j]   = sum_b du_hat[b, i, j] u[b, i]^T
#                = sum_r ds_r,j^T (c_r u) + V_r,j^T (g_r u)                [D, B] x [B, (i, k)]
#
# with the coupling coefficients and logit gradients of every step read from the buffers the
# reduce passes wrote (slot r - r_first; c_0 = 1 / N_out needs none). ``fused_layer_bwd_input_kernel``
# owns a tile of examples and a run of input capsules and sums over the output capsules and steps
# in registers; ``fused_layer_bwd_weight_kernel`` owns a run of capsules, one output capsule and a
# group of example tiles and sums over the group's examples and the steps in registers;
# ``fused_layer_bwd_dw_sum_kernel`` adds the groups in order. A program holds 16 examples (more
# spilled), too few rows for sm_90's warpgroup MMA (M = 64): the weight gradient is accumulated
# transposed, dW^T = sum (c u)^T ds, with the chunk as the products' M, and so is du (``CHUNK_M``)
# where a chunk has 64 elements.


@triton.jit(do_not_specialize=["B", "caps_per_split", "R", "r_first"])
def fused_layer_bwd_input_kernel(
    u_ptr,  # [B, N_in, BLOCK_KIN] input capsules (D_in zero padded), capsules contiguous
    w_ptr,  # [N_in, N_out, D, BLOCK_KIN] weight (D_in zero padded), [D, BLOCK_KIN] blocks contiguous
    vsum_buf_ptr,  # [R, B, N_out, D] f32 saved V_r
    ds_buf_ptr,  # [R, B, N_out, D] f32 ds_r
    c_ptr,  # [S, B, N_out, N_in] f32 per step from r_first: coupling coefficients
    g_ptr,  # [S, B, N_out, N_in] f32 per step from r_first: logit gradients (GRAD_THROUGH only)
    du_ptr,  # [B, N_in, D_in] gradient of u, dtype of u, contiguous (written)
    B,
    N_in,
    N_out,
    D,
    D_in,
    R,
    r_first,  # the first step with stored coefficients (slot 0)
    caps_per_split,
    stride_ub,
    stride_wi,
    stride_wj,
    BLOCK_B: tl.constexpr,
    BLOCK_IC: tl.constexpr,
    BLOCK_KIN: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    HALF: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    UNIFORM: tl.constexpr,  # step 0 has a gradient: its coupling 1 / N_out, no logit gradient
    GRAD_THROUGH: tl.constexpr,  # the steps from r_first have logit gradients (the g V terms)
    CHUNK_M: tl.constexpr,  # du^T accumulated, the chunk as the products' M (see _oriented_product)
):
    i_tb = tl.program_id(0)
    i_k = tl.program_id(1)
    o_b = (i_tb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    m_b = o_b < B
    caps_size = N_out * D
    i_start = i_k * caps_per_split
    i_end = tl.minimum(i_start + caps_per_split, N_in)
    for i0 in range(i_start, i_end, BLOCK_IC):
        o_i, o_k, m_c = _caps_chunk(i0, i_end, BLOCK_IC, BLOCK_KIN)
        o_ic = i0 + tl.arange(0, BLOCK_IC)
        m_bi = m_b[:, None] & (o_ic < i_end)[None, :]
        b_du = _oriented(tl.zeros([BLOCK_B, BLOCK_IC * BLOCK_KIN], dtype=tl.float32), CHUNK_M)
        for j in range(0, N_out):
            b_w = _w_chunk(w_ptr, j, o_i, o_k, m_c, D, stride_wi, stride_wj, BLOCK_DK, BLOCK_KIN)
            o_e = (o_b[:, None] * N_out + j) * N_in + o_ic[None, :]
            if UNIFORM:
                b_ds = _caps_rows(ds_buf_ptr + j * D, o_b, m_b, D, caps_size, BLOCK_DK)
                b_du += _oriented_product(b_ds, b_w, HALF, PRECISION, DOT_F32, CHUNK_M) / N_out
            for r in range(r_first, R):
                p_c, p_g = _slot_buffers(c_ptr, g_ptr, r - r_first, B, N_out, N_in)
                p_r = tl.cast(r, tl.int64) * B * caps_size + j * D
                b_ds = _caps_rows(ds_buf_ptr + p_r, o_b, m_b, D, caps_size, BLOCK_DK)
                b_c = _coupling_tile(p_c, o_e, m_bi, BLOCK_B, BLOCK_IC, BLOCK_KIN)
                b_du += _oriented(b_c, CHUNK_M) * _oriented_product(b_ds, b_w, HALF, PRECISION, DOT_F32, CHUNK_M)
                if GRAD_THROUGH:
                    b_V = _caps_rows(vsum_buf_ptr + p_r, o_b, m_b, D, caps_size, BLOCK_DK)
                    b_g = _coupling_tile(p_g, o_e, m_bi, BLOCK_B, BLOCK_IC, BLOCK_KIN)
                    b_du += _oriented(b_g, CHUNK_M) * _oriented_product(b_V, b_w, HALF, PRECISION, DOT_F32, CHUNK_M)
        b_du = _oriented(b_du, CHUNK_M)
        o_du = o_b[:, None] * N_in * D_in + (o_i * D_in + o_k)[None, :]
        m_du = m_b[:, None] & (m_c & (o_k < D_in))[None, :]
        tl.store(du_ptr + o_du, b_du.to(du_ptr.dtype.element_ty), mask=m_du)


@triton.jit(do_not_specialize=["B", "caps_per_split", "tiles_per_group", "R", "r_first"])
def fused_layer_bwd_weight_kernel(
    u_ptr,  # [B, N_in, BLOCK_KIN] input capsules (D_in zero padded), capsules contiguous
    vsum_buf_ptr,  # [R, B, N_out, D] f32 saved V_r
    ds_buf_ptr,  # [R, B, N_out, D] f32 ds_r
    c_ptr,  # [S, B, N_out, N_in] f32 per step from r_first: coupling coefficients
    g_ptr,  # [S, B, N_out, N_in] f32 per step from r_first: logit gradients (GRAD_THROUGH only)
    dw_part_ptr,  # [G, N_in, N_out, D, D_in] f32 this group's part of the weight gradient (written)
    B,
    N_in,
    N_out,
    D,
    D_in,
    R,
    r_first,
    caps_per_split,
    tiles_per_group,
    stride_ub,
    BLOCK_B: tl.constexpr,
    BLOCK_IC: tl.constexpr,
    BLOCK_KIN: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    HALF: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    UNIFORM: tl.constexpr,
    GRAD_THROUGH: tl.constexpr,
):
    i_k = tl.program_id(0)
    j = tl.program_id(1)
    i_g = tl.program_id(2)
    caps_size = N_out * D
    i_start = i_k * caps_per_split
    i_end = tl.minimum(i_start + caps_per_split, N_in)
    tb_start = i_g * tiles_per_group
    tb_end = tl.minimum(tb_start + tiles_per_group, tl.cdiv(B, BLOCK_B))
    o_d = tl.arange(0, BLOCK_DK)
    for i0 in range(i_start, i_end, BLOCK_IC):
        o_i, o_k, m_c = _caps_chunk(i0, i_end, BLOCK_IC, BLOCK_KIN)
        o_ic = i0 + tl.arange(0, BLOCK_IC)
        # dW^T [(i, k), d]: the products (c u)^T ds with the chunk as their M
        b_dw = tl.zeros([BLOCK_IC * BLOCK_KIN, BLOCK_DK], dtype=tl.float32)
        b_ndw = tl.zeros([BLOCK_IC * BLOCK_KIN, BLOCK_DK], dtype=tl.float32)  # negated hi parts' (bfloat16)
        for tb in range(tb_start, tb_end):
            o_b = (tb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
            m_b = o_b < B
            m_bi = m_b[:, None] & (o_ic < i_end)[None, :]
            o_e = (o_b[:, None] * N_out + j) * N_in + o_ic[None, :]
            b_u = _u_chunk(u_ptr, o_b, m_b, i0, m_c, stride_ub, BLOCK_IC, BLOCK_KIN)
            if UNIFORM:
                b_ds = _caps_rows(ds_buf_ptr + j * D, o_b, m_b, D, caps_size, BLOCK_DK)
                b_dw += _dot_split(b_ds, tl.trans(b_u), HALF, PRECISION, DOT_F32, True) / N_out
            for r in range(r_first, R):
                p_c, p_g = _slot_buffers(c_ptr, g_ptr, r - r_first, B, N_out, N_in)
                p_r = tl.cast(r, tl.int64) * B * caps_size + j * D
                b_ds = _caps_rows(ds_buf_ptr + p_r, o_b, m_b, D, caps_size, BLOCK_DK)
                b_dw, b_ndw = _weight_grad_terms(b_dw, b_ndw, p_c, o_e, m_bi, b_u, b_ds, BLOCK_IC, BLOCK_KIN,
                                                 PRECISION, DOT_F32)
                if GRAD_THROUGH:
                    b_V = _caps_rows(vsum_buf_ptr + p_r, o_b, m_b, D, caps_size, BLOCK_DK)
                    b_dw, b_ndw = _weight_grad_terms(b_dw, b_ndw, p_g, o_e, m_bi, b_u, b_V, BLOCK_IC, BLOCK_KIN,
                                                     PRECISION, DOT_F32)
        if u_ptr.dtype.element_ty == tl.bfloat16:
            b_dw -= b_ndw
        o_dw = ((i_g * N_in + o_i.to(tl.int64)) * N_out + j) * D * D_in + o_k
        m_dw = (m_c & (o_k < D_in))[:, None] & (o_d < D)[None, :]
        tl.store(dw_part_ptr + o_dw[:, None] + o_d[None, :] * D_in, b_dw, mask=m_dw)
