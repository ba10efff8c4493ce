"""Jitted helpers every capsule algorithm shares: squash numerics, the [N_out, D] block of one
example, split sums, prediction tiles and the saturation-safe softmax over output capsules.

Squash numerics (float32 throughout, inputs of any float dtype):

    v = s * n / (1 + n^2),    n = ||s||

computed from ``t = s / max|s|`` (largest component exactly +-1, so ``1 <= ||t|| <= sqrt(D)``:
no overflow at 1e30, no underflow at 1e-30) and ``p = min(n, 1/n)``, in terms of which the length
and both Jacobian coefficients are bounded rational functions:

    n <  1:  |v| = p^2/(1+p^2),  n/(1+n^2) = p/(1+p^2),  n(1-n^2)/(1+n^2)^2 =  p(1-p^2)/(1+p^2)^2
    n >= 1:  |v| = 1/(1+p^2),    n/(1+n^2) = p/(1+p^2),  n(1-n^2)/(1+n^2)^2 = -p(1-p^2)/(1+p^2)^2

At ``s = 0`` everything is 0: the output and the whole Jacobian, never NaN.

Block prefixes follow the kernels: ``o_`` offsets, ``m_`` masks, ``p_`` pointers, ``b_`` block
values. Nothing here returns a value derived from a pointer argument: torch 2.11's mutation
analysis marks every input of a helper call as written when a store address depends on one of
its results (it flagged u_hat as mutated, which broke torch.compile on a leaf input).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "squash_parts",
    "squash_from_parts",
    "squash_vjp",
    "caps_block",
    "sum_splits",
    "load_caps_block",
    "load_prediction_tile",
    "softmax_over_outputs",
    "softmax_over_outputs_vjp",
]

# ---------------------------------------------------------------------------------------------
# squash


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


# ---------------------------------------------------------------------------------------------
# one example's [N_out, D] block (v, s, V, ds and their partial sums), and prediction tiles


@triton.jit
def caps_block(N_out, D, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and masks of one example's [N_out, D] block: ``o_j``, ``o_d``, ``m_j = j < N_out``,
    ``m_jd`` and the flat offsets ``o_jd`` of a contiguous block."""
    o_j = tl.arange(0, BLOCK_J)
    o_d = tl.arange(0, BLOCK_D)
    m_j = o_j < N_out
    m_jd = m_j[:, None] & (o_d[None, :] < D)
    return o_j, o_d, m_j, m_jd, o_j[:, None] * D + o_d[None, :]


@triton.jit
def sum_splits(p_base, SPLIT, stride_split, o_x, m_x):
    """Sum ``SPLIT`` partial blocks (offsets ``o_x``, mask ``m_x``, any shape) spaced
    ``stride_split`` apart, in split order (a fixed order: the result does not depend on which
    program finished first)."""
    b_acc = tl.load(p_base + o_x, mask=m_x, other=0.0)
    for k in range(1, SPLIT):
        b_acc += tl.load(p_base + k * stride_split + o_x, mask=m_x, other=0.0)
    return b_acc


@triton.jit
def load_caps_block(p_x, o_j, o_d, m_jd, stride_xj, stride_xd):
    """One example's [N_out, D] block at ``p_x`` with strides (may be 0: expanded), as float32."""
    o_x = o_j[:, None].to(tl.int64) * stride_xj + o_d[None, :].to(tl.int64) * stride_xd
    return tl.load(p_x + o_x, mask=m_jd, other=0.0).to(tl.float32)


@triton.jit
def load_prediction_tile(p_ub, o_i, m_u, o_j, o_d, stride_ui, stride_uj, stride_ud):
    """The [BLOCK_I, BLOCK_J, BLOCK_D] tile of predictions u_hat (one example, base ``p_ub``) at
    input capsules ``o_i``, as float32, zero outside ``m_u``. Offsets are int64."""
    o_u = (
        o_i[:, None, None].to(tl.int64) * stride_ui
        + o_j[None, :, None].to(tl.int64) * stride_uj
        + o_d[None, None, :].to(tl.int64) * stride_ud
    )
    return tl.load(p_ub + o_u, mask=m_u, other=0.0).to(tl.float32)


# ---------------------------------------------------------------------------------------------
# the softmax over output capsules j (coupling coefficients) and its vector-Jacobian product


@triton.jit
def softmax_over_outputs(b_logit, m_j):
    """``softmax_j`` of logits [BLOCK_I, BLOCK_J] over the valid output capsules ``m_j``."""
    b_logit = tl.where(m_j[None, :], b_logit, float("-inf"))
    b_e = tl.exp(b_logit - tl.max(b_logit, axis=1)[:, None])
    # IEEE reciprocal (Triton's `/` is the 2-ulp div.full.f32): a saturated softmax must give
    # exactly one-hot coefficients, else the logit gradient c (a - sum c a) is eps * a instead of
    # 0, which overflows float32 in the backward for inputs of 1e30 (seen on an H200)
    return b_e * tl.math.div_rn(1.0, tl.sum(b_e, axis=1))[:, None]


@triton.jit
def softmax_over_outputs_vjp(b_c, b_a):
    """Gradient of the logits from coefficients ``b_c`` and ``b_a = dL/dc`` [BLOCK_I, BLOCK_J]:
    ``c (a - sum_k c_k a_k)``, exactly 0 where the softmax saturates."""
    b_g = b_c * (b_a - tl.sum(b_c * b_a, axis=1)[:, None])
    # Where c == 1 in float32 the exact gradient is below the rounding of its terms, but
    # c (a - sum_k c_k a_k) returns the rounding difference of a and the sum: the copies of a held
    # by different lanes differ by an ulp (shuffle reductions with fused multiply-adds). For 1e30
    # inputs that ulp, carried through the backward's running sums, grew to inf (seen on an H200;
    # exact under the interpreter).
    return tl.where(b_c < 1.0, b_g, 0.0)
