"""Property tests (hypothesis) of the reference: squash is finite, shorter than 1 and keeps the
direction for every finite input; routing's coupling coefficients are a softmax over the output
capsules."""

from __future__ import annotations

import sys

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import capstriton as ct

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


@st.composite
def routing_inputs(draw):
    b = draw(st.integers(1, 3))
    n_in = draw(st.integers(1, 9))
    n_out = draw(st.integers(1, 6))
    d = draw(st.integers(1, 6))
    scale = draw(st.sampled_from([0.0, 1e-3, 0.3, 1.0, 10.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    u_hat = scale * torch.randn(b, n_in, n_out, d, dtype=torch.float64, generator=gen)
    return u_hat, draw(st.integers(1, 4))


@SETTINGS
@given(routing_inputs())
def test_coupling_coefficients_are_a_softmax_over_output_capsules(args):
    """Rebuild the coupling coefficients of the last iteration from the outputs of shorter runs
    (routing starts from fresh zero logits every call, so ``dynamic_routing(u_hat, r)`` is
    ``v^(r)``) via ``b_ij = u_hat_ij . (v^(1) + ... + v^(R-1))``, take the softmax over j, and
    check that they reproduce ``v^(R)``. A softmax over the input capsules (the wrong axis)
    would not."""
    u_hat, iterations = args
    running = torch.zeros(u_hat.shape[0], u_hat.shape[2], u_hat.shape[3], dtype=u_hat.dtype)
    for r in range(1, iterations):
        running = running + ct.dynamic_routing(u_hat, r)
    logits = torch.einsum("bijd,bjd->bij", u_hat, running)
    c = torch.softmax(logits, dim=2)

    s = torch.einsum("bij,bijd->bjd", c, u_hat)
    n2 = (s * s).sum(-1, keepdim=True)
    v_expected = s * n2.sqrt() / (1 + n2)
    v = ct.dynamic_routing(u_hat, iterations)
    # Float64 with up to 9 x 6 terms and 4 iterations: errors of order 1e-15 relative to the
    # output scale; the absolute term covers outputs that are 0 (scale 0 or 1e-3 inputs).
    assert torch.allclose(v, v_expected, rtol=1e-12, atol=1e-15)
