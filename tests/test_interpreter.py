"""The test harness's faster interpreter (``_interpreter.py``, installed by conftest.py): kernels
compute bit for bit what they compute with triton's re-patching at every helper call."""

from __future__ import annotations

import os

import _interpreter
import pytest
import torch

import capstriton as ct

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="the interpreter's harness (no GPU)"
)


def _layer_and_routing(dtype):
    """Outputs and gradients of the fused layer, the unfused routing, self-attention routing and
    both squashes: every kernel module and its helpers (and triton's own ``tl.sum``, ``tl.max``)."""
    u = torch.randn(5, 7, 9).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(7, 3, 5, 9)).to(dtype).requires_grad_()
    grad = torch.randn(5, 3, 5).to(dtype)
    outs = []
    for fused in (True, False):
        v = ct.capsule_routing(u, w, 2, backend="triton", fused=fused)
        outs += [v, *torch.autograd.grad(v, (u, w), grad)]
    u_hat = torch.randn(5, 7, 3, 5).to(dtype).requires_grad_()
    v = ct.self_attention_routing(u_hat, backend="triton")
    outs += [v, *torch.autograd.grad(v, u_hat, grad)]
    for squash in (ct.squash, ct.efficient_squash):
        s = torch.randn(5, 3, 5).to(dtype).requires_grad_()
        v = squash(s, backend="triton")
        outs += [v, *torch.autograd.grad(v, s, grad)]
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernels_compute_the_same_without_the_repeated_patching(dtype):
    assert _interpreter.install()  # what conftest.py did: it is in place
    seed = torch.seed()
    torch.manual_seed(seed)
    with _interpreter.repatching():
        before = _interpreter.skipped()
        expected = _layer_and_routing(dtype)
        assert _interpreter.skipped() == before  # triton's own way: every call patched
    torch.manual_seed(seed)
    got = _layer_and_routing(dtype)
    assert _interpreter.skipped() > before  # the repeats were skipped
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(a.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           b.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), i
