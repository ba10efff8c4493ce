"""Squash: the Triton kernels against the float64 reference, the reference against Eq. 1 as
printed, gradcheck, property tests, and operator registration on a GPU.

Kernel tolerances (``KERNEL_TOL``), as relative errors against float64: float32 5e-6, about 80
units of float32 rounding (2^-24) and well under DESIGN.md's 1e-5; float16/bfloat16 one eps of the
half type, since inputs are rounded to it first and the reference gets the same values, leaving
the final rounding (half an ulp) and the float32 arithmetic. Every buffer the ops allocate is
NaN-poisoned (tests/ops/conftest.py). On a machine without a GPU the kernels run on CPU tensors
through Triton's interpreter.
"""

from __future__ import annotations

import sys

import pytest
import torch
from _helpers import (
    DTYPE_IDS,
    DTYPES,
    KERNEL_DEVICE,
    KERNEL_TOL,
    assert_close,
    assert_float32_close,
    grads,
    naive_squash,
    rel_err,
    requires_cuda,
    shape_id,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

import capstriton as ct
from capstriton.ops.squash import efficient_squash_fwd, squash_fwd

TOL = KERNEL_TOL
#: Float64 reference against the printed formula: a few roundings of 2^-53 per term.
F64_TOL = 1e-12

# ---------------------------------------------------------------------------------------------
# the kernels against the float64 reference


def run_squash(s, grad_out, dim=-1):
    s_k = s.detach().clone().requires_grad_() if s.is_contiguous() else s.detach().requires_grad_()
    v = ct.squash(s_k, dim, backend="triton")
    v.backward(grad_out)
    s64 = s.detach().double().cpu().requires_grad_()
    ref = ct.squash(s64, dim, backend="torch")
    ref.backward(grad_out.double().cpu())
    assert v.dtype == s.dtype and v.shape == s.shape and s_k.grad.dtype == s.dtype
    return v, ref, s_k.grad, s64.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(5,), (3, 1), (7, 5), (2, 37, 16), (3, 33), (2, 3, 256), (0, 8)], ids=shape_id)
def test_squash(shape, dtype):
    s = torch.randn(shape, device=KERNEL_DEVICE).to(dtype)
    g = torch.randn(shape, device=KERNEL_DEVICE).to(dtype)
    v, ref, ds, ds_ref = run_squash(s, g)
    if s.numel():
        assert_close("v", v, ref, TOL[dtype])
        assert_close("ds", ds, ds_ref, TOL[dtype])


def test_squash_extreme_rows():
    s = torch.randn(5, 13, device=KERNEL_DEVICE)
    s[0] = 0.0
    s[1] *= 1e-30
    s[2] *= 1e30
    s[3] = torch.tensor([1e30, 1e-30] + [0.0] * 11)  # mixed magnitudes in one vector
    g = torch.randn(5, 13, device=KERNEL_DEVICE)
    v, ref, ds, ds_ref = run_squash(s, g)
    assert torch.isfinite(v).all() and torch.isfinite(ds).all()
    assert (v[0] == 0).all() and (ds[0] == 0).all()
    # |v| ~ |s|^2 = 1e-60 for the tiny row: below float32's smallest subnormal, exactly 0
    assert ref[1].abs().max() < 1e-45 and (v[1] == 0).all()
    for row in range(5):  # row by row: their magnitudes differ by 60 orders
        if row != 1:
            assert rel_err(v[row], ref[row]) < TOL[torch.float32]
        assert rel_err(ds[row], ds_ref[row]) < TOL[torch.float32]


def test_squash_dim_non_contiguous_expanded_gradient():
    s = torch.randn(6, 4, 9, device=KERNEL_DEVICE).transpose(0, 2)  # [9, 4, 6], squash over dim 0
    g = torch.ones(1, 1, 1, device=KERNEL_DEVICE).expand(9, 4, 6)
    v, ref, ds, ds_ref = run_squash(s, g, dim=0)
    assert_close("v", v, ref, TOL[torch.float32])
    assert_close("ds", ds, ds_ref, TOL[torch.float32])


@pytest.mark.parametrize("scale", [1e-19, 1e-20, 3e-39, 1e-40, 1e-44], ids=lambda s: f"{s:g}")
def test_squash_tiny_and_subnormal_rows(scale):
    s = scale * torch.tensor([[1.0, -0.5, 0.25], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], device=KERNEL_DEVICE)
    g = torch.randn(3, 3, device=KERNEL_DEVICE)
    v, ref, ds, ds_ref = run_squash(s, g)
    assert_float32_close("v", v, ref)
    assert_float32_close("ds", ds, ds_ref)


@pytest.mark.parametrize("scale", [1e-15, 1e-19, 1e-21, 1e-22, 1e-23, 1e-25, 1e-30, 1e-38], ids=lambda s: f"{s:g}")
def test_torch_squash_float32_gradient_of_tiny_rows(scale):
    """The reference in float32 (the CPU path) rather than the kernels: the gradient ``n I + s s^T / n``
    of a tiny row is of the order of ``|s|``, representable in float32, and exact to float32
    rounding at every scale. The reference returned 0 below 1e-24, and up to 70% off between 1e-21
    and 1e-23, while it took the norm's gradient through ``scale * ||t||``."""
    gen = torch.Generator().manual_seed(7)
    s = scale * torch.randn(6, 16, generator=gen)
    g = torch.randn(6, 16, generator=gen)
    (ds,) = grads(lambda x: ct.squash(x, backend="torch"), [s], g)
    s64 = s.double().requires_grad_()
    (ds_ref,) = torch.autograd.grad(ct.squash(s64, backend="torch"), s64, g.double())
    assert ds_ref.abs().max() > 1e-6 * scale  # the true gradient: of the order of |s|, not 0
    assert_float32_close("ds", ds, ds_ref)


@pytest.mark.parametrize(
    "dtype, scale",
    [(torch.float32, 1e-3), (torch.float32, 1e-12), (torch.float32, 1e-16), (torch.float32, 1e-18),
     (torch.float64, 1e-100), (torch.float64, 1e-150)],
)
def test_torch_squash_double_backward_of_small_rows(dtype, scale):
    """Hessian-vector products of the reference (double backward, README "Backends") against the
    plain formula ``s |s| / (1 + |s|^2)`` in float64, for rows small enough that the reference's
    tiny-row handling could matter: exact down to sqrt(tiny) of the dtype (1e-19 in float32). A
    first version of that handling cut a term of order 1 from 7e-15 down (the review)."""
    gen = torch.Generator().manual_seed(11)
    s, w, h = (torch.randn(5, 9, generator=gen, dtype=torch.float64) for _ in range(3))
    s = scale * s

    def hvp(fn, x):
        x = x.detach().requires_grad_()
        (g,) = torch.autograd.grad((fn(x) * w.to(x.dtype)).sum(), x, create_graph=True)
        return torch.autograd.grad((g * h.to(x.dtype)).sum(), x)[0]

    def plain(x):
        n = x.norm(dim=-1, keepdim=True)
        return x * n / (1 + n * n)

    out = hvp(lambda x: ct.squash(x, backend="torch"), s.to(dtype))
    ref = hvp(plain, s)
    assert rel_err(out, ref) < (KERNEL_TOL[torch.float32] if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fn", [ct.squash, ct.efficient_squash], ids=["squash", "efficient_squash"])
def test_a_nan_component_makes_its_whole_capsule_nan(fn, backend):
    """NaN in one component: the norm is NaN, so is every component of that capsule, on both
    backends; the other capsules are untouched. The reference's efficient squash took such a row
    for a zero vector and returned its other components unsquashed."""
    s = torch.tensor([[float("nan"), 1.0, 2.0], [0.5, -1.0, 2.0], [float("nan"), 0.0, 0.0]], device=KERNEL_DEVICE)
    v = fn(s, backend=backend)
    assert torch.isnan(v[0]).all() and torch.isnan(v[2]).all()
    torch.testing.assert_close(v[1], fn(s[1:2], backend="torch")[0])


def test_half_squash_keeps_dtype():
    for dtype in (torch.float16, torch.bfloat16):
        s = torch.randn(4, 7, 5).to(dtype)
        v = ct.squash(s)
        assert v.dtype == dtype
        assert_close("v", v, ct.squash(s.double()), torch.finfo(dtype).eps)


@requires_cuda
@pytest.mark.cuda
def test_opcheck_squash():
    s = torch.randn(5, 37, 16, device="cuda", requires_grad=True)
    torch.library.opcheck(squash_fwd, (s,))
    torch.library.opcheck(efficient_squash_fwd, (s,))


# ---------------------------------------------------------------------------------------------
# the reference against Eq. 1, gradcheck


@pytest.mark.parametrize("d", [1, 5, 16, 33])
def test_squash_matches_eq1(d):
    s = (
        torch.randn(6, d, dtype=torch.float64)
        * torch.logspace(-3, 3, 6, dtype=torch.float64)[:, None]
    )
    upstream = torch.randn(6, d, dtype=torch.float64)

    def loop(x):
        return torch.stack([naive_squash(row) for row in x])

    assert rel_err(ct.squash(s), loop(s)) < F64_TOL
    (g_ours,) = grads(ct.squash, [s], upstream)
    (g_loop,) = grads(loop, [s], upstream)
    assert_close("g_ours", g_ours, g_loop, F64_TOL)


def test_squash_dim_argument():
    s = torch.randn(3, 4, 5, dtype=torch.float64)
    expected = ct.squash(s.movedim(1, -1)).movedim(-1, 1)
    assert rel_err(ct.squash(s, dim=1), expected) < F64_TOL
    assert rel_err(ct.squash(s, dim=-2), expected) < F64_TOL


def test_squash_gradcheck_with_zero_vectors():
    s = torch.randn(5, 4, dtype=torch.float64)
    s[1] = 0.0
    s[3] = 1e-8
    s[4] = torch.tensor([1e3, -2e3, 0.0, 5e2])
    assert torch.autograd.gradcheck(ct.squash, (s.requires_grad_(),))
    # Second derivatives only away from 0: squash is C1 but not C2 at s = 0 (like s * |s|).
    assert torch.autograd.gradgradcheck(ct.squash, (s.detach()[[0, 2, 4]].requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", [1, 3, 16])
def test_squash_jacobian_at_zero_is_exactly_zero(d, dtype):
    jac = torch.autograd.functional.jacobian(ct.squash, torch.zeros(d, dtype=dtype))
    assert jac.shape == (d, d)
    assert torch.count_nonzero(jac) == 0
    assert torch.count_nonzero(ct.squash(torch.zeros(2, d, dtype=dtype))) == 0



# ---------------------------------------------------------------------------------------------
# properties of the reference (hypothesis): finite, shorter than 1, same direction


# derandomize: CI runs the same examples every time (a failure is reproducible, not a flake);
# explore further locally with a larger max_examples.
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)


# Magnitudes that break naive implementations, mixed freely within one vector.
SPECIAL = [0.0, 1e-30, -1e-30, 1e-20, 1.0, -1.0, 1e20, 1e30, -1e30]


@st.composite
def capsule_batches(draw):
    """``s`` ``[rows, D]`` in float32 or float64 mixing zeros, tiny, huge and ordinary values."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    rows = draw(st.integers(1, 4))
    d = draw(st.integers(1, 17))
    width = 32 if dtype == torch.float32 else 64
    element = st.one_of(
        st.sampled_from(SPECIAL),
        st.floats(-1e3, 1e3, width=width),
        st.floats(allow_nan=False, allow_infinity=False, width=width),
    )
    values = draw(st.lists(element, min_size=rows * d, max_size=rows * d))
    return torch.tensor(values, dtype=dtype).view(rows, d)


def exact_norms(s: torch.Tensor) -> torch.Tensor:
    """||s|| per row in float64 without overflow or underflow (scaled by the largest entry).

    Accurate to a few float64 ulps, so it serves as the exact value for float32 and float64 s.
    """
    x = s.double()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scaled = x / torch.where(amax > 0, amax, torch.ones_like(amax))
    return (amax * torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)).squeeze(-1)


def unit_vectors(s: torch.Tensor) -> torch.Tensor:
    """s / ||s|| per row in float64, from the scaled rows: exact_norms itself overflows to inf for
    rows near float64's largest value (hypothesis found [3e300, 1.8e308])."""
    x = s.double()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scaled = x / torch.where(amax > 0, amax, torch.ones_like(amax))
    return scaled / torch.linalg.vector_norm(scaled, dim=-1, keepdim=True).clamp_min(1e-300)


def expected_lengths(s: torch.Tensor) -> torch.Tensor:
    """n^2 / (1 + n^2) with n = ||s||, written to stay finite for n up to 1e308."""
    n = exact_norms(s)
    inv = torch.where(n > 0, 1.0 / n, torch.zeros_like(n))
    return torch.where(n >= 1, 1.0 / (1.0 + inv * inv), n * n / (1.0 + n * n))


@SETTINGS
@given(capsule_batches())
@example(torch.tensor([[0.0, 0.0], [3.2808e300, sys.float_info.max]], dtype=torch.float64))
def test_squash_is_finite_short_and_keeps_direction(s):
    finfo = torch.finfo(s.dtype)
    d = s.shape[-1]
    v = ct.squash(s)
    assert v.dtype == s.dtype
    assert torch.isfinite(v).all()

    lengths = exact_norms(v)
    expected = expected_lengths(s)
    # Rounding: the reference forms v = t * (L / m) with ||t|| and m from a sum of D squares and
    # a sqrt, a few roundings each of at most eps, so ||v|| = L (1 + delta) with
    # |delta| <= (D + 4) eps. Lengths within tiny of 0 are in gradual underflow, where only an
    # absolute bound holds. In particular ||v|| <= 1 + (D + 4) eps: for ||s|| above ~1/sqrt(eps)
    # the exact length 1 - 1/(1 + ||s||^2) rounds to 1, so "< 1" holds only up to rounding...
    tol = (d + 4) * finfo.eps
    assert ((lengths - expected).abs() <= tol * expected + finfo.tiny).all()
    assert (lengths <= 1.0 + tol).all()
    # ...and strictly wherever ||s|| <= 100, where 1 - L >= 1e-4 is far above the rounding.
    moderate = exact_norms(s) <= 100
    assert (lengths[moderate] < 1.0).all()

    # Direction: v = t * (L / m) with t = s / max|s|: two roundings per component (t and the
    # product, each a relative error of at most eps / 2), the common factor L / m does not turn
    # v. Relative component errors delta move the unit vector by at most 2 max|delta| <= 2 eps;
    # 4 eps leaves room for the float64 unit vectors. Checked where the components of v are not
    # subnormal (||v|| >= tiny / eps). (The distance, not 1 - cos: that is quadratic in the angle.)
    visible = lengths >= finfo.tiny / finfo.eps
    if visible.any():
        turn = torch.linalg.vector_norm(unit_vectors(s[visible]) - unit_vectors(v[visible]), dim=-1)
        assert (turn <= 4 * finfo.eps).all(), turn.max()
    # Zero in, zero out.
    zero = exact_norms(s) == 0
    assert (v[zero] == 0).all()


@SETTINGS
@given(capsule_batches())
def test_squash_gradients_are_finite(s):
    s = s.clone().requires_grad_(True)
    upstream = torch.linspace(-1.0, 1.0, s.numel(), dtype=s.dtype).view_as(s)
    (ct.squash(s) * upstream).sum().backward()
    assert torch.isfinite(s.grad).all()



def test_buffers_are_poisoned():
    """The guard of every kernel test here: the ops' buffers come NaN-filled (tests/ops/conftest.py)."""
    from capstriton.ops._launch import empty

    assert torch.isnan(empty((3, 2), torch.float32, torch.device(KERNEL_DEVICE))).all()
