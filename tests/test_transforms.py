"""Autograd transforms through the Triton ops: reverse mode is supported; forward-mode AD,
torch.func's reverse transforms and double backward raise an error naming the limitation (they
used to return a zero tangent silently, or fail inside PyTorch); ``backend="auto"`` takes the
reference under them, which supports every transform."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from _helpers import KERNEL_DEVICE, KERNEL_TOL, rel_err

import capstriton as ct
from capstriton import _checks

W = 0.3 * torch.randn(7, 3, 5, 4)

# (name, function of one tensor, input shape): the three public ops on the triton backend
OPS = [
    ("squash", lambda x, backend: ct.squash(x, backend=backend), (3, 5)),
    ("dynamic_routing", lambda x, backend: ct.dynamic_routing(x, 3, backend=backend), (2, 7, 3, 5)),
    ("capsule_routing", lambda x, backend: ct.capsule_routing(x, W.to(x), 2, backend=backend), (2, 7, 4)),
]
IDS = [op[0] for op in OPS]


def _input(shape, dtype=torch.float32):
    return torch.randn(shape, device=KERNEL_DEVICE, dtype=dtype)


def _forward_ad(f, x, t):
    with fwAD.dual_level():
        return fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent


FORWARD_MODE = {
    "jvp": lambda f, x: torch.func.jvp(f, (x,), (torch.ones_like(x),)),
    "jacfwd": lambda f, x: torch.func.jacfwd(f)(x),
    "forward_ad": lambda f, x: _forward_ad(f, x, torch.ones_like(x)),
}
def _vjp(f, x):
    out, pullback = torch.func.vjp(f, x)
    return pullback(torch.ones_like(out))


REVERSE_FUNC = {
    "grad": lambda f, x: torch.func.grad(lambda y: f(y).sum())(x),
    "jacrev": lambda f, x: torch.func.jacrev(f)(x),
    "vjp": _vjp,
    "vmap_grad": lambda f, x: torch.func.vmap(torch.func.grad(lambda y: f(y).sum()))(x[None]),
}


@pytest.mark.parametrize("mode", list(FORWARD_MODE))
@pytest.mark.parametrize("name, fn, shape", OPS, ids=IDS)
def test_forward_mode_ad_on_triton_raises(name, fn, shape, mode):
    """It returned an all-zero tangent without a word (torch.func.jvp, jacfwd) or none at all."""
    with pytest.raises(NotImplementedError, match="backend='triton' cannot be differentiated by forward-mode AD"):
        FORWARD_MODE[mode](lambda x: fn(x, "triton"), _input(shape))


@pytest.mark.parametrize("mode", list(REVERSE_FUNC))
@pytest.mark.parametrize("name, fn, shape", OPS, ids=IDS)
def test_torch_func_reverse_transforms_on_triton_raise(name, fn, shape, mode):
    """They failed inside PyTorch ("must override the setup_context staticmethod")."""
    with pytest.raises(NotImplementedError, match="backend='triton' cannot be differentiated by torch.func"):
        REVERSE_FUNC[mode](lambda x: fn(x, "triton"), _input(shape))


def test_transform_on_the_weight_alone_is_seen():
    """capsule_routing differentiated with respect to its weight only: the weight is wrapped."""
    u = _input((2, 7, 4))
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(lambda w: ct.capsule_routing(u, w, 2, backend="triton").sum())(W.to(u))


@pytest.mark.parametrize("name, fn, shape", OPS, ids=IDS)
def test_double_backward_on_triton_raises(name, fn, shape):
    """First-order gradients with create_graph=True work; differentiating them again names the
    limitation (it said "no autograd formula registered for capstriton.routing_backward")."""
    x = _input(shape).requires_grad_()
    (g,) = torch.autograd.grad(fn(x, "triton").square().sum(), x, create_graph=True)
    assert g.shape == x.shape and g.requires_grad
    with pytest.raises(NotImplementedError, match="double backward .* is not supported; use backend='torch'"):
        g.sum().backward()


@pytest.mark.parametrize("name, fn, shape", OPS, ids=IDS)
def test_vmap_alone_on_triton_matches_the_reference(name, fn, shape):
    """vmap without a gradient transform runs the ops once per example (PyTorch's fallback)."""
    x = _input((3, *shape))
    out = torch.func.vmap(lambda y: fn(y, "triton"))(x)
    ref = torch.stack([fn(y.double().cpu(), "torch") for y in x])
    assert rel_err(out, ref) < KERNEL_TOL[torch.float32]


@pytest.mark.parametrize("name, fn, shape", OPS, ids=IDS)
def test_reference_supports_forward_mode_and_higher_order(name, fn, shape):
    """What the error messages recommend works: forward and reverse Jacobians of the reference
    agree, and a Hessian-vector product (double backward) is finite."""
    x = torch.randn(shape, dtype=torch.float64)
    f = lambda y: fn(y, "torch")  # noqa: E731
    assert rel_err(torch.func.jacfwd(f)(x), torch.func.jacrev(f)(x)) < 1e-12
    _, tangent = torch.func.jvp(f, (x,), (torch.ones_like(x),))
    assert tangent.abs().sum() > 0
    hvp = torch.func.grad(lambda y: (torch.func.grad(lambda z: f(z).square().sum())(y) * x).sum())(x)
    assert torch.isfinite(hvp).all() and hvp.abs().sum() > 0


@pytest.mark.parametrize("mode", [*FORWARD_MODE, *REVERSE_FUNC])
def test_auto_takes_the_reference_under_transforms(monkeypatch, mode):
    """On CUDA "auto" would run the kernels: under a transform it resolves to the reference."""
    monkeypatch.setattr(_checks, "auto_takes_triton", lambda x: True)  # as for a CUDA tensor
    seen = []

    def f(y):
        seen.append(_checks.resolve_backend("auto", y))
        return ct.squash(y, backend="torch")

    x = torch.randn(3, 5)
    assert _checks.resolve_backend("auto", x) == "triton"
    (FORWARD_MODE | REVERSE_FUNC)[mode](f, x)
    assert seen and set(seen) == {"torch"}


def test_grad_through_routing_must_be_a_bool():
    """Any truthy object used to mean True ("no" included)."""
    u_hat = torch.randn(2, 7, 3, 5)
    for value in ("no", 1, None, torch.tensor(True)):
        with pytest.raises(TypeError, match="grad_through_routing must be a bool"):
            ct.dynamic_routing(u_hat, grad_through_routing=value)
        with pytest.raises(TypeError, match="grad_through_routing must be a bool"):
            ct.capsule_routing(torch.randn(2, 7, 4), W, grad_through_routing=value)
        with pytest.raises(TypeError, match="grad_through_routing must be a bool"):
            ct.nn.RoutingCapsules(7, 4, 3, 5, grad_through_routing=value)
