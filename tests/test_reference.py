"""The reference backend (``backend="torch"``) against independent naive loops, autograd's
gradcheck, and the dtype rules of DESIGN.md section 2.

Tolerances: in float64 the reference and the loops compute the same sums in different orders,
so they differ by a few units of rounding (2^-53 ~ 1.1e-16) times the number of terms and
iterations (37 terms x 5 iterations: ~2e-14); 1e-12 leaves a factor of 50 above that and is
still far below any real mistake (a wrong axis or a missing term gives O(1) relative error).
"""

from __future__ import annotations

import pytest
import torch
from _helpers import grads, naive_predictions, naive_routing, naive_squash, rel_err

import capstriton as ct
from capstriton import reference

F64_TOL = 1e-12

# (B, N_in, N_out, D, iterations): the odd sizes of DESIGN.md section 4, small enough that the
# naive loops stay fast.
ROUTING_CASES = [
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
@pytest.mark.parametrize("case", ROUTING_CASES, ids=case_id)
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
    assert rel_err(g_ours, g_loop) < F64_TOL


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


@pytest.mark.parametrize("grad_through_routing", [True, False], ids=["grad-all", "grad-last"])
@pytest.mark.parametrize(
    "shape",
    [(2, 7, 3, 5, 4, 3), (1, 1, 1, 1, 1, 1), (3, 37, 10, 16, 8, 2), (2, 7, 2, 1, 5, 5)],
    ids=lambda s: "B{}-in{}-out{}-Dout{}-Din{}-R{}".format(*s),
)
def test_capsule_routing_matches_naive_loop(shape, grad_through_routing):
    b, n_in, n_out, d_out, d_in, r = shape
    u = torch.randn(b, n_in, d_in, dtype=torch.float64)
    weight = 0.3 * torch.randn(n_in, n_out, d_out, d_in, dtype=torch.float64)
    upstream = torch.randn(b, n_out, d_out, dtype=torch.float64)

    def ours(u, w):
        return ct.capsule_routing(
            u, w, r, grad_through_routing=grad_through_routing, backend="torch"
        )

    def loop(u, w):
        return naive_routing(naive_predictions(u, w), r, grad_through_routing)

    assert rel_err(ours(u, weight), loop(u, weight)) < F64_TOL
    for g_ours, g_loop in zip(
        grads(ours, [u, weight], upstream), grads(loop, [u, weight], upstream), strict=True
    ):
        assert rel_err(g_ours, g_loop) < F64_TOL


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
    assert rel_err(g_ours, g_loop) < F64_TOL


def test_squash_dim_argument():
    s = torch.randn(3, 4, 5, dtype=torch.float64)
    expected = ct.squash(s.movedim(1, -1)).movedim(-1, 1)
    assert rel_err(ct.squash(s, dim=1), expected) < F64_TOL
    assert rel_err(ct.squash(s, dim=-2), expected) < F64_TOL


def test_routing_is_per_example_with_fresh_logits():
    u_hat = random_u_hat(4, 7, 3, 5)
    batched = ct.dynamic_routing(u_hat, 3)
    one_by_one = torch.cat([ct.dynamic_routing(u_hat[k : k + 1], 3) for k in range(4)])
    assert rel_err(batched, one_by_one) < F64_TOL
    # No state carried between calls: a second call gives the identical result.
    assert torch.equal(ct.dynamic_routing(u_hat, 3), batched)


# --- gradcheck ----------------------------------------------------------------------------------


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


def test_capsule_routing_gradcheck():
    u = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = (0.5 * torch.randn(3, 2, 3, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda u, w: ct.capsule_routing(u, w, 2), (u, weight))


# --- dtypes -------------------------------------------------------------------------------------

HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
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


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_squash_and_capsule_routing_keep_dtype(dtype):
    s = torch.randn(4, 7, 5).to(dtype)
    v = ct.squash(s)
    assert v.dtype == dtype
    assert rel_err(v, ct.squash(s.double())) < torch.finfo(dtype).eps

    u = torch.randn(2, 37, 8).to(dtype)
    weight = (0.1 * torch.randn(37, 10, 16, 8)).to(dtype)
    out = ct.capsule_routing(u, weight)
    assert out.dtype == dtype
    assert rel_err(out, ct.capsule_routing(u.double(), weight.double())) < torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_float_outputs_keep_dtype(dtype):
    u_hat = random_u_hat(2, 7, 3, 5, dtype=dtype)
    assert ct.dynamic_routing(u_hat).dtype == dtype
    assert ct.squash(u_hat).dtype == dtype


def test_float32_routing_against_float64():
    # Float32 accumulation over 1152 input capsules: 1e-5 is ~80 ulps (eps = 1.2e-7; seen: ~6.5e-7).
    u_hat = random_u_hat(2, 1152, 10, 16, dtype=torch.float32)
    assert rel_err(ct.dynamic_routing(u_hat, 3), ct.dynamic_routing(u_hat.double(), 3)) < 1e-5


# --- predictions --------------------------------------------------------------------------------


def test_capsule_predictions_match_einsum_and_loop():
    u = torch.randn(3, 7, 4, dtype=torch.float64)
    weight = torch.randn(7, 5, 6, 4, dtype=torch.float64)
    u_hat = reference.capsule_predictions(u, weight)
    assert u_hat.shape == (3, 7, 5, 6)
    assert rel_err(u_hat, torch.einsum("ijdk,bik->bijd", weight, u)) < F64_TOL
    assert rel_err(u_hat, naive_predictions(u, weight)) < F64_TOL


def test_capsule_predictions_never_copy_the_weight_per_example():
    """Every tensor produced in the forward and backward of the predictions is smaller than a
    per-example copy of the weight (B x weight.numel()): broadcasting the weight over the batch
    (``weight[None] @ u[..., None]``, as in many ports) materialises exactly such a copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    batch, d_in = 16, 8
    u = torch.randn(batch, 32, d_in, requires_grad=True)
    weight = torch.randn(32, 10, 16, d_in, requires_grad=True)
    per_example_copy = batch * weight.numel()
    with LargestOutput() as mode:
        reference.capsule_predictions(u, weight).square().sum().backward()
    # u_hat itself is B x weight.numel() / D_in.
    assert mode.largest == per_example_copy // d_in

    with LargestOutput() as naive_mode:
        (weight[None] @ u[:, :, None, :, None]).square().sum().backward()
    assert naive_mode.largest >= per_example_copy  # the measurement can see the bad pattern
