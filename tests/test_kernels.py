"""The Triton kernels against the float64 reference.

On a machine without a GPU they run on CPU tensors through Triton's interpreter (conftest.py
switches it on); on a CUDA machine the same tests run on the GPU. Every buffer the ops allocate is
poisoned with NaN (``poison`` fixture), so an element a kernel does not write, or a scratch value
read before it was written, fails the test.

Tolerances, as relative errors ``||out - ref|| / ||ref||`` against float64:
- float32: the kernels accumulate in float32 over at most a few thousand terms; 5e-6 is about 80
  units of float32 rounding (2^-24 = 6e-8) and well under DESIGN.md's 1e-5 (seen: ~3e-7).
- float16/bfloat16: inputs are rounded to the half type first and the reference gets the same
  rounded values, so only the final rounding of the output (at most half an ulp per element,
  2^-11 / 2^-8 relative) and the float32 arithmetic remain: one eps of the half type (2^-10 /
  2^-7) bounds it (seen: ~2e-4 / ~3.6e-3).
"""

import functools

import pytest
import torch
from _helpers import KERNEL_TOL, rel_err
from capstriton.kernels.routing import TARGET_PROGRAMS, TARGET_PROGRAMS_BWD, routing_config
from conftest import KERNEL_DEVICE, requires_cuda

import capstriton as ct
from capstriton import ops

TOL = KERNEL_TOL
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# (N_in, N_out, D): every size of DESIGN.md section 4's grid appears (N_in 1 7 37 1152,
# N_out 1 2 3 10, D 1 5 16 33), in combinations that mix small and odd with padded tiles.
SHAPES = [(1, 1, 1), (7, 2, 5), (37, 3, 16), (37, 10, 33), (7, 10, 1), (37, 1, 5), (7, 3, 33), (1, 2, 16)]


def shape_id(shape):
    return "x".join(map(str, shape))


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    from capstriton import ops

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ops, "_empty", nan_empty)


def run_routing(u, iterations, grad_mode, grad_out):
    """Triton forward and gradient for ``u`` (any dtype/strides) against float64 on the same values."""
    u_k = u.detach().clone().requires_grad_() if u.is_contiguous() else u.detach().requires_grad_()
    v = ct.dynamic_routing(u_k, iterations, grad_through_routing=grad_mode, backend="triton")
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
    ((7, 2, 5), 1), ((7, 2, 5), 2), ((7, 2, 5), 5), ((1, 1, 1), 5), ((37, 3, 16), 1), ((37, 3, 16), 5),
    ((3, 64, 64), 2),  # the largest N_out and D the kernels promise: 32 warps, one capsule per tile
]


@pytest.mark.parametrize("grad_mode", [True, False], ids=["through", "detached"])
@pytest.mark.parametrize(
    ("shape", "iterations"), ROUTING_CASES, ids=[f"{shape_id(s)}-R{r}" for s, r in ROUTING_CASES]
)
def test_routing_fp32(shape, iterations, grad_mode):
    u = torch.randn(3, *shape, device=KERNEL_DEVICE)
    g = torch.randn(3, shape[1], shape[2], device=KERNEL_DEVICE)
    v, ref, du, du_ref = run_routing(u, iterations, grad_mode, g)
    assert rel_err(v, ref) < TOL[torch.float32]
    assert rel_err(du, du_ref) < TOL[torch.float32]


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
    assert rel_err(v, ref) < TOL[torch.float32]
    assert rel_err(du, du_ref) < TOL[torch.float32]


@pytest.mark.parametrize("grad_mode", [True, False], ids=["through", "detached"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(37, 10, 16), (7, 3, 5)], ids=shape_id)
def test_routing_dtypes(shape, dtype, grad_mode):
    u = torch.randn(5, *shape, device=KERNEL_DEVICE).to(dtype)
    g = torch.randn(5, shape[1], shape[2], device=KERNEL_DEVICE).to(dtype)
    v, ref, du, du_ref = run_routing(u, 3, grad_mode, g)
    assert rel_err(v, ref) < TOL[dtype]
    assert rel_err(du, du_ref) < TOL[dtype]


@pytest.mark.parametrize("batch", [0, 1, 5, 37])
def test_routing_batch_sizes(batch):
    u = torch.randn(batch, 7, 3, 5, device=KERNEL_DEVICE)
    g = torch.randn(batch, 3, 5, device=KERNEL_DEVICE)
    v, ref, du, du_ref = run_routing(u, 3, True, g)
    assert v.shape == (batch, 3, 5) and du.shape == u.shape
    if batch:
        assert rel_err(v, ref) < TOL[torch.float32]
        assert rel_err(du, du_ref) < TOL[torch.float32]


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
        assert rel_err(v, ref) < TOL[torch.float32]
    assert rel_err(du, du_ref) < TOL[torch.float32]


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
    assert rel_err(v, ref) < TOL[torch.float32]
    assert rel_err(u_k.grad, u64.grad) < TOL[torch.float32]


def test_routing_deterministic():
    u = torch.randn(2, 37, 10, 16, device=KERNEL_DEVICE, requires_grad=True)
    outs = []
    for _ in range(2):
        v = ct.dynamic_routing(u, 3, backend="triton")
        (du,) = torch.autograd.grad(v, u, torch.ones_like(v))
        outs.append((v, du))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# routing_config's (SPLIT, caps_per_split, BLOCK_I) keys and program target, forward and backward
SPLIT_KEYS = [
    ("SPLIT", "caps_per_split", "BLOCK_I", TARGET_PROGRAMS),
    ("SPLIT_BWD", "caps_per_split_bwd", "BLOCK_I_BWD", TARGET_PROGRAMS_BWD),
]


@pytest.mark.parametrize("grad_mode", [True, False], ids=["through", "detached"])
def test_routing_splits_of_several_tiles(monkeypatch, grad_mode):
    """The loop over several tiles per split, a shorter last split (ending in a partial tile) and
    forward and backward splits that differ: at the test sizes the default parameters give one
    tile per split, so smaller tiles and program targets are forced here."""
    n_in, n_out, d, batch = 37, 3, 5, 3
    forced = functools.partial(routing_config, tile=64, tile_bwd=128, target_programs=12, target_programs_bwd=9)
    cfg = forced(n_in, n_out, d, batch)
    for split, caps, block, _ in SPLIT_KEYS:
        assert cfg[caps] >= 3 * cfg[block]  # several tiles per split
        assert 0 < n_in - (cfg[split] - 1) * cfg[caps] < cfg[caps]  # a shorter last split
        assert n_in % cfg[block]  # ending in a partial tile
    assert (cfg["SPLIT"], cfg["BLOCK_I"]) != (cfg["SPLIT_BWD"], cfg["BLOCK_I_BWD"])
    monkeypatch.setattr(ops, "routing_config", forced)
    u = torch.randn(batch, n_in, n_out, d, device=KERNEL_DEVICE)
    g = torch.randn(batch, n_out, d, device=KERNEL_DEVICE)
    v, ref, du, du_ref = run_routing(u, 3, grad_mode, g)
    assert rel_err(v, ref) < TOL[torch.float32]
    assert rel_err(du, du_ref) < TOL[torch.float32]


@pytest.mark.parametrize("n_in", [1, 7, 37, 1152, 1153])
@pytest.mark.parametrize(("n_out", "d"), [(1, 1), (10, 16), (3, 33), (64, 64)])
def test_routing_config_splits_cover_the_input_capsules(n_in, n_out, d):
    """Every split of the forward and of the backward is non-empty and whole tiles long, the
    last one ending at N_in, so together they cover the input capsules once, at every batch."""
    for batch in [0, 1, 3, 64, 1000, 1024, 5000]:
        cfg = routing_config(n_in, n_out, d, batch)
        assert cfg["BLOCK_J"] >= n_out and cfg["BLOCK_D"] >= d
        for split, caps, block, target in SPLIT_KEYS:
            assert cfg[split] >= 1 and cfg[caps] % cfg[block] == 0
            assert (cfg[split] - 1) * cfg[caps] < n_in <= cfg[split] * cfg[caps]
            # at most ceil(target / batch) splits: the grid stays under target + batch programs
            assert batch * cfg[split] < target + batch


def test_capsule_routing_triton_matches_reference():
    u = torch.randn(3, 37, 8, device=KERNEL_DEVICE, requires_grad=True)
    w = (0.1 * torch.randn(37, 10, 16, 8, device=KERNEL_DEVICE)).requires_grad_()
    v = ct.capsule_routing(u, w, 3, backend="triton")
    g = torch.randn_like(v)
    du, dw = torch.autograd.grad(v, (u, w), g)
    u64, w64 = u.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    ref = ct.capsule_routing(u64, w64, 3, backend="torch")
    du_ref, dw_ref = torch.autograd.grad(ref, (u64, w64), g.double().cpu())
    assert rel_err(v, ref) < TOL[torch.float32]
    assert rel_err(du, du_ref) < TOL[torch.float32]
    assert rel_err(dw, dw_ref) < TOL[torch.float32]


# ---------------------------------------------------------------------------------------------
# squash


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
        assert rel_err(v, ref) < TOL[dtype]
        assert rel_err(ds, ds_ref) < TOL[dtype]


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
    assert rel_err(v, ref) < TOL[torch.float32]
    assert rel_err(ds, ds_ref) < TOL[torch.float32]


# ---------------------------------------------------------------------------------------------
# subnormal inputs: the kernels once took 1 / (largest component), which overflows float32 for
# a largest component below 1 / 3.4e38 = 2.9e-39, and returned NaN (outputs and gradients)

SUBNORMAL_QUANTUM = 2.0**-149  # float32's smallest subnormal: the absolute rounding step there


def assert_float32_close(name, out, ref):
    """``out`` is ``ref`` (float64) up to float32 rounding: relative KERNEL_TOL for normal values
    and a few subnormal quanta for results below float32's normal range."""
    err = (out.double().cpu() - ref).abs().max().item()
    bound = TOL[torch.float32] * ref.abs().max().item() + 4 * SUBNORMAL_QUANTUM
    assert torch.isfinite(out).all() and err <= bound, f"{name}: error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("scale", [1e-19, 1e-20, 3e-39, 1e-40, 1e-44], ids=lambda s: f"{s:g}")
def test_squash_tiny_and_subnormal_rows(scale):
    s = scale * torch.tensor([[1.0, -0.5, 0.25], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], device=KERNEL_DEVICE)
    g = torch.randn(3, 3, device=KERNEL_DEVICE)
    v, ref, ds, ds_ref = run_squash(s, g)
    assert_float32_close("v", v, ref)
    assert_float32_close("ds", ds, ds_ref)


@pytest.mark.parametrize("grad_mode", [True, False], ids=["through", "detached"])
@pytest.mark.parametrize("scale", [3e-39, 1e-41], ids=lambda s: f"{s:g}")
def test_routing_subnormal_predictions(scale, grad_mode):
    u = scale * torch.randn(2, 7, 3, 5, device=KERNEL_DEVICE)
    g = torch.randn(2, 3, 5, device=KERNEL_DEVICE)
    v, ref, du, du_ref = run_routing(u, 3, grad_mode, g)
    assert_float32_close("v", v, ref)
    assert_float32_close("du", du, du_ref)
