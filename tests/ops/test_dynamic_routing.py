"""Dynamic routing: the Triton kernels against the float64 reference (the shape grid of DESIGN.md
section 4, both gradient modes, every dtype, odd batches, extreme magnitudes, strides, forced
splits), the reference against Procedure 1 written as naive loops, gradcheck, the softmax axis as
a property, and operator registration and compiled execution on a GPU.

Tolerances as in tests/ops/test_squash.py (``KERNEL_TOL``); in float64 the reference and the
loops differ by a few roundings times the number of terms and iterations (~2e-14 for 37 terms
and 5 iterations), so 1e-12 (``F64_TOL``) is far below any real mistake (a wrong axis or a
missing term gives O(1) relative error).
"""

from __future__ import annotations

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
    grid_params,
    naive_routing,
    rel_err,
    requires_cuda,
    shape_id,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import capstriton as ct
from capstriton.ops import dynamic_routing as ops
from capstriton.ops.dynamic_routing import RoutingTuning, routing_config

TOL = KERNEL_TOL
F64_TOL = 1e-12
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)

# (N_in, N_out, D): every size of DESIGN.md section 4's grid appears (N_in 1 7 37 1152,
# N_out 1 2 3 10, D 1 5 16 33), in combinations that mix small and odd with padded tiles.
SHAPES = [(1, 1, 1), (7, 2, 5), (37, 3, 16), (37, 10, 33), (7, 10, 1), (37, 1, 5), (7, 3, 33), (1, 2, 16)]

# ---------------------------------------------------------------------------------------------
# the kernels against the float64 reference


def run_routing(u, iterations, grad_mode, grad_out, tuning=None):
    """Triton forward and gradient for ``u`` (any dtype/strides) against float64 on the same
    values; ``tuning`` calls the op with those launch parameters instead of the defaults."""
    u_k = u.detach().clone().requires_grad_() if u.is_contiguous() else u.detach().requires_grad_()
    if tuning is None:
        v = ct.dynamic_routing(u_k, iterations, grad_through_routing=grad_mode, backend="triton")
    else:
        v = ops.dynamic_routing(u_k, iterations, grad_mode, tuning)
    v.backward(grad_out)
    u64 = u.detach().double().cpu().requires_grad_()
    ref = ct.dynamic_routing(u64, iterations, grad_through_routing=grad_mode, backend="torch")
    ref.backward(grad_out.double().cpu())
    assert v.dtype == u.dtype and v.shape == ref.shape
    assert u_k.grad.dtype == u.dtype and u_k.grad.shape == u.shape
    return v, ref, u_k.grad, u64.grad


# Every shape at the paper's 3 iterations, and 1, 2, 5 iterations on shapes cheap enough for the
# interpreter (each iteration is a pass, and the backward replays all of them).
ROUTING_CASES = [(shape, 3) for shape in SHAPES] + [
    ((7, 2, 5), 1),
    ((7, 2, 5), 2),
    ((7, 2, 5), 5),
    ((1, 1, 1), 5),
    ((37, 3, 16), 1),
    ((37, 3, 16), 5),
    ((3, 64, 64), 2),  # the largest N_out and D the kernels promise: 32 warps, one capsule per tile
]


@pytest.mark.parametrize("grad_mode", [True, False], ids=["through", "detached"])
@pytest.mark.parametrize(
    ("shape", "iterations"),
    grid_params(
        ROUTING_CASES,
        [f"{shape_id(s)}-R{r}" for s, r in ROUTING_CASES],
        keep={"1x1x1-R3", "7x2x5-R3", "7x2x5-R1", "3x64x64-R2"},
    ),
)
def test_routing_fp32(shape, iterations, grad_mode):
    u = torch.randn(3, *shape, device=KERNEL_DEVICE)
    g = torch.randn(3, shape[1], shape[2], device=KERNEL_DEVICE)
    v, ref, du, du_ref = run_routing(u, iterations, grad_mode, g)
    assert_close("v", v, ref, TOL[torch.float32])
    assert_close("du", du, du_ref, TOL[torch.float32])


@pytest.mark.parametrize("grad_mode", [True, False], ids=["through", "detached"])
@pytest.mark.parametrize(
    ("batch", "shape"),
    [
        (1, (1152, 3, 5)),
        # the paper's DigitCaps: about a minute per case under the interpreter, so GPU only
        pytest.param(3, (1152, 10, 16), marks=requires_cuda),
    ],
    ids=["B1-1152x3x5", "B3-1152x10x16"],
)
def test_routing_1152_input_capsules(batch, shape, grad_mode):
    """N_in = 1152 (the paper's primary capsules): many tiles and, at small batch, many splits."""
    u = 0.05 * torch.randn(batch, *shape, device=KERNEL_DEVICE)
    g = torch.randn(batch, shape[1], shape[2], device=KERNEL_DEVICE)
    v, ref, du, du_ref = run_routing(u, 3, grad_mode, g)
    assert_close("v", v, ref, TOL[torch.float32])
    assert_close("du", du, du_ref, TOL[torch.float32])


DTYPE_SHAPES = [(37, 10, 16), (7, 3, 5)]


@pytest.mark.parametrize("grad_mode", [True, False], ids=["through", "detached"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape", grid_params([(s,) for s in DTYPE_SHAPES], [shape_id(s) for s in DTYPE_SHAPES], keep={"7x3x5"})
)
def test_routing_dtypes(shape, dtype, grad_mode):
    u = torch.randn(5, *shape, device=KERNEL_DEVICE).to(dtype)
    g = torch.randn(5, shape[1], shape[2], device=KERNEL_DEVICE).to(dtype)
    v, ref, du, du_ref = run_routing(u, 3, grad_mode, g)
    assert_close("v", v, ref, TOL[dtype])
    assert_close("du", du, du_ref, TOL[dtype])


@pytest.mark.parametrize("batch", [0, 1, 5, 37])
def test_routing_batch_sizes(batch):
    u = torch.randn(batch, 7, 3, 5, device=KERNEL_DEVICE)
    g = torch.randn(batch, 3, 5, device=KERNEL_DEVICE)
    v, ref, du, du_ref = run_routing(u, 3, True, g)
    assert v.shape == (batch, 3, 5) and du.shape == u.shape
    if batch:
        assert_close("v", v, ref, TOL[torch.float32])
        assert_close("du", du, du_ref, TOL[torch.float32])


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30], ids=["zero", "tiny", "huge"])
def test_routing_extreme_magnitudes(scale):
    u = scale * torch.randn(3, 7, 3, 5, device=KERNEL_DEVICE)
    u[1] = 0.0  # one example of exact zeros among the others
    g = torch.randn(3, 3, 5, device=KERNEL_DEVICE)
    v, ref, du, du_ref = run_routing(u, 3, True, g)
    assert torch.isfinite(v).all() and torch.isfinite(du).all()
    assert (v[1] == 0).all() and (du[1] == 0).all()  # zero Jacobian of squash at s = 0
    if scale == 1e-30:
        # |v| = |s|^2 / (1 + |s|^2) ~ 1e-60: below float32's smallest subnormal (1.4e-45), so
        # the exact float32 answer is 0; the gradient (~|s|) is representable and checked.
        assert ref.abs().max() < 1e-45 and (v == 0).all()
    else:
        # for 1e30 the logits are ~1e30 and the softmax saturates alike in float32 and float64
        assert_close("v", v, ref, TOL[torch.float32])
    assert_close("du", du, du_ref, TOL[torch.float32])


@pytest.mark.parametrize("signs", [False, True], ids=["equal", "random-signs"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_routing_values_finite_up_to_the_documented_bound(backend, signs):
    """README ("Semantics"): the values are finite on both backends while max(N_in, R) times the
    largest prediction norm stays below float max (the sums reach N_in times it, the logits R - 1
    times). At 0.9 of it, every prediction of that norm (the sums and the logits at their
    largest), over N_in 1 to 9 and 1 to 8 iterations. Break-testing found the README's former
    example (1e38 over 9 capsules of 16 components, past the bound) NaN on the triton backend,
    and the review a bound without R false for N_in < R - 1."""
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(3)
    for n_in, n_out, d in ((1, 3, 16), (2, 3, 4), (3, 2, 1), (9, 10, 16)):
        for iterations in (1, 2, 3, 5, 8):
            norm = 0.9 * torch.finfo(torch.float32).max / max(n_in, iterations)
            u = torch.full((2, n_in, n_out, d), norm / d**0.5)
            if signs:
                u = u * torch.randn(u.shape, generator=gen).sign()
            v = ct.dynamic_routing(u.to(dev), iterations, backend=backend)
            assert torch.isfinite(v).all(), (n_in, n_out, d, iterations)
            assert (v.double().norm(dim=-1) <= 1 + 1e-6).all()


def test_routing_non_contiguous_and_expanded_gradient():
    base = torch.randn(10, 5, 3, 7, device=KERNEL_DEVICE)
    u = base.permute(1, 0, 2, 3)[:, ::2]  # [5, 5, 3, 7], no unit stride on the batch or N_in axes
    assert not u.is_contiguous()
    u_k = u.detach().requires_grad_()
    v = ct.dynamic_routing(u_k, 3, backend="triton")
    v.sum().backward()  # the incoming gradient has stride 0 everywhere
    u64 = u.detach().double().cpu().requires_grad_()
    ref = ct.dynamic_routing(u64, 3, backend="torch")
    ref.sum().backward()
    assert_close("v", v, ref, TOL[torch.float32])
    assert_close("u_k.grad", u_k.grad, u64.grad, TOL[torch.float32])


def test_routing_deterministic():
    u = torch.randn(2, 37, 10, 16, device=KERNEL_DEVICE, requires_grad=True)
    outs = []
    for _ in range(2):
        v = ct.dynamic_routing(u, 3, backend="triton")
        (du,) = torch.autograd.grad(v, u, torch.ones_like(v))
        outs.append((v, du))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def _passes(cfg, tuning):
    """(pass config, program target) of the forward and of the backward."""
    return [(cfg.fwd, tuning.target_programs), (cfg.bwd, tuning.target_programs_bwd)]


@pytest.mark.parametrize("grad_mode", [True, False], ids=["through", "detached"])
def test_routing_splits_of_several_tiles(grad_mode):
    """The loop over several tiles per split, a shorter last split (ending in a partial tile) and
    forward and backward splits that differ: at the test sizes the default parameters give one
    tile per split, so smaller tiles and program targets are passed explicitly here."""
    n_in, n_out, d, batch = 37, 3, 5, 3
    tuning = RoutingTuning(tile=64, tile_bwd=128, target_programs=12, target_programs_bwd=9)
    cfg = routing_config(n_in, n_out, d, batch, tuning)
    for p, _ in _passes(cfg, tuning):
        assert p.caps_per_split >= 3 * p.block_i  # several tiles per split
        assert 0 < n_in - (p.split - 1) * p.caps_per_split < p.caps_per_split  # a shorter last split
        assert n_in % p.block_i  # ending in a partial tile
    assert (cfg.fwd.split, cfg.fwd.block_i) != (cfg.bwd.split, cfg.bwd.block_i)
    u = torch.randn(batch, n_in, n_out, d, device=KERNEL_DEVICE)
    g = torch.randn(batch, n_out, d, device=KERNEL_DEVICE)
    v, ref, du, du_ref = run_routing(u, 3, grad_mode, g, tuning)
    assert_close("v", v, ref, TOL[torch.float32])
    assert_close("du", du, du_ref, TOL[torch.float32])


@pytest.mark.parametrize("n_in", [1, 7, 37, 1152, 1153])
@pytest.mark.parametrize(("n_out", "d"), [(1, 1), (10, 16), (3, 33), (64, 64)])
def test_routing_config_splits_cover_the_input_capsules(n_in, n_out, d):
    """Every split of the forward and of the backward is non-empty and whole tiles long, the
    last one ending at N_in, so together they cover the input capsules once, at every batch."""
    tuning = RoutingTuning()
    for batch in [0, 1, 3, 64, 1000, 1024, 5000]:
        cfg = routing_config(n_in, n_out, d, batch)
        assert cfg.block_j >= n_out and cfg.block_d >= d
        for p, target in _passes(cfg, tuning):
            assert p.split >= 1 and p.caps_per_split % p.block_i == 0
            assert (p.split - 1) * p.caps_per_split < n_in <= p.split * p.caps_per_split
            # at most ceil(target / batch) splits: the grid stays under target + batch programs
            assert batch * p.split < target + batch


@pytest.mark.parametrize("grad_mode", [True, False], ids=["through", "detached"])
@pytest.mark.parametrize("scale", [3e-39, 1e-41], ids=lambda s: f"{s:g}")
def test_routing_subnormal_predictions(scale, grad_mode):
    u = scale * torch.randn(2, 7, 3, 5, device=KERNEL_DEVICE)
    g = torch.randn(2, 3, 5, device=KERNEL_DEVICE)
    v, ref, du, du_ref = run_routing(u, 3, grad_mode, g)
    assert_float32_close("v", v, ref)
    assert_float32_close("du", du, du_ref)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("grad_mode", [True, False], ids=["through", "detached"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_dynamic_routing(dtype, grad_mode):
    u = torch.randn(3, 37, 10, 16, device="cuda", dtype=dtype, requires_grad=True)
    torch.library.opcheck(ops.dynamic_routing_fwd, (u, 3, grad_mode, RoutingTuning().as_list()))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("grad_mode", [True, False], ids=["through", "detached"])
def test_compiled_routing_matches_eager(grad_mode):
    torch._dynamo.reset()
    u = torch.randn(64, 1152, 10, 16, device="cuda", requires_grad=True)
    g = torch.randn(64, 10, 16, device="cuda")

    def fn(x):
        return ct.dynamic_routing(x, 3, grad_through_routing=grad_mode, backend="triton")

    v_eager = fn(u)
    (du_eager,) = torch.autograd.grad(v_eager, u, g)
    v_comp = torch.compile(fn, fullgraph=True)(u)
    (du_comp,) = torch.autograd.grad(v_comp, u, g)
    # the same kernels with the same launch parameters: identical results
    assert torch.equal(v_eager, v_comp) and torch.equal(du_eager, du_comp)


# ---------------------------------------------------------------------------------------------
# the reference against Procedure 1 as naive loops, gradcheck, dtypes


# (B, N_in, N_out, D, iterations): the odd sizes of DESIGN.md section 4, small enough that the
# naive loops stay fast.
REFERENCE_CASES = [
    (1, 1, 1, 1, 1),
    (2, 7, 2, 5, 2),
    (2, 37, 10, 16, 3),
    (3, 7, 3, 16, 4),
    (1, 37, 1, 5, 5),
    (2, 1, 10, 1, 3),
    (1, 7, 10, 5, 5),
    (2, 37, 3, 1, 1),
]


def case_id(case) -> str:
    b, n_in, n_out, d, r = case
    return f"B{b}-in{n_in}-out{n_out}-D{d}-R{r}"


def random_u_hat(b, n_in, n_out, d, dtype=torch.float64):
    # Scale 0.5 keeps the squash away from saturation so every iteration changes the routing.
    return 0.5 * torch.randn(b, n_in, n_out, d, dtype=dtype)


@pytest.mark.parametrize("grad_through_routing", [True, False], ids=["grad-all", "grad-last"])
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=case_id)
def test_dynamic_routing_matches_naive_loop(case, grad_through_routing):
    b, n_in, n_out, d, r = case
    u_hat = random_u_hat(b, n_in, n_out, d)
    upstream = torch.randn(b, n_out, d, dtype=torch.float64)

    def ours(x):
        return ct.dynamic_routing(x, r, grad_through_routing=grad_through_routing, backend="torch")

    def loop(x):
        return naive_routing(x, r, grad_through_routing)

    assert rel_err(ours(u_hat), loop(u_hat)) < F64_TOL
    (g_ours,) = grads(ours, [u_hat], upstream)
    (g_loop,) = grads(loop, [u_hat], upstream)
    assert_close("g_ours", g_ours, g_loop, F64_TOL)


def test_gradient_modes_differ_beyond_one_iteration():
    # Guards the test above against passing because both modes were the same function.
    u_hat = random_u_hat(2, 7, 3, 5)
    upstream = torch.randn(2, 3, 5, dtype=torch.float64)
    g_all, g_last = (
        grads(lambda x, m=m: ct.dynamic_routing(x, 3, grad_through_routing=m), [u_hat], upstream)[0]
        for m in (True, False)
    )
    assert rel_err(g_last, g_all) > 1e-3
    # With one iteration there is nothing to detach: the modes coincide.
    g1 = [
        grads(lambda x, m=m: ct.dynamic_routing(x, 1, grad_through_routing=m), [u_hat], upstream)[0]
        for m in (True, False)
    ]
    assert rel_err(g1[0], g1[1]) < F64_TOL


def test_routing_is_per_example_with_fresh_logits():
    u_hat = random_u_hat(4, 7, 3, 5)
    batched = ct.dynamic_routing(u_hat, 3)
    one_by_one = torch.cat([ct.dynamic_routing(u_hat[k : k + 1], 3) for k in range(4)])
    assert_close("batched", batched, one_by_one, F64_TOL)
    # No state carried between calls: a second call gives the identical result.
    assert torch.equal(ct.dynamic_routing(u_hat, 3), batched)


@pytest.mark.parametrize("zeros", ["none", "some-rows", "all"])
def test_routing_gradcheck(zeros):
    """Gradient mode True only: with False the gradient is by design not the derivative of the
    forward (it treats the coupling coefficients as constants), so finite differences cannot
    check it; the naive-loop test above checks that mode."""
    u_hat = random_u_hat(2, 3, 2, 3)
    if zeros == "some-rows":
        u_hat[0, 1] = 0.0
        u_hat[1, :, 0] = 0.0  # output capsule 0 of example 1 gets s = 0 in every iteration
    elif zeros == "all":
        u_hat.zero_()

    def fn(x):
        return ct.dynamic_routing(x, 3, backend="torch")

    assert torch.autograd.gradcheck(fn, (u_hat.requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_are_computed_in_float32(dtype):
    u_hat = random_u_hat(3, 37, 10, 16, dtype=torch.float32).to(dtype)
    v = ct.dynamic_routing(u_hat, 3)
    assert v.dtype == dtype
    # Bit-identical to the float32 computation on the same (exactly representable) values,
    # rounded once at the end: the arithmetic runs in float32, not in the half type.
    assert torch.equal(v, ct.dynamic_routing(u_hat.float(), 3).to(dtype))
    # Against float64: only the final rounding (at most eps/2 relative per element) and float32
    # arithmetic (~1e-6) separate them, so eps of the half type bounds the relative error.
    assert rel_err(v, ct.dynamic_routing(u_hat.double(), 3)) < torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_float_outputs_keep_dtype(dtype):
    u_hat = random_u_hat(2, 7, 3, 5, dtype=dtype)
    assert ct.dynamic_routing(u_hat).dtype == dtype
    assert ct.squash(u_hat).dtype == dtype


def test_float32_routing_against_float64():
    # Float32 accumulation over 1152 input capsules: 1e-5 is ~80 ulps (eps = 1.2e-7; seen: ~6.5e-7).
    u_hat = random_u_hat(2, 1152, 10, 16, dtype=torch.float32)
    assert rel_err(ct.dynamic_routing(u_hat, 3), ct.dynamic_routing(u_hat.double(), 3)) < 1e-5


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
