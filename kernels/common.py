"""Jitted helpers every capsule algorithm shares: squash numerics, the [N_out, D] block of one
example, split sums, prediction tiles and the saturation-safe softmax over output capsules; and
the per-example kernels that sum a pass's partials, which several algorithms launch (at the end).

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
    "dynamic_routing_finalize_kernel",
    "dynamic_routing_bwd_sum_kernel",
    "fused_layer_bwd_dw_sum_kernel",
    "squash_parts",
    "squash_from_parts",
    "squash_vjp",
    "efficient_squash_parts",
    "efficient_squash_vjp",
    "caps_block",
    "sum_splits",
    "load_caps_block",
    "load_prediction_tile",
    "softmax_over_outputs",
    "softmax_over_outputs_vjp",
    "tile_block",
    "tile_offsets",
    "weight_offsets",
    "load_u_tile",
    "load_weight_t",
    "dot_f32",
    "half_parts",
    "bfloat16_nearest",
    "coefficient_parts",
    "half_products",
    "half_product_parts",
    "tf32_nearest",
    "factor_parts",
    "dot_parts",
    "predictions",
    "layer_weight_tile",
    "layer_predictions",
    "layer_input_grads",
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
    # zero rows: 1 + sum(t^2), which is 1, or NaN for a row of zeros and NaN (on GPUs the maximum
    # above passes over NaN), so that NaN reaches every component, as in the reference
    b_sq = tl.sum(b_t * b_t, axis=1)
    b_m = tl.sqrt(tl.where(nonzero, b_sq, 1.0 + b_sq))
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
# Efficient-CapsNet's squash: v = (1 - e^-n) s / n, written v = unit * g(n) with g = 1 - e^-n, and
# its Jacobian J = f(n) I + h(n) unit unit^T with f = g / n and h = n f'(n). Below n = 1/4 (where
# the direct forms cancel) f and h are their Taylor polynomials (truncation below 1e-8 relative);
# at n = 0, f = 1 and h = 0: v = 0 with the identity Jacobian, exactly.


@triton.jit
def efficient_squash_parts(b_x):
    """For zero-padded rows ``b_x`` [ROWS, COLS] (float32): the unit vector (0 for a zero row),
    ``g = 1 - e^-n``, ``f = g / n`` and ``h = n f'(n)`` [ROWS], with ``n = ||s||`` (inf past
    float32's range, where g = 1 and f = h = 0)."""
    b_unit, b_p, large = squash_parts(b_x)
    b_n = tl.where(large, tl.math.div_rn(1.0, tl.where(large, b_p, 1.0)), b_p)
    small = b_n < 0.25
    b_m = tl.where(small, b_n, 0.0)
    # f(n) = sum_k (-n)^k / (k + 1)!, by Horner's rule
    b_fs = 1 / 720 - b_m / 5040
    b_fs = 1.0 + b_m * (-1 / 2 + b_m * (1 / 6 + b_m * (-1 / 24 + b_m * (1 / 120 - b_m * b_fs))))
    # h(n) = sum_{k>=2} (-1)^k (1 - k) n^(k-1) / k!
    b_hs = -1 / 144 + b_m * (1 / 840 + b_m * (-1 / 5760 + b_m / 45360))
    b_hs = b_m * (-1 / 2 + b_m * (1 / 3 + b_m * (-1 / 8 + b_m * (1 / 30 + b_m * b_hs))))
    b_nl = tl.where(small, 1.0, b_n)  # the direct forms see only n >= 1/4 (and inf)
    b_e = tl.exp(-b_nl)
    b_g = tl.where(small, b_n * b_fs, 1.0 - b_e)
    b_f = tl.where(small, b_fs, (1.0 - b_e) / b_nl)
    # past n = 80, e^-n (1 + n) (< 1e-33) vanishes next to 1 in float32, so h rounds to -1 / n,
    # which also avoids inf * 0 at n = inf
    b_hl = tl.where(b_nl < 80.0, (b_e * (1.0 + b_nl) - 1.0) / b_nl, -1.0 / b_nl)
    return b_unit, b_g, b_f, tl.where(small, b_hs, b_hl)


@triton.jit
def efficient_squash_vjp(b_x, b_dv):
    """``J(s)^T dv`` of Efficient-CapsNet's squash for rows ``b_x`` = s and ``b_dv`` (float32)."""
    b_unit, b_g, b_f, b_h = efficient_squash_parts(b_x)
    return b_f[:, None] * b_dv + b_unit * (b_h * tl.sum(b_unit * b_dv, axis=1))[:, None]


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
    """A tile of [N_out, D] blocks with strides (may be 0: expanded) at rows ``o_i``, as float32,
    zero outside ``m_u``: predictions u_hat of one example (base ``p_ub``) at input capsules
    ``o_i``, or of one capsule at examples ``o_i``, or a gradient [B, N_out, D] at examples. Offsets
    are int64."""
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
    # 0, which overflows float32 in the backward for inputs of 1e30
    return b_e * tl.math.div_rn(1.0, tl.sum(b_e, axis=1))[:, None]


@triton.jit
def softmax_over_outputs_vjp(b_c, b_a):
    """Gradient of the logits from coefficients ``b_c`` and ``b_a = dL/dc`` [BLOCK_I, BLOCK_J]:
    ``c (a - sum_k c_k a_k)``, exactly 0 where the softmax saturates."""
    b_g = b_c * (b_a - tl.sum(b_c * b_a, axis=1)[:, None])
    # Where c == 1 in float32 the exact gradient is below the rounding of its terms, but
    # c (a - sum_k c_k a_k) returns the rounding difference of a and the sum: the copies of a held
    # by different lanes differ by an ulp (shuffle reductions with fused multiply-adds). For 1e30
    # inputs that ulp, carried through the backward's running sums, grows to inf on a GPU (exact
    # under the interpreter).
    return tl.where(b_c < 1.0, b_g, 0.0)


# ---------------------------------------------------------------------------------------------
# the capsule layers' tiles: BLOCK_B examples x one input capsule, the predictions made on chip
# (u [B, N_in, D_in], W [N_in, N_out, D, D_in]; outputs flattened to n = j * BLOCK_D + d)


@triton.jit
def tile_block(i_tb, B, N_out, D, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """A tile of examples and their [N_out, D] blocks: ``o_b``, ``m_b``, ``m_j``, the flat offsets
    ``o_jd`` [BLOCK_J, BLOCK_D] of one block and the [BLOCK_B, BLOCK_J, BLOCK_D] mask."""
    o_j, o_d, m_j, m_jd, o_jd = caps_block(N_out, D, BLOCK_J, BLOCK_D)
    o_b = (i_tb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    m_b = o_b < B
    return o_b, m_b, m_j, o_jd, m_b[:, None, None] & m_jd[None, :, :]


@triton.jit
def tile_offsets(o_jd, first, caps_size):
    """Offsets of the tile's [N_out, D] blocks at index ``first + b`` of a contiguous buffer of
    such blocks (``first`` [BLOCK_B]: e.g. ``b`` in [B, ...], ``b * SPLIT + k`` in partials)."""
    return first[:, None, None] * caps_size + o_jd[None, :, :]


@triton.jit
def weight_offsets(N_out, D, stride_wj, stride_wd, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """For the flattened outputs ``n = j * BLOCK_D + d`` [BLOCK_N]: their offsets within W[i], their
    index ``j * D + d`` in a contiguous [N_out, D] block, and their mask."""
    o_n = tl.arange(0, BLOCK_J * BLOCK_D)
    o_j = o_n // BLOCK_D
    o_d = o_n % BLOCK_D
    return o_j * stride_wj + o_d * stride_wd, o_j * D + o_d, (o_j < N_out) & (o_d < D)


@triton.jit
def load_u_tile(p_u, o_b, m_b, o_k, D_in, stride_ub, stride_uk):
    """u[b, i, k] for the tile [BLOCK_B, BLOCK_K] (``p_u`` at capsule i), zero padded."""
    return tl.load(
        p_u + o_b[:, None] * stride_ub + o_k[None, :].to(tl.int64) * stride_uk,
        mask=m_b[:, None] & (o_k < D_in)[None, :],
        other=0.0,
    )


@triton.jit
def load_weight_t(p_w, o_k, o_wn, m_n, D_in, stride_wk):
    """W[i] transposed, [BLOCK_K, BLOCK_N] (``p_w`` at capsule i), zero padded."""
    return tl.load(
        p_w + o_k[:, None] * stride_wk + o_wn[None, :], mask=(o_k < D_in)[:, None] & m_n[None, :], other=0.0
    )


@triton.jit
def dot_f32(a, b, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """``a @ b`` accumulated in float32, the float32 products at ``PRECISION``: "ieee", "tf32", or
    "tf32x3", made here rather than by Triton (whose decomposition also guards every element
    against infinity, which costs instructions: bench/results/kernel_report/NOTES.md): each
    operand split into its TF32 rounding ``hi`` and the remainder ``lo = x - hi``
    (exact), and ``lo_a hi_b + hi_a lo_b + hi_a hi_b`` summed on the tensor cores, smallest first;
    TF32 products of TF32 values are exact, the remainders lose their bits beyond TF32 (about
    2^-21 of the operand) and ``lo_a lo_b`` (below 2^-22 of the product) is dropped. An infinite operand gives
    NaN (inf - inf) where IEEE products give inf or NaN: the capsule layers turn either into NaN.

    ``DOT_F32`` is set where Triton's interpreter runs the kernel (3.6 to 3.9). It multiplies every
    dot in float32 whatever the precision, so the split is skipped there (its own test,
    tests/ops/test_fused_layer.py, runs it), and it multiplies bfloat16 operands as their raw 16-bit
    integers, so they are widened first, exactly: bfloat16 products are exact in float32, as on
    tensor cores."""
    if DOT_F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    elif PRECISION == "tf32x3":
        a_hi = tf32_nearest(a)
        b_hi = tf32_nearest(b)
        acc = tl.dot(a - a_hi, b_hi, input_precision="tf32")
        acc = tl.dot(a_hi, b - b_hi, acc, input_precision="tf32")
        out = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def half_parts(x, dtype: tl.constexpr):
    """float32 ``x`` as two bfloat16 numbers ``hi + lo`` (``dtype``, the inputs' half type), for
    two exact tensor-core products in place of one float32 product (products of bfloat16 numbers
    are exact in float32): ``hi`` is x truncated to its upper 16 bits, which are its bfloat16 bits
    (no conversion: a byte permute per pair, and one mask for hi's float32 value), ``lo`` the
    remainder ``x - hi`` (exact in float32, below 2^-7 |x|) rounded to bfloat16, so ``|x - hi - lo|
    <= 2^-15 |x|``; rounding hi instead takes a conversion to bfloat16 and one back for one more bit
    (bench/results/kernel_report/NOTES.md). A float32 x beyond bfloat16's largest finite value
    keeps a finite hi. Not float16: its narrow exponent range lets the parts of large or small
    factors overflow or underflow, so the capsule layers run float16 inputs as float32
    (``capstriton.ops._passes.float16_as_float32``)."""
    tl.static_assert(dtype == tl.bfloat16, "half_parts splits into bfloat16 (float16 inputs run as float32)")
    bits = x.to(tl.uint32, bitcast=True)
    hi = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    lo = (x - (bits & 0xFFFF0000).to(tl.float32, bitcast=True)).to(tl.bfloat16)
    return hi, lo


@triton.jit
def factor_parts(x, dtype: tl.constexpr):
    """float32 ``x`` as the two parts in which a float32 factor enters tensor-core products of the
    input dtype ``dtype``: bfloat16, ``half_parts``; float32 at 3xTF32, the TF32 rounding ``hi``
    and the exact remainder ``lo = x - hi``, as ``dot_f32`` splits its operands (``dot_parts``
    takes either, split once ahead of the products instead of at each)."""
    if dtype == tl.float32:
        hi = tf32_nearest(x)
        lo = x - hi
    else:
        hi, lo = half_parts(x, dtype)
    return hi, lo


@triton.jit
def dot_parts(a_hi, a_lo, b, DOT_F32: tl.constexpr):
    """``a @ b`` in float32 for a float32 ``a`` given as its ``factor_parts`` and ``b`` of the
    parts' dtype (float32 at 3xTF32, else bfloat16): the same products, summed in the same order, as
    ``dot_f32(a, b, "tf32x3")`` and the sum of the two half products of ``half_parts`` make, so
    the results are those of splitting ``a`` here, bit for bit. ``DOT_F32`` (the interpreter):
    float32 products, of ``hi + lo = a`` (exact) at 3xTF32, as ``dot_f32`` skips its split there."""
    if a_hi.dtype == tl.float32:
        if DOT_F32:
            out = tl.dot(a_hi + a_lo, b, input_precision="ieee")
        else:
            b_hi = tf32_nearest(b)
            acc = tl.dot(a_lo, b_hi, input_precision="tf32")
            acc = tl.dot(a_hi, b - b_hi, acc, input_precision="tf32")
            out = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:
        out = dot_f32(a_hi, b, "ieee", DOT_F32) + dot_f32(a_lo, b, "ieee", DOT_F32)
    return out


@triton.jit
def bfloat16_nearest(x):
    """float32 ``x`` rounded to bfloat16, to nearest even, as a GPU's ``cvt.rn`` rounds, in integer
    operations: Triton's interpreter truncates float32 to bfloat16 (with any
    ``fp_downcast_rounding``), so the interpreter's emulation of ``half_products`` rounds with this
    instead. NaN stays NaN, and a value beyond bfloat16's largest finite one rounds to infinity."""
    bits = x.to(tl.uint32, bitcast=True)
    nearest = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    # NaN: truncated, its quiet bit set (a payload in the low 16 bits alone would truncate to inf)
    return tl.where(x == x, nearest, (bits >> 16) | 0x40).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def coefficient_parts(c):
    """float32 coefficients ``c`` (any shape) as the three bfloat16 numbers ``half_products``
    takes: ``-hi``, ``hi`` and ``lo`` of ``half_parts(c)``. Split before they are repeated over a
    capsule's components: one split a coefficient. (-hi as hi of -c, formed as c x -1: triton 3.6's
    interpreter negates 0 to +0; flipping hi's sign bit instead takes more instructions.)"""
    c_hi, c_lo = half_parts(c, tl.bfloat16)
    c_nhi, _ = half_parts(c * -1.0, tl.bfloat16)
    return c_nhi, c_hi, c_lo


@triton.jit
def half_products(c_nhi, c_hi, c_lo, u, EMULATE: tl.constexpr):
    """The products ``c u`` of float32 coefficients ``c`` (``coefficient_parts``: ``c_nhi``,
    ``c_hi``, ``c_lo``, repeated as ``u`` is laid out) and bfloat16 ``u``, as two bfloat16 numbers
    for two exact tensor-core products: returned as ``(-hi, lo)``, ``c u ~ hi + lo``.

    ``hi`` is ``c_hi u`` rounded to nearest; the remainder ``c_hi u - hi`` is exact in bfloat16
    (two 8-bit significands make at most 16 bits, hi keeps the leading 8, rounded, and the rest
    fits in 8; barring underflow), and ``lo`` is ``c_lo u`` + remainder rounded once. Three packed
    fused multiply-adds a pair of elements (``fma.rn.bf16x2``: ``-hi``, the remainder, ``lo``),
    where splitting the float32 product ``c u`` took five instructions an element (convert u,
    multiply, hi, remainder, lo). ``-hi`` because the remainder needs hi as a negated addend,
    which would cost a negation a pair; the caller subtracts its product.

    Bound (``half_parts``' truncated hi: ``|c_lo| < 2^-7 |c|``, ``|c - c_hi - c_lo| <= 2^-15
    |c|``): ``|c u - hi - lo| <= 2.5 * 2^-15 |c u|``. bfloat16 only (as ``half_parts``).
    ``EMULATE`` (Triton's interpreter, which cannot run PTX): the same three steps in float32 (the
    products of bfloat16 numbers exact there), rounded by ``bfloat16_nearest``. The bfloat16
    forward's coupled sums take the same numbers with hi's sign restored
    (``half_product_parts``)."""
    tl.static_assert(u.dtype == tl.bfloat16, "half_products takes bfloat16 u")
    if EMULATE:
        b_u = u.to(tl.float32)
        nhi = bfloat16_nearest(c_nhi.to(tl.float32) * b_u)
        b_rem = c_hi.to(tl.float32) * b_u + nhi.to(tl.float32)
        lo = bfloat16_nearest(c_lo.to(tl.float32) * b_u + b_rem)
    else:
        # the outputs written last: they may share registers with the inputs.
        # Impure: Triton may not move the products past layout conversions, so they run where u
        # is loaded (4 coefficients a thread, each split once), not in the tensor-core operand's
        # layout, where the 4 lanes of a quad each split the same 16 (the counts:
        # bench/results/kernel_report/NOTES.md, "c u by packed half arithmetic"). The price:
        # torch.compile takes every argument of a kernel with impure asm as written
        # (tests/_fake_cuda_trace.py: u and W cloned before each call)
        nhi, lo = tl.inline_asm_elementwise(
            "{ .reg .b32 z, h, r, l; mov.b32 z, 0x80008000; fma.rn.bf16x2 h, $2, $5, z; "
            "fma.rn.bf16x2 r, $3, $5, h; fma.rn.bf16x2 l, $4, $5, r; mov.b32 $0, h; mov.b32 $1, l; }",
            "=r,=r,r,r,r,r",
            [c_nhi, c_hi, c_lo, u],
            dtype=(tl.bfloat16, tl.bfloat16),
            is_pure=False,
            pack=2,
        )
    return nhi, lo


@triton.jit
def half_product_parts(c_nhi, c_hi, c_lo, u, EMULATE: tl.constexpr):
    """``c u ~ hi + lo`` as ``half_products`` forms them (the same two bfloat16 numbers), returned
    as ``(hi, lo)``: four packed fused multiply-adds a pair of elements (hi and -hi, c_hi u and
    c_nhi u rounded; the exact remainder ``c_hi u - hi``; lo), one more than ``half_products``,
    whose caller must take -hi's product with a negated factor or in a second accumulator; here
    both products go to one accumulator with one factor. ``c_nhi``, ``c_hi``, ``c_lo``: the
    numbers of ``coefficient_parts`` (c_nhi is -c_hi; the coupled sums flip c_hi's sign bits, the
    same bits), not -hi formed from hi by flipping its sign bits in the asm: as many instructions,
    and ptxas then spilled 56 bytes on sm_80 in the coupled sums. ``EMULATE``: the same four steps
    in float32, -hi from c_nhi as on a GPU. Pure: Triton places the products where their operands
    lie (the tensor-core operand's layout, coefficients from registers), and torch.compile need
    not take the kernel's arguments as written."""
    tl.static_assert(u.dtype == tl.bfloat16, "half_product_parts takes bfloat16 u")
    if EMULATE:
        b_u = u.to(tl.float32)
        hi = bfloat16_nearest(c_hi.to(tl.float32) * b_u)
        b_rem = c_hi.to(tl.float32) * b_u + bfloat16_nearest(c_nhi.to(tl.float32) * b_u).to(tl.float32)
        lo = bfloat16_nearest(c_lo.to(tl.float32) * b_u + b_rem)
    else:
        hi, lo = tl.inline_asm_elementwise(
            "{ .reg .b32 z, h, n, r, l; mov.b32 z, 0x80008000; fma.rn.bf16x2 h, $3, $5, z; "
            "fma.rn.bf16x2 n, $2, $5, z; fma.rn.bf16x2 r, $3, $5, n; fma.rn.bf16x2 l, $4, $5, r; "
            "mov.b32 $0, h; mov.b32 $1, l; }",
            "=r,=r,r,r,r,r",
            [c_nhi, c_hi, c_lo, u],
            dtype=(tl.bfloat16, tl.bfloat16),
            is_pure=True,
            pack=2,
        )
    return hi, lo


@triton.jit
def tf32_nearest(x):
    """float32 ``x`` rounded to TF32 as ``cvt.rna.tf32.f32`` rounds: 10 mantissa bits, ties away
    from zero (two integer instructions)."""
    return ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def predictions(
    p_u, p_w, o_b, m_b, o_wn, m_n, D_in, stride_ub, stride_uk, stride_wk,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """u_hat of one input capsule for the tile, float32 [BLOCK_B, BLOCK_J, BLOCK_D]."""
    if USE_DOT:
        o_k = tl.arange(0, BLOCK_K)
        b_u = load_u_tile(p_u, o_b, m_b, o_k, D_in, stride_ub, stride_uk)
        b_wt = load_weight_t(p_w, o_k, o_wn, m_n, D_in, stride_wk)
        b_uh = dot_f32(b_u, b_wt, PRECISION, DOT_F32)
    else:
        b_uh = tl.zeros([BLOCK_B, BLOCK_J * BLOCK_D], dtype=tl.float32)
        for k in range(0, D_in):
            b_uk = tl.load(p_u + o_b * stride_ub + k * stride_uk, mask=m_b, other=0.0).to(tl.float32)
            b_wk = tl.load(p_w + k * stride_wk + o_wn, mask=m_n, other=0.0).to(tl.float32)
            b_uh += b_uk[:, None] * b_wk[None, :]
    return tl.reshape(b_uh, [BLOCK_B, BLOCK_J, BLOCK_D])


@triton.jit
def layer_weight_tile(
    p_w, o_k, o_wn, m_n, D_in, stride_wk,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
):
    """For a backward pass over one input capsule: W[i] transposed [BLOCK_K, BLOCK_N] (the tl.dot
    path keeps it across the example tiles) and the zeroed accumulator of dW[i] [BLOCK_N, BLOCK_K]
    (scalar placeholders on the rank-one path, which works from memory)."""
    if USE_DOT:
        b_wt = load_weight_t(p_w, o_k, o_wn, m_n, D_in, stride_wk)
        b_dw = tl.zeros([BLOCK_J * BLOCK_D, BLOCK_K], dtype=tl.float32)
    else:
        b_wt = 0.0
        b_dw = 0.0
    return b_wt, b_dw


@triton.jit
def layer_predictions(
    p_u, p_w, b_wt, o_b, m_b, o_k, o_wn, m_n, D_in, stride_ub, stride_uk, stride_wk,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """The tile's u_hat of one capsule [BLOCK_B, BLOCK_J, BLOCK_D] and, on the tl.dot path, its u
    tile [BLOCK_B, BLOCK_K] (for dW), with the weight tile of :func:`layer_weight_tile`."""
    if USE_DOT:
        b_u = load_u_tile(p_u, o_b, m_b, o_k, D_in, stride_ub, stride_uk)
        b_uh = tl.reshape(dot_f32(b_u, b_wt, PRECISION, DOT_F32), [BLOCK_B, BLOCK_J, BLOCK_D])
    else:
        b_u = 0.0
        b_uh = predictions(
            p_u, p_w, o_b, m_b, o_wn, m_n, D_in, stride_ub, stride_uk, stride_wk,
            BLOCK_B, BLOCK_J, BLOCK_D, BLOCK_K, USE_DOT, PRECISION, DOT_F32,
        )
    return b_uh, b_u


@triton.jit
def layer_input_grads(
    b_duh, b_u, b_wt, b_dw, p_u, p_w, p_dw, p_du, o_b, m_b, o_k, m_k, o_wn, o_n, m_n, D_in,
    stride_ub, stride_uk, stride_wk,
    USE_DOT: tl.constexpr, HALF: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """From ``du_hat`` [BLOCK_B, BLOCK_N] (float32) of one capsule i and the tile: stores
    ``du[b, i] = W[i]^T du_hat[b]`` (``p_du`` [BLOCK_B] at du[b, i, 0], contiguous in k) and adds
    ``du_hat^T u`` to dW[i]: returned, in registers, on the tl.dot path; read-modify-written at
    ``p_dw`` (dW[i] of the program's own batch group, zeroed by the launch: no race, in tile
    order) on the rank-one path."""
    if USE_DOT:
        # bfloat16 inputs (HALF): du_hat as the sum of two bfloat16 numbers, each multiplied on
        # tensor cores (products of bfloat16 numbers are exact in float32), so the gradients lose
        # nothing to rounding du_hat to the input dtype
        if HALF:
            b_hi, b_lo = half_parts(b_duh, b_wt.dtype)
        else:
            b_hi = b_duh.to(b_wt.dtype)
        b_du = dot_f32(b_hi, tl.trans(b_wt), PRECISION, DOT_F32)
        b_dw += dot_f32(tl.trans(b_hi), b_u, PRECISION, DOT_F32)
        if HALF:
            b_du += dot_f32(b_lo, tl.trans(b_wt), PRECISION, DOT_F32)
            b_dw += dot_f32(tl.trans(b_lo), b_u, PRECISION, DOT_F32)
        tl.store(p_du[:, None] + o_k[None, :], b_du.to(p_du.dtype.element_ty), mask=m_b[:, None] & m_k[None, :])
    else:
        for k in range(0, D_in):
            b_wk = tl.load(p_w + k * stride_wk + o_wn, mask=m_n, other=0.0).to(tl.float32)
            tl.store(p_du + k, tl.sum(b_duh * b_wk[None, :], axis=1).to(p_du.dtype.element_ty), mask=m_b)
            b_uk = tl.load(p_u + o_b * stride_ub + k * stride_uk, mask=m_b, other=0.0).to(tl.float32)
            p_dw_k = p_dw + o_n * D_in + k
            tl.store(p_dw_k, tl.load(p_dw_k, mask=m_n, other=0.0) + tl.sum(b_duh * b_uk[:, None], axis=0), mask=m_n)
    return b_dw


# ---------------------------------------------------------------------------------------------
# kernels the algorithms share: per-example sums of a pass's partials in split order. They keep
# the names of the algorithm that introduced them (the kernel reports and the issue model are
# keyed by kernel name).


@triton.jit(do_not_specialize=["B", "SPLIT", "last"])
def dynamic_routing_finalize_kernel(
    part_ptr,  # [B, SPLIT, N_out, D] f32 partial s of the last iteration
    s_buf_ptr,  # [R, B, N_out, D] f32 saved s_r (slot R-1 written here)
    v_ptr,  # [B, N_out, D] output v, dtype of u_hat, contiguous
    B,
    N_out,
    D,
    SPLIT,
    last,  # R - 1
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_j, o_d, m_j, m_jd, o_jd = caps_block(N_out, D, BLOCK_J, BLOCK_D)
    caps_size = N_out * D
    b_s = sum_splits(part_ptr + i_b * SPLIT * caps_size, SPLIT, caps_size, o_jd, m_jd)
    b_unit, b_p, large = squash_parts(b_s)
    b_v = squash_from_parts(b_unit, b_p, large)
    tl.store(s_buf_ptr + (last * B + i_b) * caps_size + o_jd, b_s, mask=m_jd)
    tl.store(v_ptr + i_b * caps_size + o_jd, b_v.to(v_ptr.dtype.element_ty), mask=m_jd)


@triton.jit(do_not_specialize=["B", "SPLIT"])
def dynamic_routing_bwd_sum_kernel(
    dpart_ptr,  # [B, SPLIT, N_out, D] f32 partials of dV_r from the reduce launch for step r
    dvsum_ptr,  # [B, N_out, D] f32 running sum: dv_r in (unless FIRST), dv_{r-1} = dv_r + dV_r out
    B,
    N_out,
    D,
    SPLIT,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FIRST: tl.constexpr,  # r = R-1: dv_r is the output gradient, not in the running sum
):
    i_b = tl.program_id(0).to(tl.int64)
    o_j, o_d, m_j, m_jd, o_jd = caps_block(N_out, D, BLOCK_J, BLOCK_D)
    caps_size = N_out * D
    b_dV = sum_splits(dpart_ptr + i_b * SPLIT * caps_size, SPLIT, caps_size, o_jd, m_jd)
    p_sum = dvsum_ptr + i_b * caps_size + o_jd
    if not FIRST:
        b_dV += tl.load(p_sum, mask=m_jd, other=0.0)
    tl.store(p_sum, b_dV, mask=m_jd)


@triton.jit(do_not_specialize=["numel", "G"])
def fused_layer_bwd_dw_sum_kernel(
    dw_part_ptr,  # [G, numel] f32 the batch groups' parts of the weight gradient
    dw_ptr,  # [numel] the weight gradient, dtype of the weight, contiguous
    numel,
    G,
    BLOCK: tl.constexpr,
):
    """``dW = sum_g dW_part[g]``, in group order (deterministic)."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < numel
    b_acc = sum_splits(dw_part_ptr, G, numel, o, m)
    tl.store(dw_ptr + o, b_acc.to(dw_ptr.dtype.element_ty), mask=m)
