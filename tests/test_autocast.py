"""Under ``torch.autocast`` both backends follow one rule (README, "Semantics"): the capsule
layers (``capsule_routing``, ``RoutingCapsules``, ``self_attention_capsule_routing``,
``SelfAttentionCapsules``) are matmul-like and takes the autocast dtype as
``torch.matmul`` does, so they return that dtype; the squashes and routing on predictions keep their
input dtype; the arithmetic is float32 either way. Before, the triton path returned bfloat16 and
the torch path float32 computed in bfloat16 (an error of 3.3e-3 where float32 gives 1e-7)."""

from __future__ import annotations

import pytest
import torch
from _helpers import KERNEL_DEVICE, KERNEL_TOL, rel_err

import capstriton as ct

BACKENDS = ["torch", "triton"]
AMP = [torch.bfloat16, torch.float16]
AMP_IDS = ["bf16", "fp16"]


def autocast(dtype):
    return torch.autocast(KERNEL_DEVICE, dtype=dtype)


#: the two capsule layers: (u, weight, extra args, backend) -> v; the bias, where there is one,
#: follows the inputs into the autocast dtype
LAYERS = {
    "dynamic": lambda u, w, b, backend: ct.capsule_routing(u, w, 3, backend=backend),
    "self-attention": lambda u, w, b, backend: ct.self_attention_capsule_routing(u, w, b, backend=backend),
}


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_capsule_layer_takes_the_autocast_dtype(backend, amp, layer):
    u = torch.randn(3, 37, 8, device=KERNEL_DEVICE)
    w = 0.1 * torch.randn(37, 10, 16, 8, device=KERNEL_DEVICE)
    b = 0.1 * torch.randn(37, 10, device=KERNEL_DEVICE)
    with autocast(amp):
        v = LAYERS[layer](u, w, b, backend)
    assert v.dtype == amp
    # as if called on inputs of the autocast dtype, against float64 on those rounded values
    ref = LAYERS[layer](*(t.to(amp).double() for t in (u, w, b)), "torch")
    assert rel_err(v, ref) < KERNEL_TOL[amp]


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_capsule_layer_takes_mixed_dtypes_under_autocast(backend, layer):
    """A bfloat16 u (an autocast convolution's output) with a float32 weight and bias, as
    ``torch.matmul`` takes them under autocast: the dtypes must agree after autocast's casts, not
    before (break-testing: both functions refused the pair with "must have the same dtype").
    Without autocast the pair is still refused."""
    u = torch.randn(3, 37, 8, device=KERNEL_DEVICE).bfloat16()
    w = 0.1 * torch.randn(37, 10, 16, 8, device=KERNEL_DEVICE)
    b = 0.1 * torch.randn(37, 10, device=KERNEL_DEVICE)
    with autocast(torch.bfloat16):
        v = LAYERS[layer](u, w, b, backend)
    assert v.dtype == torch.bfloat16
    ref = LAYERS[layer](u.double(), w.bfloat16().double(), b.bfloat16().double(), "torch")
    assert rel_err(v, ref) < KERNEL_TOL[torch.bfloat16]
    with pytest.raises(TypeError, match="must have the same dtype"):
        LAYERS[layer](u, w, b, backend)


MODULES = {"dynamic": ct.nn.RoutingCapsules, "self-attention": ct.nn.SelfAttentionCapsules}


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_capsule_modules_under_autocast(backend, module):
    layer = MODULES[module](37, 8, 10, 16, backend=backend).to(KERNEL_DEVICE)
    u = torch.randn(2, 37, 8, device=KERNEL_DEVICE, requires_grad=True)
    with autocast(torch.bfloat16):
        v = layer(u)
    assert v.dtype == torch.bfloat16
    v.float().sum().backward()
    assert u.grad.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_and_squash_keep_float32_under_autocast(backend, amp):
    u_hat = torch.randn(3, 37, 10, 16, device=KERNEL_DEVICE)
    s = torch.randn(5, 37, 16, device=KERNEL_DEVICE)
    b = 0.1 * torch.randn(37, 10, device=KERNEL_DEVICE)
    with autocast(amp):
        v = ct.dynamic_routing(u_hat, 3, backend=backend)
        q = ct.squash(s, backend=backend)
        va = ct.self_attention_routing(u_hat, b, backend=backend)
        qe = ct.efficient_squash(s, backend=backend)
    assert v.dtype == q.dtype == va.dtype == qe.dtype == torch.float32
    tol = KERNEL_TOL[torch.float32]
    assert rel_err(v, ct.dynamic_routing(u_hat.double(), 3, backend="torch")) < tol
    assert rel_err(q, ct.squash(s.double(), backend="torch")) < tol
    assert rel_err(va, ct.self_attention_routing(u_hat.double(), b.double(), backend="torch")) < tol
    assert rel_err(qe, ct.efficient_squash(s.double(), backend="torch")) < tol


def test_float64_is_left_alone_by_autocast():
    u = torch.randn(2, 7, 4, dtype=torch.float64)
    w = torch.randn(7, 3, 5, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = ct.capsule_routing(u, w, backend="torch")
    assert v.dtype == torch.float64
    assert torch.equal(v, ct.capsule_routing(u, w, backend="torch"))
