"""The capsule layer (``ct.capsule_routing``: predictions, then routing): the triton path against
the float64 reference, the reference against naive loops and gradcheck, and the predictions'
memory pattern. Tolerances as in tests/ops/test_dynamic_routing.py.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import KERNEL_DEVICE, KERNEL_TOL, assert_close, grads, naive_predictions, naive_routing, rel_err

import capstriton as ct
from capstriton import reference

TOL = KERNEL_TOL
F64_TOL = 1e-12


def test_capsule_routing_triton_matches_reference():
    u = torch.randn(3, 37, 8, device=KERNEL_DEVICE, requires_grad=True)
    w = (0.1 * torch.randn(37, 10, 16, 8, device=KERNEL_DEVICE)).requires_grad_()
    v = ct.capsule_routing(u, w, 3, backend="triton")
    g = torch.randn_like(v)
    du, dw = torch.autograd.grad(v, (u, w), g)
    u64, w64 = u.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    ref = ct.capsule_routing(u64, w64, 3, backend="torch")
    du_ref, dw_ref = torch.autograd.grad(ref, (u64, w64), g.double().cpu())
    assert_close("v", v, ref, TOL[torch.float32])
    assert_close("du", du, du_ref, TOL[torch.float32])
    assert_close("dw", dw, dw_ref, TOL[torch.float32])


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
        assert_close("g_ours", g_ours, g_loop, F64_TOL)


def test_capsule_routing_gradcheck():
    u = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = (0.5 * torch.randn(3, 2, 3, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda u, w: ct.capsule_routing(u, w, 2), (u, weight))



def test_half_capsule_routing_keeps_dtype():
    for dtype in (torch.float16, torch.bfloat16):
        u = torch.randn(2, 37, 8).to(dtype)
        weight = (0.1 * torch.randn(37, 10, 16, 8)).to(dtype)
        out = ct.capsule_routing(u, weight)
        assert out.dtype == dtype
        assert_close("v", out, ct.capsule_routing(u.double(), weight.double()), torch.finfo(dtype).eps)


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

