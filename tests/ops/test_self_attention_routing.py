"""Self-attention routing and Efficient-CapsNet's squash: the Triton kernels and the reference
against an independent float64 implementation written here from DESIGN.md's formulas (loops, the
textbook forms), forward and every gradient (u_hat; or u, weight and bias), over odd shapes,
dtypes, batch sizes, strides, zero and extreme vectors; the exact limits of the squash; operator
registration on a GPU. Tolerances are ``KERNEL_TOL`` (tests/_helpers.py); every buffer the ops
allocate is NaN-poisoned (tests/ops/conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import (
    DTYPE_IDS,
    DTYPES,
    FLOAT16_RANGE_CASES,
    FLOAT16_RANGE_IDS,
    KERNEL_DEVICE,
    KERNEL_TOL,
    assert_close,
    assert_float16_range,
    assert_float32_close,
    float16_range_inputs,
    naive_predictions,
    requires_cuda,
    saved_storages,
    shape_id,
)

import capstriton as ct
from capstriton.ops import self_attention_routing as ops
from capstriton.ops._passes import FusedTuning

TOL = KERNEL_TOL
#: the reference against the loops in float64: a few roundings per term
F64_TOL = 1e-12
#: few programs (the interpreter pays per program), several capsules a split, two batch groups
FEW = FusedTuning(target_programs=6, target_programs_bwd=6, groups=2)


# ---------------------------------------------------------------------------------------------
# the independent float64 implementation


def naive_efficient_squash(s: torch.Tensor) -> torch.Tensor:
    """``(1 - exp(-||s||)) s / ||s||`` for one vector, with ``1 - exp(-n)`` as ``-expm1(-n)`` (no
    cancellation for tiny n in float64), and its limit ``s`` (the identity) at ``s = 0``."""
    n = torch.sqrt((s * s).sum())
    return s if n == 0 else -torch.expm1(-n) * s / n


def naive_self_attention(u_hat: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """DESIGN.md's self-attention routing with loops over examples, input and output capsules."""
    batch, n_in, n_out, d = u_hat.shape
    out = []
    for b in range(batch):
        total = [sum(u_hat[b, k, j] for k in range(n_in)) for j in range(n_out)]
        s = [torch.zeros(d, dtype=u_hat.dtype) for _ in range(n_out)]
        for i in range(n_in):
            a = torch.stack([(u_hat[b, i, j] * total[j]).sum() / math.sqrt(d) for j in range(n_out)])
            c = torch.exp(a - a.max()) / torch.exp(a - a.max()).sum()  # softmax over j
            if bias is not None:
                c = c + bias[i]
            for j in range(n_out):
                s[j] = s[j] + c[j] * u_hat[b, i, j]
        out.append(torch.stack([naive_efficient_squash(s_j) for s_j in s]))
    return torch.stack(out)


def run(fn_triton, fn_naive, inputs, grad_out):
    """Triton output and gradients of every input against the naive float64 ones."""
    leaves = [x.detach().clone().requires_grad_() if x.is_contiguous() else x.detach().requires_grad_() for x in inputs]
    out = fn_triton(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)
    leaves64 = [x.detach().double().cpu().requires_grad_() for x in inputs]
    ref = fn_naive(*leaves64)
    refs = torch.autograd.grad(ref, leaves64, grad_out.double().cpu())
    assert out.dtype == inputs[0].dtype and all(g.dtype == x.dtype for g, x in zip(grads, inputs, strict=True))
    return (out, ref), list(zip(grads, refs, strict=True))


def check(fn_triton, fn_naive, inputs, grad_out, tol, names):
    (out, ref), grads = run(fn_triton, fn_naive, inputs, grad_out)
    assert_close("v", out, ref, tol)
    for name, (g, r) in zip(names, grads, strict=True):
        assert_close(name, g, r, tol)


def inputs_for(batch, n_in, n_out, d, d_in=None, dtype=torch.float32, bias=True):
    """u_hat (or u and the weight) and the bias, on the kernel device, rounded to ``dtype``."""
    dev = KERNEL_DEVICE
    bias_t = [(0.2 * torch.randn(n_in, n_out, device=dev)).to(dtype)] if bias else []
    if d_in is None:
        return [(0.7 * torch.randn(batch, n_in, n_out, d, device=dev)).to(dtype), *bias_t]
    u = torch.randn(batch, n_in, d_in, device=dev).to(dtype)
    w = (0.7 / d_in**0.5 * torch.randn(n_in, n_out, d, d_in, device=dev)).to(dtype)
    return [u, w, *bias_t]


def routing_triton(tuning=None):
    return lambda u_hat, bias=None: ops.self_attention_routing(u_hat, bias, tuning)


def layer_triton(tuning=None):
    return lambda u, w, bias=None: ops.self_attention_capsule_routing(u, w, bias, tuning)


def naive_layer(u, w, bias=None):
    return naive_self_attention(naive_predictions(u, w), bias)


# ---------------------------------------------------------------------------------------------
# the routing on predictions u_hat

# (N_in, N_out, D): N_in 1 7 16 37, N_out 1 3 10, D 1 5 16 33 (1152 below)
ROUTING_SHAPES = [(1, 1, 1), (7, 3, 5), (16, 10, 16), (37, 3, 33), (7, 10, 1), (16, 1, 5)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", ROUTING_SHAPES, ids=shape_id)
def test_routing_against_loops(shape, bias):
    x = inputs_for(3, *shape, bias=bias)
    g = torch.randn(3, shape[1], shape[2], device=KERNEL_DEVICE)
    check(routing_triton(FEW), naive_self_attention, x, g, TOL[torch.float32], ["du_hat", "dbias"][: len(x)])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_routing_dtypes(dtype):
    x = inputs_for(5, 16, 10, 16, dtype=dtype)
    g = torch.randn(5, 10, 16, device=KERNEL_DEVICE).to(dtype)
    check(routing_triton(FEW), naive_self_attention, x, g, TOL[dtype], ["du_hat", "dbias"])


@pytest.mark.parametrize("batch", [0, 1, 17])
def test_routing_batch_sizes(batch):
    x = inputs_for(batch, 7, 3, 5)
    if batch == 0:
        u_hat, bias = (t.requires_grad_() for t in x)
        v = ct.self_attention_routing(u_hat, bias, backend="triton")
        du, db = torch.autograd.grad(v.sum(), (u_hat, bias))
        assert v.shape == (0, 3, 5) and du.shape == u_hat.shape and (db == 0).all()
        return
    g = torch.randn(batch, 3, 5, device=KERNEL_DEVICE)
    check(routing_triton(), naive_self_attention, x, g, TOL[torch.float32], ["du_hat", "dbias"])


def test_routing_non_contiguous_and_expanded_gradient():
    u_hat = (0.7 * torch.randn(5, 9, 3, 4, device=KERNEL_DEVICE)).transpose(0, 1)[::2]  # [5, 5, 3, 4]
    bias = (0.2 * torch.randn(3, 5, device=KERNEL_DEVICE)).t()  # [5, 3]
    assert not u_hat.is_contiguous() and not bias.is_contiguous()
    g = torch.ones(1, 1, 1, device=KERNEL_DEVICE).expand(5, 3, 4)  # as from v.sum(): stride 0
    check(routing_triton(FEW), naive_self_attention, [u_hat, bias], g, TOL[torch.float32], ["du_hat", "dbias"])


NEAR_MAX = 0.999 * torch.finfo(torch.float32).max / 7  # |u_hat| at which S over 7 capsules may overflow


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30, NEAR_MAX], ids=["zero", "1e-30", "1e30", "near-max"])
@pytest.mark.parametrize("form", ["routing", "layer"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_and_extreme_inputs(backend, form, scale):
    """Float32 predictions |u_hat| <= 0, 1e-30, 1e30 and float max / N_in (the logits u_hat . S,
    1e61 at 1e30, pass float32's range): finite, and the float64 loops' exact limits (a uniform
    or a one-hot softmax, the squash's identity at 0 and unit vectors), values and gradients."""
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"

    def uniform(*shape, bound=1.0):
        return (bound * (2 * torch.rand(*shape, dtype=torch.float64) - 1)).float().to(dev)

    bias = uniform(7, 3, bound=0.2)
    if form == "routing":
        x = [uniform(2, 7, 3, 5, bound=scale), bias]
        fn = (lambda u_hat, b: ct.self_attention_routing(u_hat, b, backend=backend), naive_self_attention)
    else:  # |W u| <= max |u|: rows of the weight sum to at most 1 in absolute value
        x = [uniform(2, 7, 4, bound=scale), uniform(7, 3, 5, 4, bound=0.25), bias]
        fn = (lambda u, w, b: ct.self_attention_capsule_routing(u, w, b, backend=backend), naive_layer)
    g = torch.randn(2, 3, 5, device=dev)
    (out, ref), grads = run(*fn, x, g)
    assert torch.isfinite(out).all() and all(torch.isfinite(gr).all() for gr, _ in grads)
    assert_close("v", out, ref, TOL[torch.float32])
    names = ["du_hat", "dbias"] if form == "routing" else ["du", "dweight", "dbias"]
    for name, (gr, r) in zip(names, grads, strict=True):
        if r.abs().max() > 0:
            assert_close(name, gr, r, TOL[torch.float32])
        else:  # exactly zero in float64 (the weight's gradient for zero inputs)
            assert (gr == 0).all(), name


@pytest.mark.slow
def test_routing_1152_input_capsules():
    x = inputs_for(2, 1152, 3, 5)
    g = torch.randn(2, 3, 5, device=KERNEL_DEVICE)
    ref_fn = ct.reference.self_attention_routing  # the loops over 1152 x 3 would take minutes
    check(routing_triton(FEW), ref_fn, x, g, TOL[torch.float32], ["du_hat", "dbias"])


# ---------------------------------------------------------------------------------------------
# the layer: predictions on chip

# (N_in, N_out, D, D_in): D_in 1 8 9, the paper's FCCaps 16 x 10 x 16 x 8
LAYER_SHAPES = [(16, 10, 16, 8), (7, 3, 5, 1), (7, 1, 33, 9), (1, 3, 16, 8)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=shape_id)
def test_layer_against_loops(shape, bias):
    x = inputs_for(3, *shape, bias=bias)
    g = torch.randn(3, shape[1], shape[2], device=KERNEL_DEVICE)
    check(layer_triton(FEW), naive_layer, x, g, TOL[torch.float32], ["du", "dweight", "dbias"][: len(x)])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_layer_dtypes_and_a_full_tile(dtype):
    """17 examples: a full tile of 16 (tensor-core products for the half types) and a partial one."""
    x = inputs_for(17, 16, 10, 16, 8, dtype=dtype)
    g = torch.randn(17, 10, 16, device=KERNEL_DEVICE).to(dtype)
    check(layer_triton(FEW), ct.reference.self_attention_capsule_routing, x, g, TOL[dtype], ["du", "dweight", "dbias"])


@pytest.mark.parametrize(("u_scale", "w_scale", "grad_scale"), FLOAT16_RANGE_CASES, ids=FLOAT16_RANGE_IDS)
def test_layer_float16_gradients_keep_float32_range(u_scale, w_scale, grad_scale):
    """As the fused layer's test of that name: float16 u and weight whose gradients' float32
    intermediates leave float16's range (du came back 21% off at u and W of 1e3 when du_hat
    entered the products as two float16 parts; the layer now runs float16 as float32), with a bias,
    against float64 on the same values (``assert_float16_range``)."""
    u, w, g = float16_range_inputs(u_scale, w_scale, grad_scale, KERNEL_DEVICE)
    bias = (0.2 * torch.randn(7, 3, device=KERNEL_DEVICE)).half()
    (out, ref), grads = run(layer_triton(FEW), ct.reference.self_attention_capsule_routing, [u, w, bias], g)
    assert_close("v", out, ref, TOL[torch.float16])
    for name, (grad, want) in zip(["du", "dweight", "dbias"], grads, strict=True):
        assert_float16_range(name, grad, want, min_normal=5 if name == "du" else 0)


@pytest.mark.parametrize("batch", [0, 1])
def test_layer_batch_sizes(batch):
    x = inputs_for(batch, 7, 3, 5, 9)
    if batch == 0:
        u, w, bias = (t.requires_grad_() for t in x)
        v = ct.self_attention_capsule_routing(u, w, bias, backend="triton")
        du, dw, db = torch.autograd.grad(v.sum(), (u, w, bias))
        assert v.shape == (0, 3, 5) and du.shape == u.shape  # no example: no gradient
        assert dw.shape == w.shape and (dw == 0).all() and (db == 0).all()
        return
    g = torch.randn(batch, 3, 5, device=KERNEL_DEVICE)
    check(layer_triton(FEW), naive_layer, x, g, TOL[torch.float32], ["du", "dw", "dbias"])


def test_layer_non_contiguous_and_expanded_gradient():
    dev = KERNEL_DEVICE
    u = torch.randn(9, 5, 4, device=dev).transpose(0, 1)[:, ::2]  # [5, 5, 4]: batch and capsules strided
    w = (0.5 * torch.randn(3, 5, 6, 4, device=dev)).permute(1, 0, 2, 3)  # [5, 3, 6, 4]
    bias = (0.2 * torch.randn(3, 5, device=dev)).t()  # [5, 3]
    assert not (u.is_contiguous() or w.is_contiguous() or bias.is_contiguous())
    g = torch.ones(1, 1, 1, device=dev).expand(5, 3, 6)  # as from v.sum(): stride 0
    check(layer_triton(FEW), naive_layer, [u, w, bias], g, TOL[torch.float32], ["du", "dw", "dbias"])


def test_layer_through_the_public_function_and_module():
    layer = ct.nn.SelfAttentionCapsules(16, 8, 10, 16, backend="triton").to(KERNEL_DEVICE)
    with torch.no_grad():
        layer.bias.normal_(std=0.2)
    u = torch.randn(2, 16, 8, device=KERNEL_DEVICE)
    v = layer(u)
    ref = naive_layer(u.double().cpu(), layer.weight.detach().double().cpu(), layer.bias.detach().double().cpu())
    assert_close("v", v, ref, TOL[torch.float32])


def test_saved_for_backward_is_nothing_of_u_hat_size():
    """The layer's training step keeps u, the weight, the bias and two [B, N_out, D] sums."""
    u, w, bias = (t.requires_grad_() for t in inputs_for(4, 16, 10, 16, 8))
    storages = saved_storages(lambda: ct.self_attention_capsule_routing(u, w, bias, backend="triton"))
    sums = 2 * 4 * 10 * 16 * 4
    assert sum(storages.values()) == (u.numel() + w.numel() + bias.numel()) * 4 + sums


# ---------------------------------------------------------------------------------------------
# Efficient-CapsNet's squash: exact limits


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_efficient_squash_against_the_formula(backend):
    s = torch.randn(9, 13, dtype=torch.float64) * torch.logspace(-3, 3, 9, dtype=torch.float64)[:, None]
    x = s.to(KERNEL_DEVICE, torch.float32 if backend == "triton" else torch.float64)
    g = torch.randn(9, 13, device=KERNEL_DEVICE, dtype=x.dtype)
    naive = lambda t: torch.stack([naive_efficient_squash(r) for r in t])  # noqa: E731
    tol = TOL[torch.float32] if backend == "triton" else F64_TOL
    check(lambda t: ct.efficient_squash(t, backend=backend), naive, [x], g, tol, ["ds"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_efficient_squash_limits(backend):
    """0 with the identity Jacobian at s = 0; s itself to float32 precision for tiny s (the
    factor (1 - e^-n) / n is 1); the unit vector for huge s; finite everywhere, subnormals too."""
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    s = torch.tensor(
        [[0.0, 0.0, 0.0], [1e-30, -2e-30, 0.0], [1e30, 1e30, 0.0], [3e38, -3e38, 1e38], [2e-39, 1e-39, 0.0]],
        device=dev,
    ).requires_grad_()
    g = torch.randn(5, 3, device=dev)
    v = ct.efficient_squash(s, backend=backend)
    (ds,) = torch.autograd.grad(v, s, g)
    assert torch.isfinite(v).all() and torch.isfinite(ds).all()
    assert (v[0] == 0).all() and torch.equal(ds[0], g[0])  # the identity Jacobian at 0
    assert torch.allclose(v[1], s[1].detach(), rtol=1e-6, atol=0) and torch.allclose(ds[1], g[1], rtol=1e-6)
    unit = s[2].detach().double() / s[2].detach().double().norm()
    assert_float32_close("v (1e30)", v[2], unit)
    assert abs(v[3].double().norm().item() - 1.0) < 1e-6  # past float32's range for the norm
    assert_float32_close("v (subnormal)", v[4], s[4].detach().double())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_efficient_squash_dtypes(dtype):
    s = torch.randn(5, 37, 16, device=KERNEL_DEVICE).to(dtype)
    g = torch.randn(5, 37, 16, device=KERNEL_DEVICE).to(dtype)
    naive = lambda t: torch.stack([naive_efficient_squash(r) for r in t.reshape(-1, 16)]).view_as(t)  # noqa: E731
    check(lambda t: ct.efficient_squash(t, backend="triton"), naive, [s], g, TOL[dtype], ["ds"])


def test_efficient_squash_empty_strided_and_along_another_dim():
    """The triton squash of no capsules, of a non-contiguous tensor with a stride-0 gradient, and
    along a middle dimension, against the formula applied to each capsule."""
    empty = torch.randn(0, 4, 16, device=KERNEL_DEVICE, requires_grad=True)
    v = ct.efficient_squash(empty, backend="triton")
    (ds,) = torch.autograd.grad(v.sum(), empty)
    assert v.shape == empty.shape and ds.shape == empty.shape
    s = torch.randn(6, 11, 7, device=KERNEL_DEVICE).transpose(0, 2)[::2]  # [4, 11, 6]
    assert not s.is_contiguous()
    g = torch.ones(1, 1, 1, device=KERNEL_DEVICE).expand(4, 11, 6)
    naive = lambda t: torch.stack([naive_efficient_squash(r) for r in t.reshape(-1, t.shape[-1])]).view_as(t)  # noqa: E731
    check(lambda t: ct.efficient_squash(t, backend="triton"), naive, [s], g, TOL[torch.float32], ["ds"])
    middle = torch.randn(3, 9, 5, device=KERNEL_DEVICE)  # capsules of 9 along dim 1
    g = torch.randn(3, 9, 5, device=KERNEL_DEVICE)
    naive_dim1 = lambda t: naive(t.transpose(1, 2)).transpose(1, 2)  # noqa: E731
    check(lambda t: ct.efficient_squash(t, dim=1, backend="triton"), naive_dim1, [middle], g, TOL[torch.float32],
          ["ds"])


def test_reference_routing_and_layer_against_loops():
    """The reference itself, in float64, against the loops (tight)."""
    x = inputs_for(2, 7, 3, 5, dtype=torch.float64)
    (out, ref), grads = run(ct.reference.self_attention_routing, naive_self_attention, [t.cpu() for t in x],
                            torch.randn(2, 3, 5, dtype=torch.float64))  # fmt: skip
    assert_close("v", out, ref, F64_TOL)
    for name, (g, r) in zip(("du_hat", "dbias"), grads, strict=True):
        assert_close(name, g, r, F64_TOL)
    assert torch.autograd.gradcheck(ct.reference.self_attention_routing, tuple(t.cpu().requires_grad_() for t in x))


# ---------------------------------------------------------------------------------------------
# on a GPU


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_self_attention(dtype):
    u, w, bias = (t.requires_grad_() for t in inputs_for(20, 16, 10, 16, 8, dtype=dtype))
    tuning = FusedTuning().as_list()
    torch.library.opcheck(ops.self_attention_layer_fwd, (u, w, bias, "ieee", tuning))
    u_hat, b = (t.requires_grad_() for t in inputs_for(5, 16, 10, 16, dtype=dtype))
    torch.library.opcheck(ops.self_attention_routing_fwd, (u_hat, b, tuning))
