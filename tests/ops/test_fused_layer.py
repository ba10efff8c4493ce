"""The capsule layer (``ct.capsule_routing``: predictions, then routing): the fused Triton kernels
(and the unfused path) against the float64 reference over the shape grid, dtypes, gradient modes,
batch sizes, strides and both product paths (tl.dot tiles and rank-one updates); the memory a
training step saves; the reference against naive loops and gradcheck; the predictions' memory
pattern. Tolerances as in tests/ops/test_dynamic_routing.py (``KERNEL_TOL``); every buffer the
ops allocate is NaN-poisoned (tests/ops/conftest.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton
import triton.language as tl
from _helpers import (
    DTYPE_IDS,
    DTYPES,
    FLOAT16_RANGE_CASES,
    FLOAT16_RANGE_IDS,
    KERNEL_DEVICE,
    KERNEL_TOL,
    assert_close,
    assert_float16_range,
    float16_range_inputs,
    grads,
    grid_params,
    naive_predictions,
    naive_routing,
    rel_err,
    requires_cuda,
    saved_storages,
    shape_grid,
)
from capstriton.kernels.common import (
    bfloat16_nearest,
    coefficient_parts,
    dot_f32,
    dot_parts,
    factor_parts,
    half_parts,
    half_product_parts,
    half_products,
    tf32_nearest,
)
from capstriton.kernels.fused_layer import _negated

import capstriton as ct
from capstriton import reference
from capstriton.ops import fused_layer as ops
from capstriton.ops._passes import fused_config
from capstriton.ops.fused_layer import FUSED_MAX_OUTPUTS, FusedTuning

TOL = KERNEL_TOL
F64_TOL = 1e-12
#: Few programs (the interpreter pays per program; they still cover several capsules per split
#: and two batch groups).
FEW_PROGRAMS = FusedTuning(target_programs=8, target_programs_bwd=8, groups=2)


def layer_id(shape) -> str:
    return "in{}-out{}-D{}-Din{}".format(*shape)


def run_layer(u, w, iterations, grad_mode, grad_out, tuning=None, fused=True, precision=None):
    """Triton forward and gradients (u and weight) against float64 on the same values; ``precision``
    calls the fused op with that product precision (else PyTorch's setting decides)."""
    u_k = u.detach().clone().requires_grad_() if u.is_contiguous() else u.detach().requires_grad_()
    w_k = w.detach().clone().requires_grad_() if w.is_contiguous() else w.detach().requires_grad_()
    if precision is not None:
        v = ops.fused_layer_fwd(u_k, w_k, iterations, grad_mode, precision, (tuning or FusedTuning()).as_list())[0]
    elif tuning is None:
        v = ct.capsule_routing(u_k, w_k, iterations, grad_through_routing=grad_mode, backend="triton", fused=fused)
    else:
        v = ops.capsule_routing(u_k, w_k, iterations, grad_mode, tuning)
    du, dw = torch.autograd.grad(v, (u_k, w_k), grad_out)
    u64, w64 = (t.detach().double().cpu().requires_grad_() for t in (u, w))
    ref = ct.capsule_routing(u64, w64, iterations, grad_through_routing=grad_mode, backend="torch")
    du_ref, dw_ref = torch.autograd.grad(ref, (u64, w64), grad_out.double().cpu())
    assert v.dtype == u.dtype and du.dtype == u.dtype and dw.dtype == w.dtype
    return (v, ref), (du, du_ref), (dw, dw_ref)


def check_layer(u, w, iterations, grad_mode, tol, tuning=None, fused=True, grad_out=None, precision=None):
    if grad_out is None:
        grad_out = torch.randn(u.shape[0], w.shape[1], w.shape[2], device=u.device).to(u.dtype)
    results = run_layer(u, w, iterations, grad_mode, grad_out, tuning, fused, precision)
    for name, (out, ref) in zip(("v", "du", "dw"), results, strict=True):
        assert_close(name, out, ref, tol)


def layer_inputs(batch, n_in, n_out, d, d_in, dtype=torch.float32):
    u = torch.randn(batch, n_in, d_in, device=KERNEL_DEVICE).to(dtype)
    w = (0.5 / d_in**0.5 * torch.randn(n_in, n_out, d, d_in, device=KERNEL_DEVICE)).to(dtype)
    return u, w


# (N_in, N_out, D_out, D_in): every size of DESIGN.md section 4's grid (N_in 1 7 37 1152 below,
# N_out 1 2 3 10, D 1 5 16 33) and of the fused layer's (D_in 1 4 8 9 16, N_out 1 3 10 100),
# mixing small, odd and padded tiles
LAYER_SHAPES = [
    (1, 1, 1, 1),
    (7, 2, 5, 4),
    (37, 3, 16, 8),
    (37, 10, 33, 9),
    (7, 10, 1, 16),
    (37, 1, 5, 1),
    (7, 3, 33, 4),
    (7, 100, 5, 8),
    (1, 10, 16, 9),
]
LAYER_CASES = [(shape, 3) for shape in LAYER_SHAPES] + [
    ((7, 2, 5, 4), 1),
    ((7, 2, 5, 4), 2),
    ((7, 2, 5, 4), 5),
    ((37, 3, 16, 8), 5),
    ((1, 1, 1, 1), 5),
]


@pytest.mark.parametrize("grad_mode", [True, False], ids=["through", "detached"])
@pytest.mark.parametrize(
    ("shape", "iterations"),
    grid_params(
        LAYER_CASES,
        [f"{layer_id(s)}-R{r}" for s, r in LAYER_CASES],
        keep={"in1-out1-D1-Din1-R3", "in7-out2-D5-Din4-R3", "in7-out2-D5-Din4-R1"},
    ),
)
def test_fused_layer_fp32(shape, iterations, grad_mode):
    """The shape grid with few programs (runs of several chunks of input capsules each; the
    default launch parameters are exercised by the dtype, batch-size and model tests)."""
    u, w = layer_inputs(3, *shape)
    check_layer(u, w, iterations, grad_mode, TOL[torch.float32], tuning=FEW_PROGRAMS)


# D_in = 20: capsules of 32 (padded) components, beyond the 16 the issue names
DTYPE_SHAPES = [(37, 10, 16, 8), (7, 3, 5, 9), (5, 3, 5, 20)]


#: the passes on tensor cores with small programs: 16 examples (17 examples: two tiles, the
#: second one partial), two logits programs per tile (runs of several chunks, the last one
#: shorter; the sums passes one run: test_sums_partials_over_several_splits takes several)
CHUNKED = FusedTuning(
    target_programs=4, target_programs_bwd=4, groups=2, fwd_examples=16, fwd_chunk=16, final_chunk=16
)
PRODUCT_PATH_CASES = [
    ((13, 10, 16, 8), True),
    ((13, 10, 16, 8), False),
    ((7, 3, 5, 9), True),
    ((37, 2, 5, 1), True),
    ((9, 3, 33, 4), False),
]


@pytest.mark.parametrize(
    ("shape", "grad_mode"),
    grid_params(
        PRODUCT_PATH_CASES,
        [f"{layer_id(s)}-{'through' if g else 'detached'}" for s, g in PRODUCT_PATH_CASES],
        keep={"in13-out10-D16-Din8-through", "in7-out3-D5-Din9-through"},
    ),
)
def test_fused_layer_both_product_paths(shape, grad_mode):
    """Float32 products on tensor cores (here "tf32x3": every pass in input-capsule space, chunks of
    u's capsules) and in IEEE float32 (rank-one passes over tiles of predictions) give the same
    routing and gradients, with several example tiles and chunks: D_in = 8, D_in = 9 (u and W
    zero padded to 16 for the tensor-core passes) and D_in = 1, D_out = 33 (a padded D_out
    product)."""
    u, w = layer_inputs(17, *shape)
    cfg = ops.chunked_config(*shape[:1], *shape[2:], 17, CHUNKED)
    assert cfg.tiles == 2 and cfg.split.split == min(2, triton.cdiv(shape[0], cfg.block_ic))
    assert triton.cdiv(cfg.split.caps_per_split, cfg.block_ic) >= 2 or shape[0] <= 2 * cfg.block_ic
    for precision in ("tf32x3", "ieee"):
        check_layer(u, w, 3, grad_mode, TOL[torch.float32], tuning=CHUNKED, precision=precision)


@pytest.mark.slow
def test_sums_partials_over_several_splits():
    """The sums passes take runs of their own (``sums_split``: their programs counted with the
    output-capsule axis, fewer and longer runs than the logits pass's): here two runs of several
    chunks, whose partial sums the state, finalize and backward-sum kernels add in order, while
    the logits pass runs one chunk a program."""
    shape = (13, 10, 16, 8)
    tuning = FusedTuning(
        target_programs=40, target_programs_bwd=4, groups=2, fwd_examples=16, fwd_chunk=16, final_chunk=16
    )
    cfg = ops.chunked_config(*shape[:1], *shape[2:], 17, tuning)
    sums = ops.sums_split(cfg, shape[0], shape[1], tuning)
    assert sums.split == 2 and sums.caps_per_split >= 2 * cfg.block_ic and cfg.split.split > sums.split
    u, w = layer_inputs(17, *shape)
    check_layer(u, w, 3, True, TOL[torch.float32], tuning=tuning, precision="tf32x3")


def test_fused_layer_ieee_products_with_many_classes():
    """IEEE float32 products (rank-one tiles of predictions) with 100 output capsules: tiles of 4
    examples, five of them for 17 examples (the tensor-core passes take 100 classes in
    test_fused_layer_fp32)."""
    u, w = layer_inputs(17, 3, 100, 5, 8)
    assert fused_config(3, 100, 5, 8, 17, FEW_PROGRAMS, tensor_cores=False).tiles == 5
    check_layer(u, w, 3, True, TOL[torch.float32], tuning=FEW_PROGRAMS, precision="ieee")


def test_chunked_config_bounds_the_working_set():
    """The chunks of the passes in input-capsule space: at most 16 input capsules (the per-(example,
    capsule) softmax state), and chunks of 16 capsules at most 32 elements (D_in 3 and 4 take 8
    capsules a chunk), at most 2048 W elements, products at least 16 deep."""
    shapes = [(1152, 16, 8), (16, 64, 16), (37, 33, 9), (7, 5, 1), (16, 8, 8), (3, 1, 16)]
    shapes += [(37, 16, 4), (37, 16, 3), (37, 16, 2)]  # D_in 3 and 4: 8 capsules a chunk; D_in 2: 16
    for n_in, d, d_in in shapes:
        for float32 in (True, False):
            cfg = ops.chunked_config(n_in, d, d_in, 100, float32=float32)
            chunk = cfg.block_ic * cfg.block_kin
            assert cfg.block_ic <= 16 and cfg.block_kin == triton.next_power_of_2(d_in)
            assert cfg.block_ic <= 8 or chunk <= 32, (d_in, cfg)
            assert chunk >= 16 or cfg.block_ic == 1
            assert cfg.block_dk >= max(16, d) and 16 <= cfg.block_b <= 64
            assert cfg.block_dk * chunk <= 2048 or cfg.block_ic == 1
            assert cfg.block_b * cfg.block_dk <= (1024 if float32 else 4096) or cfg.block_b == 16
            assert cfg.split.caps_per_split % cfg.block_ic == 0 and cfg.tiles == triton.cdiv(100, cfg.block_b)


def test_uniform_block_pads_the_outputs_least():
    """Iteration 0 multiplies blocks of flattened outputs (N_out * D_out) at the tensor cores'
    rate, padded columns included: of the allowed blocks (a power of two, 16 to 64, at least 32
    unless all outputs fit one) the one with the fewest padded columns, the larger on a tie (fewer
    programs forming the same u operand). The paper's 160 outputs: 5 blocks of 32, not 3 of 64."""
    for outputs in range(1, 2100):
        block = ops.uniform_block(outputs)
        padded = triton.cdiv(outputs, block) * block
        assert block == triton.next_power_of_2(block) and 16 <= block <= ops.UNIFORM_OUTPUTS
        if outputs <= 32:  # one block, as small as tl.dot allows
            assert block == max(16, triton.next_power_of_2(outputs))
            continue
        for other in (32, 64):
            other_padded = triton.cdiv(outputs, other) * other
            assert padded < other_padded or (padded == other_padded and block >= other), (outputs, block)
    assert ops.uniform_block(10 * 16) == 32 and ops.uniform_block(100 * 16) == 64


def test_flat_capsules_copies_only_what_the_passes_cannot_load():
    """u and the weight enter the passes in input-capsule space with contiguous capsules of a
    power-of-two D_in: as they are when so (no copy), else zero padded copies."""
    u, w = layer_inputs(3, 7, 2, 5, 8)
    assert ops.flat_capsules(u) is u and ops.flat_capsules(w) is w
    for x, d_in in ((u[:, :, :5], 5), (u.transpose(0, 1), 8), (w[..., :3], 3)):
        flat = ops.flat_capsules(x)
        kin = triton.next_power_of_2(d_in)
        assert flat.is_contiguous() and flat.shape[-1] == kin
        assert torch.equal(flat[..., :d_in], x) and not flat[..., d_in:].any()


@pytest.mark.parametrize("grad_mode", [True, False], ids=["through", "detached"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape",
    grid_params([(s,) for s in DTYPE_SHAPES], [layer_id(s) for s in DTYPE_SHAPES], keep={"in7-out3-D5-Din9"}),
)
def test_fused_layer_dtypes(shape, dtype, grad_mode):
    u, w = layer_inputs(5, *shape, dtype=dtype)
    check_layer(u, w, 3, grad_mode, TOL[dtype])


@pytest.mark.parametrize("batch", [0, 1, 5, 33])
def test_fused_layer_batch_sizes(batch):
    u, w = layer_inputs(batch, 7, 3, 5, 4)
    if batch == 0:
        v = ct.capsule_routing(u.requires_grad_(), w.requires_grad_(), 3, backend="triton")
        du, dw = torch.autograd.grad(v.sum(), (u, w))
        assert v.shape == (0, 3, 5) and du.shape == u.shape and (dw == 0).all()  # no example: no gradient
    else:
        check_layer(u, w, 3, True, TOL[torch.float32])


@pytest.mark.parametrize("grad_mode", [True, False], ids=["through", "detached"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_empty_batch_every_dtype_and_gradient_mode(dtype, grad_mode):
    """No example: an empty v of u's dtype, and gradients of the inputs' shapes and dtypes, the
    weight's zero; for the fused layer and the routing on predictions alike."""
    u, w = layer_inputs(0, 7, 3, 5, 4, dtype=dtype)
    u.requires_grad_(), w.requires_grad_()
    v = ct.capsule_routing(u, w, 3, grad_through_routing=grad_mode, backend="triton")
    du, dw = torch.autograd.grad(v.sum(), (u, w))
    assert v.shape == (0, 3, 5) and v.dtype == dtype
    assert du.shape == u.shape and dw.shape == w.shape and du.dtype == dw.dtype == dtype and (dw == 0).all()
    u_hat = torch.randn(0, 7, 3, 5, device=KERNEL_DEVICE).to(dtype).requires_grad_()
    v = ct.dynamic_routing(u_hat, 3, grad_through_routing=grad_mode, backend="triton")
    (du_hat,) = torch.autograd.grad(v.sum(), u_hat)
    assert v.shape == (0, 3, 5) and v.dtype == dtype and du_hat.shape == u_hat.shape and du_hat.dtype == dtype


@pytest.mark.slow
def test_fused_layer_1152_input_capsules():
    """The paper's N_in (with fewer programs than the default aims for: the interpreter pays per
    program): many capsules per program, a short last split, batch groups in the final pass."""
    u, w = layer_inputs(3, 1152, 3, 5, 4)
    tuning = FusedTuning(target_programs=5, target_programs_bwd=7, groups=2)
    check_layer(u, w, 2, True, TOL[torch.float32], tuning=tuning)


@pytest.mark.parametrize(
    ("dtype", "precision"),
    [(torch.float32, "ieee"), (torch.float32, "tf32x3"), (torch.bfloat16, "ieee")],
    ids=["fp32-ieee", "fp32-tf32x3", "bf16"],
)
def test_weight_gradient_summed_over_the_tiles_of_a_group(dtype, precision):
    """One batch group of three example tiles (16 + 16 + 1): the final pass sums dW over the
    group's tiles, in registers in the pass on tensor cores (half types; float32 as TF32 or
    3xTF32), in its group's part in memory in the rank-one pass (float32, IEEE products)."""
    shape, batch = (7, 10, 16, 8), 33
    tuning = FusedTuning(target_programs=8, target_programs_bwd=8, groups=1)
    assert tuning.final_examples == 16 and fused_config(*shape, batch, tuning, tensor_cores=False).tiles_per_group == 3
    u, w = layer_inputs(batch, *shape, dtype=dtype)
    check_layer(u, w, 3, True, TOL[dtype], tuning=tuning, precision=precision)


@pytest.mark.parametrize("grad_mode", [True, False], ids=["through", "detached"])
@pytest.mark.parametrize(
    ("dtype", "precision", "parts"),
    [(torch.float32, "tf32x3", True), (torch.float32, "tf32", False), (torch.bfloat16, "ieee", True)],
    ids=["fp32-tf32x3", "fp32-tf32", "bf16"],
)
def test_logits_pass_takes_v_and_ds_as_parts_or_as_float32(dtype, precision, parts, grad_mode):
    """The logits pass reads V_r and ds_r split into two parts by the kernels that formed them
    (state forward; bwd_ds backward, ds only through routing) where its products take parts (half
    inputs, 3xTF32), else the saved float32 V and ds (TF32), each launch with the flags that say
    which and the logits pass reading the very buffers the launch before it wrote. The parts run in
    every other test of the layer; TF32's float32 V and ds here, against float64: the interpreter
    multiplies TF32 in float32 (float32's tolerance), a GPU in TF32, whose operands keep 11
    significant bits, more than bfloat16's 8: bfloat16's tolerance (2^-7; routing u and W truncated
    to TF32 in float64 erred by at most 1.4e-3 over 20 seeds of this shape, both modes)."""
    from capstriton.ops._launch import recording

    shape, batch = (37, 3, 5, 9), 7
    u, w = layer_inputs(batch, *shape, dtype=dtype)
    if not parts:
        tol = TOL[torch.float32] if KERNEL_DEVICE == "cpu" else TOL[torch.bfloat16]
        check_layer(u, w, 3, grad_mode, tol, tuning=FEW_PROGRAMS, precision=precision)
    launches = []
    with recording(lambda kernel, grid, kwargs: launches.append((kernel.__name__, kwargs))):
        saved = torch.zeros(3, batch, *shape[1:3], device=u.device)
        ops.fused_layer_fwd(u, w, 3, grad_mode, precision, FEW_PROGRAMS.as_list())
        ops.fused_layer_bwd(saved[0], u, w, saved, saved, 3, grad_mode, precision, FEW_PROGRAMS.as_list())
    with_parts = [(name.removesuffix("_kernel"), kw) for name, kw in launches if "PARTS" in kw]
    flags = [(name, {k: kw[k] for k in ("PARTS", "DS_PARTS") if k in kw}) for name, kw in with_parts]
    for (_, before), (name, kw) in zip(with_parts, with_parts[1:], strict=False):
        if name == "fused_layer_logits" and parts:  # the parts the launch before wrote, slot 0
            assert kw["v_ptr"] is before["vparts_ptr"] and kw["r"] == 0
            if before.get("DS_PARTS"):  # the backward through routing
                assert kw["ds_ptr"] is before["dsparts_ptr"] and kw["GRAD"]
    logits = ("fused_layer_logits", {"PARTS": parts})
    if grad_mode:  # backward steps 2, 1 through routing, then ds_0 (no logits pass after it)
        expected_bwd = [("fused_layer_bwd_ds", {"PARTS": parts, "DS_PARTS": parts}), logits] * 2 + [
            ("fused_layer_bwd_ds", {"PARTS": False, "DS_PARTS": False})]
    else:  # detached: ds_2, split with V_2 (not ds) for the coupling of step 2
        expected_bwd = [("fused_layer_bwd_ds", {"PARTS": parts, "DS_PARTS": False}), logits]
    assert flags == [("fused_layer_state", {"PARTS": parts}), logits] * 2 + expected_bwd


@pytest.mark.parametrize(
    ("shape", "grad_mode"),
    # the further cases are shape_grid: the oldest triton's rerun of the kernel tests skips them
    [((19, 10, 16, 8), True)]
    + [pytest.param(s, g, marks=shape_grid) for s, g in (((7, 3, 16, 3), False), ((5, 1, 16, 16), True),
                                                          ((1, 10, 16, 8), False))],
    ids=lambda x: layer_id(x) if isinstance(x, tuple) else ("through" if x else "detached"),
)
def test_logits_in_registers_are_the_loops_bit_for_bit(shape, grad_mode, monkeypatch):
    """The logits pass keeps the logits of a few 16D output capsules in registers with bfloat16
    inputs where it forms coefficients only (``logits_in_registers``; ``N_OUT`` in the launch: the
    forward, where it runs in two passes, and the detached backward's recomputation, not the logit
    gradients), and the coefficients, so the outputs and the gradients, are those of the loops
    through memory bit for bit: the same operations in the same order. Against float64 too."""
    from capstriton.ops._launch import recording

    # the forward in two passes (logits, then sums), not the coupled sums (their own test below)
    monkeypatch.setattr(ops, "coupled_sums", lambda *args: False)
    n_out, d = shape[1], shape[2]
    assert ops.logits_in_registers(n_out, d, torch.bfloat16)
    assert not ops.logits_in_registers(n_out, d, torch.float32)
    assert not ops.logits_in_registers(n_out, 8, torch.bfloat16)
    assert not ops.logits_in_registers(ops.LOGITS_IN_REGISTERS + 1, d, torch.bfloat16)
    u, w = layer_inputs(17, *shape, dtype=torch.bfloat16)

    def logits_launches():
        launches = []
        with recording(lambda kernel, grid, kwargs: launches.append((kernel.__name__, kwargs))):
            saved = torch.zeros(3, 17, n_out, d, device=u.device)
            ops.fused_layer_fwd(u, w, 3, grad_mode, "ieee", FEW_PROGRAMS.as_list())
            ops.fused_layer_bwd(saved[0], u, w, saved, saved, 3, grad_mode, "ieee", FEW_PROGRAMS.as_list())
        return [(kw["GRAD"], kw["N_OUT"]) for name, kw in launches if name == "fused_layer_logits_kernel"]

    backward = [(True, 0)] * 2 if grad_mode else [(False, n_out)]
    assert logits_launches() == [(False, n_out)] * 2 + backward
    grad_out = torch.randn(17, n_out, d, device=u.device).to(u.dtype)
    results = [run_layer(u, w, 3, grad_mode, grad_out, FEW_PROGRAMS, True, None)]
    monkeypatch.setattr(ops, "logits_in_registers", lambda *args: False)
    assert all(n == 0 for _, n in logits_launches())
    results.append(run_layer(u, w, 3, grad_mode, grad_out, FEW_PROGRAMS, True, None))
    for name, (in_registers, ref), (through_memory, _) in zip(("v", "du", "dw"), *results, strict=True):
        assert torch.equal(in_registers, through_memory), name
        assert_close(name, in_registers, ref, TOL[torch.bfloat16])


@pytest.mark.parametrize(
    ("shape", "batch", "grad_mode"),
    # N_out 10, 3 and 1; chunks of 8 capsules of 8 components (5 of them padded to 8), of 8 of 4
    # and of 16 single components; runs that end in a partial chunk; two example tiles (66
    # examples). The further cases are shape_grid (not rerun with the oldest triton)
    [((19, 10, 16, 8), 17, True)]
    + [pytest.param(*c, marks=shape_grid) for c in (((7, 3, 16, 5), 5, False), ((23, 1, 16, 1), 3, True),
                                                    ((13, 7, 16, 3), 66, False))],
    ids=lambda x: layer_id(x) if isinstance(x, tuple) else str(x) if isinstance(x, int) else (
        "through" if x else "detached"),
)
def test_coupled_sums_are_the_two_passes_up_to_summation_order(shape, batch, grad_mode, monkeypatch):
    """With bfloat16 inputs, 16D output capsules and up to ``LOGITS_IN_REGISTERS`` of them the
    forward runs each iteration after the first in one pass (``coupled_sums``): the coefficients
    stay in registers and the partial sums of every output capsule accumulate beside them. Its
    coefficients are the logits pass's, bit for bit, and c u's two bfloat16 parts the sums pass's
    (the same ``half_products`` of the same numbers), so its sums differ from the two passes' only
    in the order the tensor cores add the same products: by at most the float32 rounding of a sum
    of their magnitudes, both ways. Checked on the saved s of iteration 0 (the same pass, exactly)
    and of the first coupled iteration (the bound), on v (within a bfloat16 rounding, iteration 2
    adding iteration 1's difference), over one split and several, and v, du and dw against
    float64."""
    from capstriton.ops._launch import recording

    n_in, n_out, d, d_in = shape
    block_ic = ops.chunked_config(n_in, d, d_in, batch, FEW_PROGRAMS, False).block_ic
    assert ops.coupled_sums(n_out, d, d_in, torch.bfloat16, block_ic)
    assert not ops.coupled_sums(n_out, d, d_in, torch.float32, block_ic)
    assert not ops.coupled_sums(n_out, 8, d_in, torch.bfloat16, block_ic)
    assert not ops.coupled_sums(ops.LOGITS_IN_REGISTERS + 1, d, d_in, torch.bfloat16, block_ic)
    assert not ops.coupled_sums(n_out, d, 9, torch.bfloat16, block_ic)
    assert not ops.coupled_sums(n_out, d, d_in, torch.bfloat16, 4)  # capsule-major chunks
    u, w = layer_inputs(batch, *shape, dtype=torch.bfloat16)
    splits = []

    def forward(tuning):
        launches = []  # (recorded, not run)
        with recording(lambda kernel, grid, kwargs: launches.append((kernel.__name__, grid, kwargs))):
            ops.fused_layer_fwd(u, w, 3, grad_mode, "ieee", tuning.as_list())
        v, s_saved, _ = ops.fused_layer_fwd(u, w, 3, grad_mode, "ieee", tuning.as_list())
        names = [name.removesuffix("_kernel") for name, _, _ in launches]
        splits.extend(grid[1] for name, grid, _ in launches if name == "fused_layer_coupled_sums_kernel")
        return names, v, s_saved

    expected = ["fused_layer_weight_chunks", "fused_layer_uniform_sums"]
    expected += ["fused_layer_state", "fused_layer_coupled_sums"] * 2
    one_split = dataclasses.replace(FEW_PROGRAMS, coupled_programs=1)
    coupled = [forward(t) for t in (FEW_PROGRAMS, one_split)]
    for names, _, _ in coupled:
        assert names == expected + ["dynamic_routing_finalize"]
    # several runs of input capsules (where there are several chunks), and one
    chunks = triton.cdiv(n_in, ops.chunked_config(n_in, d, d_in, batch, FEW_PROGRAMS, False).block_ic)
    assert min(splits) == 1 and (max(splits) > 1 or chunks == 1)
    # one iteration has no later ones: the weight is not laid out in chunks
    one_iteration = []
    with recording(lambda kernel, grid, kwargs: one_iteration.append(kernel.__name__.removesuffix("_kernel"))):
        ops.fused_layer_fwd(u, w, 1, grad_mode, "ieee", FEW_PROGRAMS.as_list())
    assert one_iteration == ["fused_layer_uniform_sums", "dynamic_routing_finalize"]
    # chunks of fewer than 8 capsules are capsule-major: the two passes take them
    small = dataclasses.replace(FEW_PROGRAMS, fwd_chunk=32)
    names, v_small, _ = forward(small)
    small_ic = ops.chunked_config(n_in, d, d_in, batch, small, False).block_ic
    assert ("fused_layer_coupled_sums" in names) == (small_ic >= 8)
    assert rel_err(v_small.float(), coupled[0][1].float()) < 2.0**-7
    monkeypatch.setattr(ops, "coupled_sums", lambda *args: False)
    names, v_two, s_two = forward(FEW_PROGRAMS)
    assert "fused_layer_coupled_sums" not in names and "fused_layer_sums" in names
    # each path adds N_in * D_in products c u_hat (as hi + lo: twice as many terms) in float32:
    # |error| <= 2 N_in D_in eps sum |c u W| <= 2 N_in D_in eps sum_{i,k} |W u| per output (c <= 1),
    # eps = 2^-23, not 2^-24: tensor cores may truncate their float32 sums instead of rounding
    magnitude = torch.einsum("ijdk,bik->bjd", w.double().abs(), u.double().abs())
    bound = 2 * (2 * n_in * d_in * 2.0**-23) * magnitude
    for _, v, s_saved in coupled:
        assert (s_saved[0] == s_two[0]).all()  # iteration 0: the same uniform sums
        # iteration 1 from the same V_1; iteration 2's V_2 already differs by that rounding (and v
        # is rounded to bfloat16: at most a rounding of each element apart, plus that)
        assert ((s_saved[1].double() - s_two[1].double()).abs() <= bound).all()
        assert rel_err(v.float(), v_two.float()) < 2.0**-7
    monkeypatch.undo()
    check_layer(u, w, 3, grad_mode, TOL[torch.bfloat16], tuning=FEW_PROGRAMS)


@pytest.mark.parametrize(("n_in", "d", "d_in", "block_ic"), [(13, 16, 8, 8), (8, 10, 3, 16), (1, 16, 1, 16)])
def test_weight_chunks_are_the_weight_component_major(n_in, d, d_in, block_ic):
    """``fused_layer_weight_chunks_kernel`` (the coupled sums' weight, laid out once a call): for
    each chunk of ``block_ic`` input capsules and output capsule j the [D, chunk] block of W_j
    with column ``k * block_ic + i``, contiguous, zeros past N_in and D (rows to BLOCK_DK); from
    a weight with strides of its own (every element written: the output comes NaN-poisoned)."""
    from capstriton.kernels.fused_layer import fused_layer_weight_chunks_kernel

    n_out, kin, block_dk = 3, triton.next_power_of_2(d_in), max(16, triton.next_power_of_2(d))
    base = torch.randn(n_out, n_in, d, kin, device=KERNEL_DEVICE).to(torch.bfloat16)
    w = base.transpose(0, 1)  # [N_in, N_out, D, BLOCK_KIN], capsules not contiguous
    chunks = triton.cdiv(n_in, block_ic)
    out = torch.full((chunks, n_out, block_dk, kin, block_ic), float("nan"), dtype=w.dtype, device=w.device)
    fused_layer_weight_chunks_kernel[(chunks, n_out)](
        w, out, n_in, n_out, d, w.stride(0), w.stride(1), BLOCK_IC=block_ic, BLOCK_KIN=kin, BLOCK_DK=block_dk
    )
    padded = torch.zeros(chunks * block_ic, n_out, block_dk, kin, dtype=w.dtype)
    padded[:n_in, :, :d] = w.cpu()
    expected = padded.view(chunks, block_ic, n_out, block_dk, kin).permute(0, 2, 3, 4, 1)
    assert torch.equal(out.cpu(), expected)


def test_fused_layer_non_contiguous_inputs_and_expanded_gradient():
    base_u = torch.randn(9, 5, 4, device=KERNEL_DEVICE)
    u = base_u.transpose(0, 1)[::2]  # [3, 9, 4], no unit stride on the batch axis
    w = (0.3 * torch.randn(5, 3, 9, 4, device=KERNEL_DEVICE)).permute(2, 1, 0, 3)[:, :, ::2]  # [9, 3, 3, 4]
    assert not u.is_contiguous() and not w.is_contiguous()
    grad_out = torch.ones(1, 1, 1, device=KERNEL_DEVICE).expand(3, 3, 3)  # as from v.sum(): stride 0
    for precision in ("tf32x3", "ieee"):
        check_layer(u, w, 3, True, TOL[torch.float32], tuning=FEW_PROGRAMS, grad_out=grad_out, precision=precision)


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30], ids=["zero", "tiny", "huge"])
def test_fused_layer_extreme_magnitudes(scale):
    u, w = layer_inputs(3, 7, 3, 5, 4)
    u = scale * u
    u[1] = 0.0  # one example of exact zeros among the others
    (v, ref), (du, du_ref), (dw, dw_ref) = run_layer(u, w, 3, True, torch.randn(3, 3, 5, device=KERNEL_DEVICE))
    assert torch.isfinite(v).all() and torch.isfinite(du).all() and torch.isfinite(dw).all()
    assert (v[1] == 0).all() and (du[1] == 0).all()  # zero Jacobian of squash at s = 0
    if scale == 1e-30:
        # |v| ~ |s|^2 and dW ~ du_hat u ~ 1e-60: below float32's smallest subnormal, exactly 0
        assert ref.abs().max() < 1e-45 and (v == 0).all()
        assert dw_ref.abs().max() < 1e-45 and (dw == 0).all()
    else:
        assert_close("v", v, ref, TOL[torch.float32])
        assert_close("dw", dw, dw_ref, TOL[torch.float32])
    assert_close("du", du, du_ref, TOL[torch.float32])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("grad_mode", [True, False], ids=["through", "detached"])
@pytest.mark.parametrize(("u_scale", "w_scale", "grad_scale"), FLOAT16_RANGE_CASES, ids=FLOAT16_RANGE_IDS)
def test_float16_gradients_keep_float32_range(u_scale, w_scale, grad_scale, grad_mode, fused):
    """float16 inputs whose gradients' float32 intermediates leave float16's range: large |s| makes
    the gradient of s fall below float16's normals (du and dw came back 8% off, or exactly 0, when
    the layer split such factors into two float16 numbers), and a loss-scaled output gradient
    pushes them beyond 65504 (du came back NaN though its true values fit). The unfused layer
    (``fused=False``) too: its predictions of u and W of 1e3 (about 4e6) are beyond float16's range
    themselves (they came back infinite, v NaN). Against float64 on the same float16 values
    (``assert_float16_range``)."""
    u, w, grad_out = float16_range_inputs(u_scale, w_scale, grad_scale, KERNEL_DEVICE)
    (v, ref), (du, du_ref), (dw, dw_ref) = run_layer(u, w, 3, grad_mode, grad_out, fused=fused)
    assert_close("v", v, ref, TOL[torch.float16])
    assert_float16_range("du", du, du_ref, min_normal=5)
    assert_float16_range("dw", dw, dw_ref)


def test_fused_layer_deterministic():
    u, w = layer_inputs(20, 7, 10, 16, 8)
    u.requires_grad_()
    w.requires_grad_()
    runs = []
    for _ in range(2):
        v = ct.capsule_routing(u, w, 3, backend="triton")
        runs.append((v, *torch.autograd.grad(v, (u, w), torch.ones_like(v))))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_largest_capsules_run_fused(dtype):
    """The largest sizes the layer is specified for (128 output capsules of 64D from 16D inputs),
    beyond the rank-one kernels' FUSED_MAX_OUTPUTS, run fused on the tensor-core passes, whose
    registers do not grow with the capsules (one output capsule at a time), and agree with
    float64 (the kernel report compiles them without spills)."""
    assert 128 * 64 > FUSED_MAX_OUTPUTS
    u, w = layer_inputs(3, 2, 128, 64, 16, dtype=dtype)
    check_layer(u, w, 2, True, TOL[dtype])


def test_ieee_precision_refuses_blocks_beyond_the_rank_one_limit():
    """The op's "ieee" precision (rank-one kernels, which no public call selects) names the limit
    and the precision that takes any size, for any batch; half inputs (always on tensor cores)
    are not limited."""
    tuning = FusedTuning().as_list()
    for batch in (0, 2):
        u, w = layer_inputs(batch, 3, 128, 64, 16)
        with pytest.raises(ValueError, match=r"weight: precision 'ieee'.*2048.*128 x 64.*tf32x3"):
            ops.fused_layer_fwd(u, w, 2, True, "ieee", tuning)
        v = torch.zeros(batch, 128, 64)
        with pytest.raises(ValueError, match=r"weight: precision 'ieee'"):
            ops.fused_layer_bwd(v, u, w, torch.zeros(2, batch, 128, 64), torch.zeros(2, batch, 128, 64), 2, True,
                                "ieee", tuning)
    u, w = layer_inputs(0, 3, 128, 64, 16, dtype=torch.bfloat16)
    assert ops.fused_layer_fwd(u, w, 2, True, "ieee", tuning)[0].shape == (0, 128, 64)


def test_unfused_option_matches_reference():
    u, w = layer_inputs(3, 37, 10, 16, 8)
    check_layer(u, w, 3, True, TOL[torch.float32], fused=False)


def test_float32_matmul_precision_reaches_the_kernels():
    """torch.get_float32_matmul_precision() is read in Python and passed to the ops of both
    layers with products on chip (the fused layer, self-attention routing's layer form): 3xTF32
    products under "highest" (the default), TF32 under "high" and "medium". Recorded forward
    launches, nothing runs."""
    from capstriton.ops import self_attention_routing as attention_ops
    from capstriton.ops._launch import recording

    u, w = layer_inputs(2, 7, 10, 16, 8)
    saved = torch.get_float32_matmul_precision()
    seen = {}
    try:
        for setting in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(setting)
            launches = []

            def record(kernel, grid, kwargs, launches=launches):
                launches.append((kernel.__name__, kwargs))

            with recording(record):
                ops.capsule_routing(u, w, 3, True)
                attention_ops.self_attention_capsule_routing(u, w)
            seen[setting] = {k.removesuffix("_kernel"): kw["PRECISION"] for k, kw in launches if "PRECISION" in kw}
    finally:
        torch.set_float32_matmul_precision(saved)
    passes = ("fused_layer_logits", "fused_layer_uniform_sums", "fused_layer_sums", "self_attention_routing_fwd")
    assert seen["highest"] == dict.fromkeys(passes, "tf32x3")
    assert seen["high"] == seen["medium"] == dict.fromkeys(passes, "tf32")


@pytest.mark.parametrize(
    ("shape", "tuning", "chunk_m"),
    [((1152, 10, 16, 8), None, True), ((37, 3, 33, 9), None, False), ((13, 10, 16, 8), CHUNKED, False)],
    ids=["chunks-of-128", "D33-chunks-of-32", "chunks-of-16"],
)
def test_final_pass_orientation(shape, tuning, chunk_m):
    """The final backward pass accumulates du^T, the chunk of (input capsule, D_in) elements as the
    products' M (the warpgroup MMA on sm_90 takes M of 64 or more), where a chunk has 64 elements
    or more, else du (D_out > 32 holds chunks to 32 elements: du^T spilled there). Recorded
    launches, nothing runs; both orientations' numbers are checked by the shape-grid tests
    (default tuning: du^T for D_out <= 32; ``CHUNKED`` and D_out = 33: du)."""
    from capstriton.ops._launch import recording

    tuning = tuning or FusedTuning()
    u, w = layer_inputs(2, *shape)
    saved = torch.zeros(3, 2, *shape[1:3], device=u.device)
    grad_v = torch.zeros(2, *shape[1:3], device=u.device)
    launches = []
    with recording(lambda kernel, grid, kwargs: launches.append((kernel.__name__, kwargs))):
        ops.fused_layer_bwd(grad_v, u, w, saved, saved, 3, True, "tf32x3", tuning.as_list())
    chunk_ms = [kw["CHUNK_M"] for name, kw in launches if name == "fused_layer_bwd_input_kernel"]
    assert chunk_ms == [chunk_m]


def _tf32_nearest(x: torch.Tensor) -> torch.Tensor:
    """float32 -> TF32 as ``cvt.rna.tf32.f32`` rounds: 10 mantissa bits, ties away from zero."""
    return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def _tf32_operand(x: torch.Tensor) -> torch.Tensor:
    """What a TF32 tensor-core product reads of a float32 operand: its top 19 bits."""
    return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)


def _predictions_3xtf32(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The kernels' "tf32x3" products (kernels/common.py: dot_f32) on the CPU: big = TF32(a), small =
    a - big, and small*big + big*small + big*big as TF32 products (exact in float32) with float32
    sums."""

    def product(a, b):
        return torch.einsum("bik,ijdk->bijd", _tf32_operand(a), _tf32_operand(b))

    u_big, w_big = _tf32_nearest(u), _tf32_nearest(w)
    return product(u - u_big, w_big) + product(u_big, w - w_big) + product(u_big, w_big)


@pytest.mark.parametrize("shape", [(1152, 10, 16, 8), (37, 3, 16, 9), (16, 100, 8, 16)], ids=layer_id)
def test_3xtf32_products_route_as_accurately_as_ieee_products(shape):
    """Why "highest" may multiply as 3xTF32: on an emulation of the kernels' decomposition (the
    interpreter multiplies every dot in IEEE float32, so the kernels' CPU runs cannot show it),
    routing its predictions in float32 lands as close to float64 as routing IEEE float32
    predictions does: the products' extra error (about 2^-20 relative against 2^-24) is below the
    routing's own float32 rounding. Plain TF32 misses the float32 tolerance by far, so the
    comparison can tell them apart."""
    u, w = layer_inputs(4, *shape)
    u_hat64 = torch.einsum("bik,ijdk->bijd", u.double(), w.double())
    v64 = reference.dynamic_routing(u_hat64, 3)
    predictions = {
        "ieee": torch.einsum("bik,ijdk->bijd", u, w),
        "tf32x3": _predictions_3xtf32(u, w),
        "tf32": torch.einsum("bik,ijdk->bijd", _tf32_nearest(u), _tf32_nearest(w)),
    }
    # the products themselves: 3xTF32 within a few roundings of IEEE's (seen: 1.7x its error,
    # the dropped remainder product and truncated remainders adding about one rounding each)
    assert rel_err(predictions["tf32x3"], u_hat64) < 4 * rel_err(predictions["ieee"], u_hat64)
    errors = {name: rel_err(reference.dynamic_routing(u_hat, 3), v64) for name, u_hat in predictions.items()}
    assert errors["tf32x3"] < TOL[torch.float32], errors
    # "as tightly as the float32 path": within twice its error (seen: 0.9x to 1.2x)
    assert errors["tf32x3"] < 2 * errors["ieee"], errors
    assert errors["tf32"] > 10 * TOL[torch.float32], errors


@triton.jit
def _tf32_nearest_kernel(x_ptr, out_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(out_ptr + o, tf32_nearest(tl.load(x_ptr + o)))


@triton.jit
def _dot_f32_kernel(
    a_ptr, b_ptr, out_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    o_m, o_n, o_k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    b_a = tl.load(a_ptr + o_m[:, None] * K + o_k[None, :])
    b_b = tl.load(b_ptr + o_k[:, None] * N + o_n[None, :])
    tl.store(out_ptr + o_m[:, None] * N + o_n[None, :], dot_f32(b_a, b_b, PRECISION, DOT_F32))


def _wide_range(*shape: int, octaves: int = 60) -> torch.Tensor:
    """float32 values of both signs, each row (first index) scaled by its own 2^e, |e| <= octaves."""
    scale = torch.exp2(torch.randint(-octaves, octaves + 1, shape[:1] + (1,) * (len(shape) - 1)).double())
    return (torch.randn(*shape, dtype=torch.float64) * scale).float()


def test_tf32_nearest_rounds_to_10_mantissa_bits_ties_away():
    """The kernels' TF32 rounding (two integer instructions in place of cvt.rna.tf32.f32) against
    its definition computed in float64: the nearest float with 10 mantissa bits, ties away from
    zero, over random magnitudes, exact ties and their neighbours (both signs), carries into the
    exponent and into infinity, zeros and subnormals."""
    bits = torch.tensor([0x3F801000, 0x3F800FFF, 0x3F801001, 0x3F803000, 0x3FFFF000, 0x7F7FE000 - 0x1000,
                         0x7F7FF000, 0x7F7FEFFF, 0x00001000, 0x00003000, 0x00000FFF, 0x007FF000, 0x00000001, 0],
                        dtype=torch.int64)
    bits = torch.cat([bits, bits | 0x80000000]).to(torch.int32)  # (wraps to the negative int32s)
    x = torch.cat([bits.view(torch.float32), _wide_range(1000), torch.rand(12) * 1e-38])
    n = triton.next_power_of_2(x.numel())
    x = torch.nn.functional.pad(x, (0, n - x.numel())).to(KERNEL_DEVICE)
    out = torch.full_like(x, float("nan"))
    _tf32_nearest_kernel[(1,)](x, out, N=n)
    x64 = x.double().cpu()
    _, exponent = torch.frexp(x64)  # x = m 2^exponent, 0.5 <= |m| < 1
    quantum = torch.exp2((torch.clamp(exponent - 1, min=-126) - 10).double())  # 2^-136 below the normals
    expected = torch.sign(x64) * torch.floor(x64.abs() / quantum + 0.5) * quantum
    # beyond float32's largest, rounding overflows (0x7F7FF000 and up): infinity
    expected = torch.where(expected.abs() > torch.finfo(torch.float32).max, torch.sign(x64) * torch.inf, expected)
    assert torch.equal(out.cpu().double(), expected)


@pytest.mark.parametrize("k", [16, 64])
def test_3xtf32_split_of_dot_f32(k):
    """dot_f32's "tf32x3" products, run as on a GPU (the split is skipped where the interpreter
    runs a kernel: ``DOT_F32``): within the bound of a float32 dot product of k terms, elementwise
    ``|out - ref| <= (2^-20 + k 2^-24) (|a| @ |b|)`` (the dropped remainder product below 2^-22 of
    each term, the remainders' bits beyond TF32 2^-21 each, k float32 additions), on rows of a and
    columns of b scaled by 2^-40 .. 2^40; a single TF32 product (``"tf32"``, about 2^-11 a term)
    misses it."""
    m, n = 32, 16
    a, b = _wide_range(m, k, octaves=40), _wide_range(n, k, octaves=40).T.contiguous()
    ref = a.double() @ b.double()
    bound = (2.0**-20 + k * 2.0**-24) * (a.double().abs() @ b.double().abs())
    errors = {}
    # (the interpreter multiplies "tf32" in float32: plain TF32 is told apart on a GPU only)
    for precision in ("tf32x3", "tf32") if KERNEL_DEVICE == "cuda" else ("tf32x3",):
        out = torch.full((m, n), float("nan"), device=KERNEL_DEVICE)
        _dot_f32_kernel[(1,)](a.to(KERNEL_DEVICE), b.to(KERNEL_DEVICE), out, M=m, N=n, K=k, PRECISION=precision,
                              DOT_F32=False)
        errors[precision] = ((out.cpu().double() - ref).abs() / bound).max().item()
    assert errors["tf32x3"] <= 1.0, errors
    if "tf32" in errors:
        assert errors["tf32"] > 10.0, errors


@triton.jit
def _parts_kernel(x_ptr, hi_ptr, lo_ptr, N: tl.constexpr, FACTOR: tl.constexpr):
    """x split into hi and lo of hi's dtype: ``factor_parts`` (``FACTOR``), else ``half_parts``."""
    o = tl.arange(0, N)
    if FACTOR:
        b_hi, b_lo = factor_parts(tl.load(x_ptr + o), hi_ptr.dtype.element_ty)
    else:
        b_hi, b_lo = half_parts(tl.load(x_ptr + o), hi_ptr.dtype.element_ty)
    tl.store(hi_ptr + o, b_hi)
    tl.store(lo_ptr + o, b_lo)


def _split(factor: bool, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_parts_kernel`` (``factor_parts`` or ``half_parts`` into ``dtype``) over float32 ``x`` (zero
    padded to a power of two), on NaN-poisoned outputs: (x, hi, lo) on the CPU."""
    n = triton.next_power_of_2(x.numel())
    x = torch.nn.functional.pad(x, (0, n - x.numel())).to(KERNEL_DEVICE)
    hi = torch.full(x.shape, float("nan"), dtype=dtype, device=KERNEL_DEVICE)
    lo = torch.full_like(hi, float("nan"))
    _parts_kernel[(1,)](x, hi, lo, N=n, FACTOR=factor)
    return x.cpu(), hi.cpu(), lo.cpu()


def test_half_parts_splits_float32_into_two_bfloat16_numbers():
    """``half_parts``, through which every product of the fused layer with bfloat16 inputs takes a
    float32 factor (V, ds, c u, g u, du_hat) as hi + lo: hi is x's upper 16 bits (x truncated, bit
    for bit; finite beyond bfloat16's largest value) and lo the remainder rounded to nearest even,
    so |x - hi - lo| <= 2^-15 |x|. Magnitudes across the type's range, both signs, zeros. (Down to
    2^-100, where every remainder is a normal float32: Triton's interpreter converts float32
    subnormals to bfloat16 unlike a GPU.)"""
    special = [0.0, -0.0, 1.0, -1.0 - 2.0**-20, -(2.0**-7) * (1 + 2.0**-23), 3.4e38, -3.4e38, 2.0**-100]
    bound = 2.0**-15
    magnitudes = torch.exp2(torch.empty(2000, dtype=torch.float64).uniform_(-100, 127.9))
    x = torch.cat([(torch.sign(torch.randn(2000)) * magnitudes).float(), torch.tensor(special)])
    x, hi, lo = _split(False, x, torch.bfloat16)
    assert torch.equal(hi.view(torch.int16), (x.view(torch.int32) >> 16).to(torch.int16))
    remainder = x - hi.float()  # exact in float32
    if KERNEL_DEVICE == "cpu":
        # Triton's interpreter converts float32 to bfloat16 by truncation (a GPU's cvt.rn rounds to
        # nearest even): its lo is the remainder truncated, at most one bfloat16 ulp of it off
        assert torch.equal(lo.view(torch.int16), (remainder.view(torch.int32) >> 16).to(torch.int16))
        bound *= 2
    else:
        assert torch.equal(lo, remainder.to(torch.bfloat16))
    error = (x.double() - hi.double() - lo.double()).abs()
    assert (error <= bound * x.double().abs()).all()
    # the split keeps bits a single rounding loses: over all elements (where that rounding stays
    # finite) at least 5 more (under the interpreter, lo truncated: 2^-7.3 seen)
    single = (x.double() - x.to(torch.bfloat16).double()).abs()
    finite = single.isfinite()
    assert error[finite].sum() < 2.0**-5 * single[finite].sum()


@pytest.mark.parametrize("factor", [False, True], ids=["half_parts", "factor_parts"])
def test_float16_parts_are_refused(factor):
    """float16 has no half path (its parts of large or small factors leave its range: the layers
    run float16 inputs as float32, ``float16_as_float32``): asking ``half_parts`` or
    ``factor_parts`` for float16 parts fails when the kernel is compiled, naming float16."""
    with pytest.raises(Exception, match="float16") as info:
        _split(factor, torch.randn(16), torch.float16)
    assert "half_parts splits into bfloat16" in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_factor_parts_are_the_parts_each_product_splits(dtype):
    """``factor_parts``, by which the kernels that form V_r and ds_r split them once for the logits
    pass: for bfloat16 exactly ``half_parts``' two numbers, bit for bit; for float32 (3xTF32) hi
    is the TF32 rounding ``dot_f32`` takes (ties away, computed here on the integers) and lo the
    exact remainder, hi + lo = x. Magnitudes 2^-60 .. 2^60, both signs, zeros."""
    octaves = 60
    ties = [1.0 + 2.0**-11, -(1.0 + 3 * 2.0**-11)]  # TF32 ties: away from zero
    x, hi, lo = _split(True, torch.cat([_wide_range(2000, octaves=octaves),
                                                       torch.tensor([0.0, -0.0, *ties])]), dtype)
    if dtype == torch.float32:
        expected_hi = _tf32_nearest(x)
        expected_lo = x - expected_hi
        assert torch.equal(hi + lo, x)  # (as values: -0 splits into -0 and +0)
    else:
        _, expected_hi, expected_lo = _split(False, x, dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(hi.view(bits), expected_hi.view(bits))
    assert torch.equal(lo.view(bits), expected_lo.view(bits))


@triton.jit
def _dot_parts_kernel(
    a_ptr, b_ptr, split_ptr, parts_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, DOT_F32: tl.constexpr
):
    o_m, o_n, o_k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    b_a = tl.load(a_ptr + o_m[:, None] * K + o_k[None, :])
    b_b = tl.load(b_ptr + o_k[:, None] * N + o_n[None, :])
    o_out = o_m[:, None] * N + o_n[None, :]
    if b_b.dtype == tl.float32:
        split = dot_f32(b_a, b_b, "tf32x3", DOT_F32)
    else:
        a_hi, a_lo = half_parts(b_a, b_b.dtype)
        split = dot_f32(a_hi, b_b, "ieee", DOT_F32) + dot_f32(a_lo, b_b, "ieee", DOT_F32)
    tl.store(split_ptr + o_out, split)
    a_hi, a_lo = factor_parts(b_a, b_b.dtype)
    tl.store(parts_ptr + o_out, dot_parts(a_hi, a_lo, b_b, DOT_F32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_dot_parts_of_factor_parts_is_the_split_product(dtype):
    """``dot_parts`` of ``factor_parts`` (the logits pass's V_r and ds_r, split ahead) against the
    products that split the float32 factor themselves (``dot_f32`` at 3xTF32, the two half
    products of ``half_parts``): the same products summed in the same order, so equal bit for bit,
    as a GPU runs them (float32: the interpreter runs the 3xTF32 split's arithmetic with
    ``DOT_F32`` off) and as the interpreter runs the kernels (``DOT_F32``); and within a float32
    product's bound of the float64 one, ``(2^-14 + k 2^-24) |a| @ |b|`` (the coarsest split,
    bfloat16's, 2^-15 of a term)."""
    m, n, k = 16, 16, 32
    a = torch.randn(m, k) * torch.exp2(torch.randint(-8, 9, (m, 1)).float())
    b = torch.randn(k, n).to(dtype)
    ref = a.double() @ b.double()
    bound = (2.0**-14 + k * 2.0**-24) * (a.double().abs() @ b.double().abs())
    # DOT_F32 stands for the interpreter: on a GPU it would make dot_f32 Triton's own 3xTF32 there
    # (float32) and dot_parts an IEEE product, not comparable bit for bit
    modes = {"cpu": [True, False] if dtype == torch.float32 else [True],
             "cuda": [True] if dtype != torch.float32 else [False]}[KERNEL_DEVICE]
    for dot_f32_mode in modes:
        split = torch.full((m, n), float("nan"), device=KERNEL_DEVICE)
        parts = torch.full_like(split, float("nan"))
        _dot_parts_kernel[(1,)](a.to(KERNEL_DEVICE), b.to(KERNEL_DEVICE), split, parts, M=m, N=n, K=k,
                                DOT_F32=dot_f32_mode)
        assert torch.equal(parts.cpu().view(torch.int32), split.cpu().view(torch.int32)), dot_f32_mode
        assert ((parts.cpu().double() - ref).abs() <= bound).all(), dot_f32_mode


@triton.jit
def _bfloat16_nearest_kernel(x_ptr, out_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(out_ptr + o, bfloat16_nearest(tl.load(x_ptr + o)))


def test_bfloat16_nearest_rounds_to_nearest_even():
    """``bfloat16_nearest`` (the interpreter's emulation of ``half_products`` rounds with it) against
    torch's conversion, which rounds to nearest even, bit for bit: random magnitudes, exact ties
    and their neighbours of both parities, values beyond the largest finite one, infinities, NaN
    (payloads high and low only), zeros of both signs."""
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7F8000, 0x7F7FFFFF, 0x00008000,
                         0x00018000, 0x7F800000, 0x7FC00000, 0x7FFFFFFF, -1, 0x7F800001, 0xFF800001 - 2**32,
                         0x80000000, 0xBF808000 - 2**32],
                        dtype=torch.int64)
    special = ties.to(torch.int32).view(torch.float32)
    x = torch.cat([_wide_range(4096 - len(special), octaves=100).flatten(), special])
    out = torch.full(x.shape, float("nan"), dtype=torch.bfloat16, device=KERNEL_DEVICE)
    _bfloat16_nearest_kernel[(1,)](x.to(KERNEL_DEVICE), out, N=x.numel())
    out, ref = out.cpu(), x.to(torch.bfloat16)
    assert torch.equal(out.isnan(), ref.isnan())
    number = ~ref.isnan()
    assert torch.equal(out[number].view(torch.int16), ref[number].view(torch.int16))


@triton.jit
def _half_products_kernel(c_ptr, u_ptr, nhi_ptr, lo_ptr, hi_ptr, lo2_ptr, N: tl.constexpr, EMULATE: tl.constexpr):
    o = tl.arange(0, N)
    b_nhi, b_hi, b_lo = coefficient_parts(tl.load(c_ptr + o))
    b_u = tl.load(u_ptr + o)
    b_xnhi, b_xlo = half_products(b_nhi, b_hi, b_lo, b_u, EMULATE)
    tl.store(nhi_ptr + o, b_xnhi)
    tl.store(lo_ptr + o, b_xlo)
    # -hi as the coupled sums form it: hi's sign bits flipped
    b_xhi, b_xlo = half_product_parts(_negated(b_hi, EMULATE), b_hi, b_lo, b_u, EMULATE)
    tl.store(hi_ptr + o, b_xhi)
    tl.store(lo2_ptr + o, b_xlo)


def test_half_products_split_c_u_into_two_bfloat16_numbers():
    """``half_products``, through which the sums and weight-gradient passes with bfloat16 inputs
    multiply the float32 coefficients (or logit gradients) c by u: -hi is c_hi u rounded to nearest
    even (bit for bit, zeros' signs too), lo the one rounding of c_lo u plus the exact remainder
    c_hi u - hi, and |c u - hi - lo| within 2.5 x 2^-15 |c u| (3.5 x 2^-15 under the interpreter,
    whose lo of c is truncated: ``half_parts``); far below a single rounding of c u. On a GPU this
    runs the packed PTX arithmetic, under the interpreter its emulation (``EMULATE``), rounded by
    ``bfloat16_nearest`` as a GPU rounds. ``half_product_parts`` (the bfloat16 forward's coupled
    sums) returns the same two numbers, hi with its own sign: hi is exactly -(-hi), bits and
    zeros' signs too, and lo is lo."""
    emulate, n, bf16 = KERNEL_DEVICE == "cpu", 4096, torch.bfloat16
    bound = (3.5 if emulate else 2.5) * 2.0**-15
    c, u = _wide_range(n, octaves=40).flatten(), _wide_range(n, octaves=40).flatten().to(bf16)
    special_c = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0 + 2.0**-20, 0.1, -0.3, 0.5])
    special_u = torch.tensor([1.0, 3.0, 0.0, -0.0, -1.5, 0.1, 7.0, -0.3])
    c[: len(special_c)], u[: len(special_u)] = special_c, special_u.to(bf16)
    nhi = torch.full((n,), float("nan"), dtype=bf16, device=KERNEL_DEVICE)
    lo, hi_parts, lo_parts = (torch.full_like(nhi, float("nan")) for _ in range(3))
    _half_products_kernel[(1,)](c.to(KERNEL_DEVICE), u.to(KERNEL_DEVICE), nhi, lo, hi_parts, lo_parts, N=n,
                                EMULATE=emulate)
    # the sign bit flipped: -(-0) is +0 and -(+0) is -0
    assert torch.equal(hi_parts.cpu().view(torch.int16), nhi.cpu().view(torch.int16) ^ -32768)
    assert torch.equal(lo_parts.cpu().view(torch.int16), lo.cpu().view(torch.int16))
    hi_c = torch.full_like(nhi, float("nan"))
    lo_c = torch.full_like(nhi, float("nan"))
    _parts_kernel[(1,)](c.to(KERNEL_DEVICE), hi_c, lo_c, N=n, FACTOR=False)  # c's parts as coefficient_parts takes them
    nhi, lo, hi_c, lo_c = nhi.cpu(), lo.cpu(), hi_c.cpu(), lo_c.cpu()
    product = hi_c.double() * u.double()  # exact: two 8-bit significands
    assert torch.equal(nhi.view(torch.int16), (-product).to(bf16).view(torch.int16)), "-c_hi u rounded to nearest"
    # lo, bit for bit (every product here is far above bfloat16's subnormals: the remainder is exact)
    low = lo_c.double() * u.double() + (product + nhi.double())
    expected = low.float().to(bf16) if emulate else low.to(bf16)  # emulated: summed in float32, then rounded
    assert torch.equal(lo.view(torch.int16), expected.view(torch.int16))
    exact = c.double() * u.double()
    error = (exact + nhi.double() - lo.double()).abs()
    assert (error <= bound * exact.abs()).all(), (error / exact.abs()).max()
    single = (exact - exact.to(bf16).double()).abs()
    assert error.sum() < 2.0**-5 * single.sum()


@pytest.mark.parametrize("shape", [(37, 10, 16, 8), (2, 128, 64, 16)], ids=layer_id)
def test_training_step_saves_nothing_of_u_hat_size(shape):
    """The memory claim, counted exactly on CPU tensors: a training step of the fused layer keeps
    u, the weight and per-iteration [B, N_out, D] sums, and no tensor of u_hat's size
    (B x N_in x N_out x D), which the unfused and eager paths save; up to the largest capsules
    the layer is specified for."""
    (n_in, n_out, d, d_in), batch, iterations = shape, 4, 3
    u, w = layer_inputs(batch, n_in, n_out, d, d_in)
    u.requires_grad_()
    w.requires_grad_()
    u_hat_bytes = batch * n_in * n_out * d * 4
    paths = {
        "fused": lambda: ct.capsule_routing(u, w, iterations, backend="triton"),
        "unfused": lambda: ct.capsule_routing(u, w, iterations, backend="triton", fused=False),
        "eager": lambda: ct.capsule_routing(u, w, iterations, backend="torch"),
    }
    inputs = {u.untyped_storage().data_ptr(), w.untyped_storage().data_ptr()}
    saved = {name: saved_storages(fn) for name, fn in paths.items()}
    beyond_inputs = {name: [n for ptr, n in storages.items() if ptr not in inputs] for name, storages in saved.items()}
    state = iterations * batch * n_out * d * 4  # s_r and V_r, float32, one tensor each
    assert sum(saved["fused"].values()) == u.numel() * 4 + w.numel() * 4 + 2 * state
    assert sorted(beyond_inputs["fused"]) == [state, state]
    assert max(beyond_inputs["unfused"]) >= u_hat_bytes and max(beyond_inputs["eager"]) >= u_hat_bytes


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_fused_layer(dtype):
    u, w = (t.cuda().requires_grad_() for t in layer_inputs(5, 37, 10, 16, 8, dtype=dtype))
    torch.library.opcheck(ops.fused_layer_fwd, (u, w, 3, True, "ieee", FusedTuning().as_list()))


@requires_cuda
@pytest.mark.cuda
def test_compiled_fused_layer_matches_eager():
    torch._dynamo.reset()
    u, w = (t.cuda().requires_grad_() for t in layer_inputs(64, 1152, 10, 16, 8))
    g = torch.randn(64, 10, 16, device="cuda")

    def fn(a, b):
        return ct.capsule_routing(a, b, 3, backend="triton")

    eager = fn(u, w)
    compiled = torch.compile(fn, fullgraph=True)(u, w)
    assert torch.equal(eager, compiled)
    assert all(
        torch.equal(a, b)
        for a, b in zip(torch.autograd.grad(eager, (u, w), g), torch.autograd.grad(compiled, (u, w), g), strict=True)
    )


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
        return ct.capsule_routing(u, w, r, grad_through_routing=grad_through_routing, backend="torch")

    def loop(u, w):
        return naive_routing(naive_predictions(u, w), r, grad_through_routing)

    assert rel_err(ours(u, weight), loop(u, weight)) < F64_TOL
    for g_ours, g_loop in zip(grads(ours, [u, weight], upstream), grads(loop, [u, weight], upstream), strict=True):
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
