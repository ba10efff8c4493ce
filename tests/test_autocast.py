"""Under ``torch.autocast`` both backends follow one rule (README, "Semantics"): the capsule
layer (``capsule_routing``, ``RoutingCapsules``) is matmul-like and takes the autocast dtype as
``torch.matmul`` does, so it returns that dtype; squash and routing on predictions keep their
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


@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_capsule_layer_takes_the_autocast_dtype(backend, amp):
    u = torch.randn(3, 37, 8, device=KERNEL_DEVICE)
    w = 0.1 * torch.randn(37, 10, 16, 8, device=KERNEL_DEVICE)
    with autocast(amp):
        v = ct.capsule_routing(u, w, 3, backend=backend)
    assert v.dtype == amp
    # as if called on inputs of the autocast dtype, against float64 on those rounded values
    ref = ct.capsule_routing(u.to(amp).double(), w.to(amp).double(), 3, backend="torch")
    assert rel_err(v, ref) < KERNEL_TOL[amp]


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_capsules_module_under_autocast(backend):
    layer = ct.nn.RoutingCapsules(37, 8, 10, 16, backend=backend).to(KERNEL_DEVICE)
    u = torch.randn(2, 37, 8, device=KERNEL_DEVICE, requires_grad=True)
    with autocast(torch.bfloat16):
        v = layer(u)
    assert v.dtype == torch.bfloat16
    v.float().sum().backward()
    assert u.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("amp", AMP, ids=AMP_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_and_squash_keep_float32_under_autocast(backend, amp):
    u_hat = torch.randn(3, 37, 10, 16, device=KERNEL_DEVICE)
    s = torch.randn(5, 37, 16, device=KERNEL_DEVICE)
    with autocast(amp):
        v = ct.dynamic_routing(u_hat, 3, backend=backend)
        q = ct.squash(s, backend=backend)
    assert v.dtype == q.dtype == torch.float32
    assert rel_err(v, ct.dynamic_routing(u_hat.double(), 3, backend="torch")) < KERNEL_TOL[torch.float32]
    assert rel_err(q, ct.squash(s.double(), backend="torch")) < KERNEL_TOL[torch.float32]


def test_float64_is_left_alone_by_autocast():
    u = torch.randn(2, 7, 4, dtype=torch.float64)
    w = torch.randn(7, 3, 5, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = ct.capsule_routing(u, w, backend="torch")
    assert v.dtype == torch.float64
    assert torch.equal(v, ct.capsule_routing(u, w, backend="torch"))
