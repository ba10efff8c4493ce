"""Self-attention routing (Efficient-CapsNet, Mazzia et al. 2021) as Triton kernels, forward and
backward, on predictions ``u_hat`` [B, N_in, N_out, D] or, fused (``FROM_U``), on input capsules
``u`` [B, N_in, D_in] with the weight [N_in, N_out, D, D_in]: the predictions computed on chip,
tile by tile, as in ``fused_layer``, never stored. Semantics (DESIGN.md section 1):

    S_j = sum_k u_hat_kj;  a_ij = u_hat_ij . S_j / sqrt(D);  p_ij = softmax_j(a_ij)
    c_ij = p_ij + bias_ij;  s_j = sum_i c_ij u_hat_ij;  v_j = efficient_squash(s_j)

Work decomposition as in ``fused_layer``: a program of a pass owns a tile of ``BLOCK_B`` examples
and a run of input capsules (split ``k`` of ``SPLIT``), reducing per-split partial sums in split
order (deterministic):

forward (``self_attention_routing_fwd_kernel``): ``PHASE`` 0 accumulates the partial ``S``; 1
    reduces ``S`` (saved) and accumulates the partial ``s``; the finalize kernel reduces ``s``
    (saved) and writes ``v``.
backward: with ``ds = J(s)^T dv`` (per example, ``self_attention_routing_bwd_ds_kernel``),
    ``dc_ij = u_hat_ij . ds_j`` and ``da = p (dc - sum_k p_k dc_k)``, the gradient of ``S`` is
    ``dS_j = sum_i da_ij u_hat_ij / sqrt(D)`` (``self_attention_routing_bwd_reduce_kernel``, then
    ``dynamic_routing_bwd_sum_kernel``), and the final pass writes
    ``du_hat_ij = c_ij ds_j + da_ij S_j / sqrt(D) + dS_j`` (or ``du = W^T du_hat`` and the batch
    group's ``dW``) and the group's part of ``dbias_ij = sum_b dc_bij``; the groups' parts are
    added in order by ``fused_layer_bwd_dw_sum_kernel`` (these sums of partials: ``common.py``).

All arithmetic is float32. Offsets into u / u_hat are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    caps_block,
    efficient_squash_parts,
    efficient_squash_vjp,
    layer_input_grads,
    layer_predictions,
    layer_weight_tile,
    load_caps_block,
    load_prediction_tile,
    predictions,
    softmax_over_outputs,
    softmax_over_outputs_vjp,
    sum_splits,
    tile_block,
    tile_offsets,
    weight_offsets,
)

__all__ = [
    "self_attention_routing_fwd_kernel",
    "self_attention_routing_finalize_kernel",
    "self_attention_routing_bwd_ds_kernel",
    "self_attention_routing_bwd_reduce_kernel",
    "self_attention_routing_bwd_final_kernel",
]


@triton.jit
def _prediction_tile(
    p_u, p_w, p_h, o_b, m_b, o_j, o_d, m_bjd, o_wn, m_n, D_in,
    stride_ub, stride_uk, stride_wk, stride_hb, stride_hj, stride_hd,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    FROM_U: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """u_hat of one input capsule for the tile [BLOCK_B, BLOCK_J, BLOCK_D], float32: computed from
    u and W[i] (``p_u``, ``p_w`` at capsule i) or loaded from u_hat (``p_h`` at capsule i)."""
    if FROM_U:
        b_uh = predictions(
            p_u, p_w, o_b, m_b, o_wn, m_n, D_in, stride_ub, stride_uk, stride_wk,
            BLOCK_B, BLOCK_J, BLOCK_D, BLOCK_K, USE_DOT, PRECISION, DOT_F32,
        )
    else:
        b_uh = load_prediction_tile(p_h, o_b, m_bjd, o_j, o_d, stride_hb, stride_hj, stride_hd)
    return b_uh


@triton.jit
def _logit_scale(b_S):
    """``S / sigma`` and ``sigma = max(1, max |S|)`` per example of a tile [BLOCK_B, BLOCK_J, BLOCK_D].
    The logits are formed as ``sigma * (u_hat . S / sigma - max)``: inputs of 1e30 give
    ``u_hat . S`` of 1e61, past float32, whose differences the softmax needs; these never
    overflow but to -inf, the exact limit (sigma is 1, a no-op, for |S| <= 1)."""
    b_sig = tl.maximum(tl.max(tl.max(tl.abs(b_S), axis=2), axis=1), 1.0)
    return b_S * tl.math.div_rn(1.0, b_sig)[:, None, None], b_sig


@triton.jit
def _coupling(b_uh, b_Sn, b_sig, bias_ptr, i, o_j, m_j, stride_bi, stride_bj, inv_sqrt_d, HAS_BIAS: tl.constexpr):
    """``p = softmax_j(u_hat . S / sqrt(D))`` and ``c = p + bias[i]``, both [BLOCK_B, BLOCK_J], from
    ``S / sigma`` and ``sigma`` (:func:`_logit_scale`)."""
    b_l = tl.where(m_j[None, :], tl.sum(b_uh * b_Sn, axis=2) * inv_sqrt_d, float("-inf"))
    b_p = softmax_over_outputs((b_l - tl.max(b_l, axis=1)[:, None]) * b_sig[:, None], m_j)
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + i * stride_bi + o_j * stride_bj, mask=m_j, other=0.0).to(tl.float32)
        b_c = b_p + b_bias[None, :]
    else:
        b_c = b_p
    return b_p, b_c


@triton.jit(do_not_specialize=["B", "SPLIT", "caps_per_split"])
def self_attention_routing_fwd_kernel(
    u_ptr,  # [B, N_in, D_in] input capsules (FROM_U), strides stride_u*
    w_ptr,  # [N_in, N_out, D, D_in] weight (FROM_U), strides stride_w*
    uh_ptr,  # [B, N_in, N_out, D] predictions (not FROM_U), strides stride_h*
    bias_ptr,  # [N_in, N_out] bias added after the softmax (HAS_BIAS), strides stride_b*
    part_in_ptr,  # [B, SPLIT, N_out, D] f32 partial S (PHASE 1 reads it)
    part_out_ptr,  # [B, SPLIT, N_out, D] f32 partial S (PHASE 0) or s (PHASE 1), written
    total_ptr,  # [B, N_out, D] f32 S, saved for the backward (PHASE 1 writes it)
    B,
    N_in,
    N_out,
    D,
    D_in,
    SPLIT,
    caps_per_split,
    inv_sqrt_d,  # 1 / sqrt(D)
    stride_ub,
    stride_ui,
    stride_uk,
    stride_wi,
    stride_wj,
    stride_wd,
    stride_wk,
    stride_hb,
    stride_hi,
    stride_hj,
    stride_hd,
    stride_bi,
    stride_bj,
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FROM_U: tl.constexpr,  # predictions from u and the weight (fused), else loaded from u_hat
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PHASE: tl.constexpr,  # 0: the partial S = sum_i u_hat_i; 1: the partial s
):
    i_tb = tl.program_id(0)
    i_k = tl.program_id(1)
    caps_size = N_out * D
    o_b, m_b, m_j, o_jd, m_bjd = tile_block(i_tb, B, N_out, D, BLOCK_B, BLOCK_J, BLOCK_D)
    o_j = tl.arange(0, BLOCK_J)
    o_d = tl.arange(0, BLOCK_D)
    o_wn, _, m_n = weight_offsets(N_out, D, stride_wj, stride_wd, BLOCK_J, BLOCK_D)
    if PHASE == 1:
        b_S = sum_splits(part_in_ptr, SPLIT, caps_size, tile_offsets(o_jd, o_b * SPLIT, caps_size), m_bjd)
        if i_k == 0:  # one program per tile saves S (a branch: see dynamic_routing)
            tl.store(total_ptr + tile_offsets(o_jd, o_b, caps_size), b_S, mask=m_bjd)
        b_Sn, b_sig = _logit_scale(b_S)
    i_start = i_k * caps_per_split
    i_end = tl.minimum(i_start + caps_per_split, N_in)
    b_acc = tl.zeros([BLOCK_B, BLOCK_J, BLOCK_D], dtype=tl.float32)
    for i in range(i_start, i_end):
        b_uh = _prediction_tile(
            u_ptr + i * tl.cast(stride_ui, tl.int64), w_ptr + i * tl.cast(stride_wi, tl.int64),
            uh_ptr + i * tl.cast(stride_hi, tl.int64), o_b, m_b, o_j, o_d, m_bjd, o_wn, m_n, D_in,
            stride_ub, stride_uk, stride_wk, stride_hb, stride_hj, stride_hd,
            BLOCK_B, BLOCK_J, BLOCK_D, BLOCK_K, FROM_U, USE_DOT, PRECISION, DOT_F32,
        )
        if PHASE == 0:
            b_acc += b_uh
        else:
            _p, b_c = _coupling(b_uh, b_Sn, b_sig, bias_ptr, i, o_j, m_j, stride_bi, stride_bj, inv_sqrt_d, HAS_BIAS)
            b_acc += b_c[:, :, None] * b_uh
    tl.store(part_out_ptr + tile_offsets(o_jd, o_b * SPLIT + i_k, caps_size), b_acc, mask=m_bjd)


@triton.jit(do_not_specialize=["B", "SPLIT"])
def self_attention_routing_finalize_kernel(
    part_ptr,  # [B, SPLIT, N_out, D] f32 partial s
    s_ptr,  # [B, N_out, D] f32 s, saved for the backward
    v_ptr,  # [B, N_out, D] output v, dtype of the input, contiguous
    B,
    N_out,
    D,
    SPLIT,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_j, o_d, m_j, m_jd, o_jd = caps_block(N_out, D, BLOCK_J, BLOCK_D)
    caps_size = N_out * D
    b_s = sum_splits(part_ptr + i_b * SPLIT * caps_size, SPLIT, caps_size, o_jd, m_jd)
    b_unit, b_g, _, _ = efficient_squash_parts(b_s)
    tl.store(s_ptr + i_b * caps_size + o_jd, b_s, mask=m_jd)
    tl.store(v_ptr + i_b * caps_size + o_jd, (b_unit * b_g[:, None]).to(v_ptr.dtype.element_ty), mask=m_jd)


@triton.jit(do_not_specialize=["B"])
def self_attention_routing_bwd_ds_kernel(
    dv_ptr,  # [B, N_out, D] gradient of v, strides stride_g* (may be 0: expanded)
    s_ptr,  # [B, N_out, D] f32 saved s
    ds_ptr,  # [B, N_out, D] f32 ds = J(s)^T dv, written
    B,
    N_out,
    D,
    stride_gb,
    stride_gj,
    stride_gd,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_j, o_d, m_j, m_jd, o_jd = caps_block(N_out, D, BLOCK_J, BLOCK_D)
    o_x = i_b * N_out * D + o_jd
    b_dv = load_caps_block(dv_ptr + i_b * stride_gb, o_j, o_d, m_jd, stride_gj, stride_gd)
    b_ds = efficient_squash_vjp(tl.load(s_ptr + o_x, mask=m_jd, other=0.0), b_dv)
    tl.store(ds_ptr + o_x, b_ds, mask=m_jd)


@triton.jit(do_not_specialize=["B", "SPLIT", "caps_per_split"])
def self_attention_routing_bwd_reduce_kernel(
    u_ptr,
    w_ptr,
    uh_ptr,
    bias_ptr,
    total_ptr,  # [B, N_out, D] f32 saved S
    ds_ptr,  # [B, N_out, D] f32 ds
    dpart_ptr,  # [B, SPLIT, N_out, D] f32 this split's part of dS, written
    B,
    N_in,
    N_out,
    D,
    D_in,
    SPLIT,
    caps_per_split,
    inv_sqrt_d,
    stride_ub,
    stride_ui,
    stride_uk,
    stride_wi,
    stride_wj,
    stride_wd,
    stride_wk,
    stride_hb,
    stride_hi,
    stride_hj,
    stride_hd,
    stride_bi,
    stride_bj,
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FROM_U: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    i_tb = tl.program_id(0)
    i_k = tl.program_id(1)
    caps_size = N_out * D
    o_b, m_b, m_j, o_jd, m_bjd = tile_block(i_tb, B, N_out, D, BLOCK_B, BLOCK_J, BLOCK_D)
    o_j = tl.arange(0, BLOCK_J)
    o_d = tl.arange(0, BLOCK_D)
    o_wn, _, m_n = weight_offsets(N_out, D, stride_wj, stride_wd, BLOCK_J, BLOCK_D)
    o_x = tile_offsets(o_jd, o_b, caps_size)
    b_S = tl.load(total_ptr + o_x, mask=m_bjd, other=0.0)
    b_Sn, b_sig = _logit_scale(b_S)
    b_ds = tl.load(ds_ptr + o_x, mask=m_bjd, other=0.0)
    i_start = i_k * caps_per_split
    i_end = tl.minimum(i_start + caps_per_split, N_in)
    b_acc = tl.zeros([BLOCK_B, BLOCK_J, BLOCK_D], dtype=tl.float32)
    for i in range(i_start, i_end):
        b_uh = _prediction_tile(
            u_ptr + i * tl.cast(stride_ui, tl.int64), w_ptr + i * tl.cast(stride_wi, tl.int64),
            uh_ptr + i * tl.cast(stride_hi, tl.int64), o_b, m_b, o_j, o_d, m_bjd, o_wn, m_n, D_in,
            stride_ub, stride_uk, stride_wk, stride_hb, stride_hj, stride_hd,
            BLOCK_B, BLOCK_J, BLOCK_D, BLOCK_K, FROM_U, USE_DOT, PRECISION, DOT_F32,
        )
        b_p, _c = _coupling(b_uh, b_Sn, b_sig, bias_ptr, i, o_j, m_j, stride_bi, stride_bj, inv_sqrt_d, HAS_BIAS)
        b_da = softmax_over_outputs_vjp(b_p, tl.sum(b_uh * b_ds, axis=2))
        b_acc += b_da[:, :, None] * b_uh
    b_acc = b_acc * inv_sqrt_d
    tl.store(dpart_ptr + tile_offsets(o_jd, o_b * SPLIT + i_k, caps_size), b_acc, mask=m_bjd)


@triton.jit(do_not_specialize=["B", "caps_per_split", "tiles_per_group"])
def self_attention_routing_bwd_final_kernel(
    u_ptr,
    w_ptr,
    uh_ptr,
    bias_ptr,
    total_ptr,  # [B, N_out, D] f32 saved S
    ds_ptr,  # [B, N_out, D] f32 ds
    dtotal_ptr,  # [B, N_out, D] f32 dS
    du_ptr,  # [B, N_in, D_in] gradient of u (FROM_U) or [B, N_in, N_out, D] of u_hat, contiguous
    dw_part_ptr,  # [G, N_in, N_out, D, D_in] f32 the batch group's part of dW (FROM_U)
    dbias_part_ptr,  # [G, N_in, N_out] f32 the batch group's part of dbias (HAS_BIAS)
    B,
    N_in,
    N_out,
    D,
    D_in,
    caps_per_split,
    tiles_per_group,
    inv_sqrt_d,
    stride_ub,
    stride_ui,
    stride_uk,
    stride_wi,
    stride_wj,
    stride_wd,
    stride_wk,
    stride_hb,
    stride_hi,
    stride_hj,
    stride_hd,
    stride_bi,
    stride_bj,
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FROM_U: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HALF: tl.constexpr,  # bfloat16 inputs (FROM_U): du_hat enters the products in two parts (float16 runs as float32)
):
    i_s = tl.program_id(0)
    i_g = tl.program_id(1)
    caps_size = N_out * D
    o_j = tl.arange(0, BLOCK_J)
    o_d = tl.arange(0, BLOCK_D)
    m_j = o_j < N_out
    o_wn, o_n, m_n = weight_offsets(N_out, D, stride_wj, stride_wd, BLOCK_J, BLOCK_D)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < D_in
    tb_start = i_g * tiles_per_group
    tb_end = tl.minimum(tb_start + tiles_per_group, tl.cdiv(B, BLOCK_B))
    i_start = i_s * caps_per_split
    i_end = tl.minimum(i_start + caps_per_split, N_in)
    for i in range(i_start, i_end):
        p_u = u_ptr + i * tl.cast(stride_ui, tl.int64)
        p_w = w_ptr + i * tl.cast(stride_wi, tl.int64)
        p_h = uh_ptr + i * tl.cast(stride_hi, tl.int64)
        p_dw = dw_part_ptr + (i_g * N_in + i) * tl.cast(caps_size * D_in, tl.int64)
        if FROM_U:
            b_wt, b_dw = layer_weight_tile(p_w, o_k, o_wn, m_n, D_in, stride_wk, BLOCK_J, BLOCK_D, BLOCK_K, USE_DOT)
        b_dbias = tl.zeros([BLOCK_J], dtype=tl.float32)
        for tb in range(tb_start, tb_end):
            o_b, m_b, _, o_jd, m_bjd = tile_block(tb, B, N_out, D, BLOCK_B, BLOCK_J, BLOCK_D)
            if FROM_U:
                b_uh, b_u = layer_predictions(
                    p_u, p_w, b_wt, o_b, m_b, o_k, o_wn, m_n, D_in, stride_ub, stride_uk, stride_wk,
                    BLOCK_B, BLOCK_J, BLOCK_D, BLOCK_K, USE_DOT, PRECISION, DOT_F32,
                )
            else:
                b_uh = _prediction_tile(
                    p_u, p_w, p_h, o_b, m_b, o_j, o_d, m_bjd, o_wn, m_n, D_in,
                    stride_ub, stride_uk, stride_wk, stride_hb, stride_hj, stride_hd,
                    BLOCK_B, BLOCK_J, BLOCK_D, BLOCK_K, FROM_U, USE_DOT, PRECISION, DOT_F32,
                )
            o_x = tile_offsets(o_jd, o_b, caps_size)
            b_S = tl.load(total_ptr + o_x, mask=m_bjd, other=0.0)
            b_ds = tl.load(ds_ptr + o_x, mask=m_bjd, other=0.0)
            b_Sn, b_sig = _logit_scale(b_S)
            b_p, b_c = _coupling(b_uh, b_Sn, b_sig, bias_ptr, i, o_j, m_j, stride_bi, stride_bj, inv_sqrt_d, HAS_BIAS)
            b_dc = tl.sum(b_uh * b_ds, axis=2)
            b_da = softmax_over_outputs_vjp(b_p, b_dc)
            b_duh = b_c[:, :, None] * b_ds + (b_da * inv_sqrt_d)[:, :, None] * b_S
            b_duh += tl.load(dtotal_ptr + o_x, mask=m_bjd, other=0.0)
            b_dbias += tl.sum(b_dc, axis=0)  # rows past B hold zeros
            if FROM_U:
                b_dw = layer_input_grads(
                    tl.reshape(b_duh, [BLOCK_B, BLOCK_J * BLOCK_D]), b_u, b_wt, b_dw, p_u, p_w, p_dw,
                    du_ptr + o_b * (N_in * D_in) + i * D_in, o_b, m_b, o_k, m_k, o_wn, o_n, m_n, D_in,
                    stride_ub, stride_uk, stride_wk, USE_DOT, HALF, PRECISION, DOT_F32,
                )
            else:
                o_du = o_b[:, None, None] * (N_in * caps_size) + i * caps_size + o_jd[None, :, :]
                tl.store(du_ptr + o_du, b_duh.to(du_ptr.dtype.element_ty), mask=m_bjd)
        if FROM_U:
            if USE_DOT:
                tl.store(p_dw + o_n[:, None] * D_in + o_k[None, :], b_dw, mask=m_n[:, None] & m_k[None, :])
        if HAS_BIAS:
            tl.store(dbias_part_ptr + (i_g * N_in + i) * N_out + o_j, b_dbias, mask=m_j)
