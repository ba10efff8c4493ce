"""Bad input raises the documented ValueError/TypeError naming the argument (DESIGN.md section 2);
edge cases that are valid (empty batch, non-contiguous input) give the right result."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from _helpers import rel_err

import capstriton as ct


def u_hat(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*(shape or (2, 7, 3, 5)), dtype=dtype, device=device)


U = torch.randn(2, 7, 4)
W = torch.randn(7, 3, 5, 4)

# (id, call, exception, pattern the message must contain)
BAD_CALLS = [
    (
        "routing-rank",
        lambda: ct.dynamic_routing(u_hat(2, 7, 15)),
        ValueError,
        r"u_hat must have 4 dimensions \[B, N_in, N_out, D\]",
    ),
    ("routing-empty-caps", lambda: ct.dynamic_routing(u_hat(2, 0, 3, 5)), ValueError, "u_hat must have non-empty"),
    (
        "routing-int",
        lambda: ct.dynamic_routing(torch.ones(2, 7, 3, 5, dtype=torch.int64)),
        TypeError,
        "u_hat must be a floating tensor",
    ),
    (
        "routing-bool",
        lambda: ct.dynamic_routing(torch.ones(2, 7, 3, 5, dtype=torch.bool)),
        TypeError,
        "u_hat must be a floating",
    ),
    ("routing-not-tensor", lambda: ct.dynamic_routing([[1.0]]), TypeError, "u_hat must be a torch.Tensor"),
    ("iterations-0", lambda: ct.dynamic_routing(u_hat(), 0), ValueError, "iterations must be >= 1"),
    ("iterations-negative", lambda: ct.capsule_routing(U, W, -2), ValueError, "iterations must be >= 1"),
    ("iterations-float", lambda: ct.dynamic_routing(u_hat(), 1.5), TypeError, "iterations must be an int"),
    ("iterations-bool", lambda: ct.dynamic_routing(u_hat(), True), TypeError, "iterations must be an int"),
    ("backend-unknown", lambda: ct.dynamic_routing(u_hat(), backend="cuda"), ValueError, "backend must be one of"),
    ("backend-none", lambda: ct.squash(U, backend=None), ValueError, "backend must be one of"),
    (
        "triton-float64",
        lambda: ct.dynamic_routing(u_hat(dtype=torch.float64), backend="triton"),
        TypeError,
        "backend='triton' supports float16, bfloat16 and float32",
    ),
    ("triton-float64-squash", lambda: ct.squash(U.double(), backend="triton"), TypeError, "backend='triton' supports"),
    (
        "triton-meta-device",
        lambda: ct.dynamic_routing(u_hat(device="meta"), backend="triton"),
        ValueError,
        "backend='triton' cannot run here.*meta",
    ),
    ("u-rank", lambda: ct.capsule_routing(U[0], W), ValueError, r"u must have 3 dimensions \[B, N_in, D_in\]"),
    (
        "weight-rank",
        lambda: ct.capsule_routing(U, W[0]),
        ValueError,
        r"weight must have 4 dimensions \[N_in, N_out, D_out, D_in\]",
    ),
    (
        "n-in-mismatch",
        lambda: ct.capsule_routing(U[:, :6], W),
        ValueError,
        r"u \[B, N_in, D_in\] and weight .* disagree.*N_in and D_in",
    ),
    ("d-in-mismatch", lambda: ct.capsule_routing(U[..., :3], W), ValueError, "N_in and D_in must match"),
    ("weight-empty", lambda: ct.capsule_routing(U, W[:, :0]), ValueError, "weight must have non-empty"),
    (
        "device-mismatch",
        lambda: ct.capsule_routing(U, W.to("meta")),
        ValueError,
        "u and weight must be on the same device",
    ),
    ("dtype-mismatch", lambda: ct.capsule_routing(U, W.double()), TypeError, "u and weight must have the same dtype"),
    ("weight-int", lambda: ct.capsule_routing(U, W.int()), TypeError, "weight must be a floating tensor"),
    ("u-int", lambda: ct.capsule_routing(U.long(), W), TypeError, "u must be a floating tensor"),
    ("squash-scalar", lambda: ct.squash(torch.tensor(1.0)), ValueError, "s must have at least 1 dimension"),
    ("squash-dim-range", lambda: ct.squash(U, dim=3), ValueError, r"dim must be an int in \[-3, 2\]"),
    ("squash-dim-bool", lambda: ct.squash(U, dim=True), ValueError, "dim must be an int"),
    ("squash-empty-dim", lambda: ct.squash(torch.empty(3, 0)), ValueError, "s must have a non-empty capsule dimension"),
    ("squash-int", lambda: ct.squash(torch.ones(3, 4, dtype=torch.int32)), TypeError, "s must be a floating tensor"),
    ("esquash-dim-range", lambda: ct.efficient_squash(U, dim=-4), ValueError, r"dim must be an int in \[-3, 2\]"),
    ("esquash-scalar", lambda: ct.efficient_squash(torch.tensor(2.0)), ValueError, "s must have at least 1"),
    (
        "esquash-int",
        lambda: ct.efficient_squash(torch.ones(3, 4, dtype=torch.int64)),
        TypeError,
        "s must be a floating",
    ),
    (
        "attention-rank",
        lambda: ct.self_attention_routing(u_hat(2, 7, 15)),
        ValueError,
        r"u_hat must have 4 dimensions \[B, N_in, N_out, D\]",
    ),
    (
        "attention-empty-caps",
        lambda: ct.self_attention_routing(u_hat(2, 7, 0, 5)),
        ValueError,
        "u_hat must have non-empty",
    ),
    (
        "attention-bias-shape",
        lambda: ct.self_attention_routing(u_hat(), torch.zeros(3, 7)),
        ValueError,
        r"bias must have shape \[N_in, N_out\] = \[7, 3\], got \(3, 7\)",
    ),
    (
        "attention-bias-rank",
        lambda: ct.self_attention_routing(u_hat(), torch.zeros(7)),
        ValueError,
        r"bias must have 2 dimensions \[N_in, N_out\]",
    ),
    (
        "attention-bias-dtype",
        lambda: ct.self_attention_routing(u_hat(), torch.zeros(7, 3, dtype=torch.float64)),
        TypeError,
        "bias and u_hat must have the same dtype",
    ),
    (
        "attention-bias-device",
        lambda: ct.self_attention_capsule_routing(U, W, torch.zeros(7, 3, device="meta")),
        ValueError,
        "bias and u must be on the same device",
    ),
    (
        "attention-bias-list",
        lambda: ct.self_attention_routing(u_hat(), [[0.0]]),
        TypeError,
        "bias must be a torch.Tensor",
    ),
    (
        "attention-layer-mismatch",
        lambda: ct.self_attention_capsule_routing(U[..., :3], W),
        ValueError,
        "N_in and D_in must match",
    ),
    (
        "attention-layer-bias-shape",
        lambda: ct.self_attention_capsule_routing(U, W, torch.zeros(7, 4)),
        ValueError,
        r"bias must have shape \[N_in, N_out\] = \[7, 3\]",
    ),
    (
        "attention-triton-float64",
        lambda: ct.self_attention_routing(u_hat(dtype=torch.float64), backend="triton"),
        TypeError,
        "backend='triton' supports",
    ),
    (
        "margin-rank",
        lambda: ct.margin_loss(torch.rand(10), torch.tensor(1)),
        ValueError,
        r"lengths must have 2 dimensions \[B, K\]",
    ),
    (
        "margin-index-shape",
        lambda: ct.margin_loss(torch.rand(2, 10), torch.tensor([[1], [2]])),
        ValueError,
        r"an integer target must have shape \[B\]",
    ),
    (
        "margin-float-shape",
        lambda: ct.margin_loss(torch.rand(2, 10), torch.rand(2, 9)),
        ValueError,
        "a float target must have the shape of lengths",
    ),
    (
        "margin-bool-target",
        lambda: ct.margin_loss(torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool)),
        TypeError,
        "target must hold class indices",
    ),
    (
        "margin-target-device",
        lambda: ct.margin_loss(torch.rand(2, 3), torch.tensor([0, 1], device="meta")),
        ValueError,
        "lengths and target must be on the same device",
    ),
    (
        "margin-target-list",
        lambda: ct.margin_loss(torch.rand(2, 3), [0, 1]),
        TypeError,
        "target must be a torch.Tensor",
    ),
    (
        "reconstruction-sizes",
        lambda: ct.reconstruction_loss(torch.rand(2, 784), torch.rand(2, 1, 27, 27)),
        ValueError,
        "reconstruction .* and images .* must hold",
    ),
    ("module-backend", lambda: ct.nn.Squash(backend="gpu"), ValueError, "backend must be one of"),
    ("module-size", lambda: ct.nn.RoutingCapsules(in_caps=0), ValueError, "in_caps must be >= 1"),
    ("lengths-int", lambda: ct.nn.capsule_lengths(torch.ones(2, 3, dtype=torch.long)), TypeError,
     "v must be a floating tensor"),
    ("lengths-scalar", lambda: ct.nn.capsule_lengths(torch.tensor(1.0)), ValueError, "v must have at least 1"),
    ("module-size-type", lambda: ct.nn.RoutingCapsules(out_dim=16.0), TypeError, "out_dim must be an int"),
    ("module-iterations", lambda: ct.nn.RoutingCapsules(iterations=0), ValueError, "iterations must be >= 1"),
    (
        "module-input-shape",
        lambda: ct.nn.RoutingCapsules(7, 4, 3, 5)(torch.randn(2, 7, 5)),
        ValueError,
        r"u must have shape \[B, in_caps=7, in_dim=4\]",
    ),
    (
        "primary-rank",
        lambda: ct.nn.PrimaryCapsules(2, 3, 4, 3)(torch.randn(2, 7, 7)),
        ValueError,
        r"x must have 4 dimensions \[B, in_channels, H, W\]",
    ),
    (
        "decoder-shape",
        lambda: ct.nn.CapsuleDecoder()(torch.randn(2, 10, 8)),
        ValueError,
        r"v must have shape \[B, num_caps=10, caps_dim=16\]",
    ),
    (
        "decoder-target",
        lambda: ct.nn.CapsuleDecoder()(torch.randn(2, 10, 16), torch.rand(2, 10)),
        ValueError,
        "target must hold class indices",
    ),
    (
        "decoder-bool-target",
        lambda: ct.nn.CapsuleDecoder()(torch.randn(2, 10, 16), torch.ones(2, dtype=torch.bool)),
        ValueError,
        "target must hold class indices",
    ),
    (
        "decoder-mask",
        lambda: ct.nn.CapsuleDecoder()(torch.randn(2, 10, 16), mask=torch.ones(2, 9)),
        ValueError,
        r"mask must have shape \[B, num_caps\]",
    ),
    (
        "capsnet-image",
        lambda: ct.models.CapsNet(conv_channels=8, primary_types=2)(torch.rand(2, 1, 32, 32)),
        ValueError,
        r"x must have shape \[B, 1, 28, 28\]",
    ),
    ("capsnet-too-small", lambda: ct.models.CapsNet(image_size=16), ValueError, "image_size=16 is too small"),
    # found by break-testing (issue 11): each was accepted or failed inside PyTorch
    (
        "margin-label-too-large",
        lambda: ct.margin_loss(torch.rand(2, 10), torch.tensor([3, 10])),
        ValueError,
        r"target must hold class indices in \[0, 10\), got values from 3 to 10",
    ),
    (
        "margin-label-negative",
        lambda: ct.nn.MarginLoss()(torch.rand(2, 10), torch.tensor([-1, 2])),
        ValueError,
        r"target must hold class indices in \[0, 10\)",
    ),
    (
        "capsnet-label-out-of-range",
        lambda: ct.models.CapsNet(conv_channels=8, primary_types=2)(torch.rand(2, 1, 28, 28), torch.tensor([1, 11])),
        ValueError,
        r"target must hold class indices in \[0, 10\)",
    ),
    (
        "decoder-target-list",
        lambda: ct.nn.CapsuleDecoder()(torch.randn(2, 10, 16), [1, 2]),
        TypeError,
        "target must be a torch.Tensor or None",
    ),
    (
        "decoder-mask-list",
        lambda: ct.nn.CapsuleDecoder()(torch.randn(2, 10, 16), mask=[[1.0] * 10] * 2),
        TypeError,
        "mask must be a torch.Tensor or None",
    ),
    (
        "reconstruction-scalar",
        lambda: ct.reconstruction_loss(torch.tensor(0.5), torch.tensor(0.5)),
        ValueError,
        r"reconstruction must have a batch dimension and pixels \[B, ...\]",
    ),
    ("decoder-hidden-zero", lambda: ct.nn.CapsuleDecoder(hidden=(0,)), ValueError, r"hidden\[0\] must be >= 1"),
    (
        "capsnet-decoder-hidden-zero",
        lambda: ct.models.CapsNet(conv_channels=8, primary_types=2, decoder_hidden=(512, 0)),
        ValueError,
        r"hidden\[1\] must be >= 1",
    ),
    ("margin-negative-lam", lambda: ct.nn.MarginLoss(lam=-0.5), ValueError, "lam must be a finite number >= 0"),
    (
        "margin-fn-negative-lam",
        lambda: ct.margin_loss(torch.rand(2, 10), torch.tensor([1, 2]), lam=-1.0),
        ValueError,
        "lam must be a finite number >= 0",
    ),
    ("margin-nan-margin", lambda: ct.nn.MarginLoss(m_pos=float("nan")), ValueError, "m_pos must be a finite number"),
    (
        "loss-negative-reconstruction-weight",
        lambda: ct.nn.CapsuleLoss(reconstruction_weight=-0.0005),
        ValueError,
        "reconstruction_weight must be a finite number >= 0",
    ),
    (
        "loss-images-without-reconstruction",
        lambda: ct.nn.CapsuleLoss()(torch.rand(2, 10), torch.tensor([1, 2]), images=torch.rand(2, 1, 28, 28)),
        ValueError,
        "reconstruction and images must be given together",
    ),
    (
        "loss-reconstruction-without-images",
        lambda: ct.nn.CapsuleLoss()(torch.rand(2, 10), torch.tensor([1, 2]), torch.rand(2, 784)),
        ValueError,
        "reconstruction and images must be given together",
    ),
    # sparse tensors: refused by name on either backend (the torch backend ran a sparse u silently)
    ("layer-sparse-u", lambda: ct.capsule_routing(U.to_sparse(), W, backend="torch"), TypeError,
     "u must be a dense"),
    ("layer-sparse-weight", lambda: ct.capsule_routing(U, W.to_sparse()), TypeError, "weight must be a dense"),
    ("squash-sparse", lambda: ct.squash(U.to_sparse(), backend="triton"), TypeError, "s must be a dense"),
    ("routing-module-init-std-inf", lambda: ct.nn.RoutingCapsules(7, 4, 3, 5, init_std=float("inf")), ValueError,
     "init_std must be a finite number >= 0"),
    ("routing-module-init-std-negative", lambda: ct.nn.RoutingCapsules(7, 4, 3, 5, init_std=-0.1), ValueError,
     "init_std must be a finite number >= 0"),
    ("routing-module-init-std-str", lambda: ct.nn.RoutingCapsules(7, 4, 3, 5, init_std="0.1"), TypeError,
     "init_std must be a number"),
    ("routing-module-init-std-bool", lambda: ct.nn.RoutingCapsules(7, 4, 3, 5, init_std=True), TypeError,
     "init_std must be a number"),
    # break-testing, tenth session: each of these was accepted, or failed without naming the argument
    ("capsnet-return-lengths-str", lambda: ct.models.CapsNet(conv_channels=8, primary_types=2, return_lengths="no"),
     TypeError, "return_lengths must be a bool"),
    ("efficient-return-lengths-int", lambda: ct.models.EfficientCapsNet(return_lengths=1), TypeError,
     "return_lengths must be a bool"),
    ("capsnet-primary-kernel-str", lambda: ct.models.CapsNet(primary_kernel="9"), TypeError,
     "primary_kernel must be an int"),
    ("capsnet-decoder-hidden-int", lambda: ct.models.CapsNet(conv_channels=8, primary_types=2, decoder_hidden=512),
     TypeError, "decoder_hidden must be a tuple of layer sizes or None"),
    ("efficient-channels-int", lambda: ct.models.EfficientCapsNet(channels=32), TypeError,
     "channels must be a tuple of the 4 convolutions' widths"),
    ("squash-module-dim-str", lambda: ct.nn.Squash(dim="a"), TypeError, "dim must be an int"),
    ("squash-module-dim-float", lambda: ct.nn.Squash(dim=1.5), TypeError, "dim must be an int"),
    ("margin-bool-margin", lambda: ct.nn.MarginLoss(m_pos=True), TypeError, "m_pos must be a number"),
    ("margin-str-margin", lambda: ct.margin_loss(torch.rand(2, 3), torch.tensor([0, 1]), m_neg="0.1"), TypeError,
     "m_neg must be a number"),
    ("margin-inf-margin", lambda: ct.nn.MarginLoss(m_neg=float("-inf")), ValueError, "m_neg must be a finite number"),
    ("primary-wrong-channels", lambda: ct.nn.PrimaryCapsules(3, 2, 4, 3, 2)(torch.randn(2, 5, 7, 7)), ValueError,
     r"x must have in_channels=3 channels \[B, 3, H, W\], got shape \(2, 5, 7, 7\)"),
    ("efficient-primary-wrong-channels", lambda: ct.nn.EfficientPrimaryCapsules(8, 4, 3)(torch.randn(2, 4, 5, 5)),
     ValueError, "x must have in_channels=8 channels"),
    ("loss-batch-mismatch", lambda: ct.nn.CapsuleLoss()(torch.rand(4, 3), torch.tensor([0, 1, 2, 0]),
                                                        torch.rand(3, 16), torch.rand(3, 1, 4, 4)),
     ValueError, r"reconstruction \(3, 16\) and lengths \(4, 3\) must hold the same number of examples"),
    ("reconstruction-devices", lambda: ct.reconstruction_loss(torch.rand(2, 4, device="meta"), torch.rand(2, 4)),
     ValueError, "reconstruction and images must be on the same device"),
    ("decoder-mask-device", lambda: ct.nn.CapsuleDecoder(3, 5, (7,), 9)(torch.randn(2, 3, 5),
                                                                       mask=torch.ones(2, 3, device="meta")),
     ValueError, "v and mask must be on the same device"),
    ("decoder-target-device", lambda: ct.nn.CapsuleDecoder(3, 5, (7,), 9)(torch.randn(2, 3, 5),
                                                                         torch.zeros(2, 3, device="meta").long()),
     ValueError, "v and target must be on the same device"),
]


@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_naming_the_argument(call, error, pattern, monkeypatch):
    # As on a CPU-only machine (conftest): the triton rows then fail on dtype or device, not on a
    # missing interpreter, also on a GPU machine, whose kernels are not the interpreter's.
    from capstriton.ops import _launch

    monkeypatch.setattr(_launch, "INTERPRETED", True)
    monkeypatch.setattr(_launch, "LIBRARY_INTERPRETED", True)
    with pytest.raises(error, match=pattern):
        call()


@pytest.mark.parametrize("value", [None, "0", ""], ids=["unset", "zero", "empty"])
def test_triton_on_cpu_without_interpreter_raises(monkeypatch, value):
    # Whether the kernels are the interpreter's is decided when they are imported (conftest sets
    # TRITON_INTERPRET=1 first on CPU-only machines): here they are made GPU kernels.
    from capstriton.ops import _launch

    monkeypatch.setattr(_launch, "INTERPRETED", False)
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    with pytest.raises(ValueError, match="backend='triton' cannot run here.*TRITON_INTERPRET=1"):
        ct.dynamic_routing(u_hat(), backend="triton")
    with pytest.raises(ValueError, match="backend='triton' cannot run here"):
        ct.capsule_routing(U, W, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' cannot run here"):
        ct.squash(U, backend="triton")
    # "auto" never raises for it: CPU tensors take the reference.
    x = u_hat()
    assert torch.equal(ct.dynamic_routing(x, backend="auto"), ct.dynamic_routing(x, backend="torch"))


_LATE_INTERPRETER = """
import os, sys, torch
if sys.argv[1] == "between":  # set after triton's import, before capstriton's
    import triton
    os.environ["TRITON_INTERPRET"] = "1"
import capstriton as ct, capstriton.ops  # the ops import the kernels
x = torch.randn(3, 5)
if os.environ.get("TRITON_INTERPRET") and sys.argv[1] != "between":  # the kernels are the interpreter's
    print(ct.squash(x, backend="triton").sub(ct.squash(x, backend="torch")).abs().max().item())
else:
    os.environ["TRITON_INTERPRET"] = "1"  # too late: the kernels (or triton's own functions) were made for a GPU
    try:
        ct.squash(x, backend="triton")
    except ValueError as e:
        print(e)
"""


@pytest.mark.parametrize("value", [None, "true", "between"], ids=["set-after-import", "true", "set-between-imports"])
def test_the_interpreter_is_what_the_kernels_were_made_for(value):
    """Break-testing (the spec audit): the check read TRITON_INTERPRET at call time, so a variable
    set after the import passed it and failed inside triton ("0 active drivers"), and "true",
    which triton honours, was refused. It now asks what triton.jit made of the kernels, and of
    triton's own functions: a variable set after ``import triton`` but before ``import capstriton``
    made the kernels the interpreter's around a compiled library, and the call failed inside the
    interpreter (a later break-testing round)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if value == "true":
        env["TRITON_INTERPRET"] = value
    proc = subprocess.run([sys.executable, "-c", _LATE_INTERPRETER, str(value)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if value is None:
        message = "TRITON_INTERPRET is set, but capstriton's kernels were made for a GPU: set it before triton"
        assert message in proc.stdout
    elif value == "between":
        assert "TRITON_INTERPRET was set after triton was imported (and before capstriton was)" in proc.stdout
    else:
        assert float(proc.stdout.split()[-1]) <= 1e-6


_WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # as if not installed: importing it fails
import torch
import capstriton as ct
from capstriton import data, train  # noqa: F401
x = torch.randn(2, 12, 3, 4)
assert torch.equal(ct.dynamic_routing(x, backend="auto"), ct.dynamic_routing(x, backend="torch"))
ct.models.CapsNet(conv_channels=4, primary_types=2)(torch.rand(2, 1, 28, 28))
try:
    ct.squash(x, backend="triton")
except ValueError as e:
    print(e)
"""


def test_numpy_integers_are_sizes_and_dims():
    """NumPy integers (what indexing NumPy arrays and configs read with NumPy give) count as ints
    wherever an int is asked for, as ``operator.index`` takes them; a bool, a float and a tensor do
    not (break-testing: iterations, module sizes and dim refused np.int64, and dim's message named a
    range its value was in)."""
    x = u_hat()
    assert torch.equal(ct.dynamic_routing(x, np.int64(2), backend="torch"), ct.dynamic_routing(x, 2, backend="torch"))
    assert torch.equal(ct.squash(U, dim=np.int32(1), backend="torch"), ct.squash(U, dim=1, backend="torch"))
    layer = ct.nn.RoutingCapsules(np.int64(7), np.int16(4), np.uint8(3), np.int64(5), iterations=np.int64(2))
    assert (layer.in_caps, layer.in_dim, layer.out_caps, layer.out_dim, layer.iterations) == (7, 4, 3, 5, 2)
    assert all(type(n) is int for n in (layer.in_caps, layer.iterations, ct.nn.Squash(np.int64(0)).dim))
    for bad in (2.0, True, torch.tensor(2)):
        with pytest.raises(TypeError, match=f"iterations must be an int, got {type(bad).__name__}"):
            ct.dynamic_routing(x, bad)
    with pytest.raises(ValueError, match=r"dim must be an int in \[-3, 2\].*got 1.0 \(a float\)"):
        ct.squash(U, dim=1.0)


def test_the_torch_backend_runs_without_triton():
    """triton is an optional import: without it capstriton, its models and the training CLI's
    modules import, backend="torch" and "auto" run, and "triton" says why it cannot."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backend='triton' cannot run here: the triton package is not installed" in proc.stdout


def test_auto_resolves_to_torch_for_cpu_tensors():
    from capstriton._checks import resolve_backend

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert resolve_backend("auto", torch.empty(1, dtype=dtype)) == "torch"
    assert resolve_backend("torch", torch.empty(1, device="meta")) == "torch"


# --- valid edge cases ---------------------------------------------------------------------------


@pytest.mark.parametrize("grad_through_routing", [True, False], ids=["grad-all", "grad-last"])
def test_empty_batch_returns_empty_result(grad_through_routing):
    kw = dict(grad_through_routing=grad_through_routing, backend="torch")
    x = torch.randn(0, 7, 3, 5, requires_grad=True)
    v = ct.dynamic_routing(x, 3, **kw)
    assert v.shape == (0, 3, 5)
    v.sum().backward()
    assert x.grad.shape == x.shape

    u = torch.randn(0, 7, 4)
    assert ct.capsule_routing(u, W, **kw).shape == (0, 3, 5)
    assert ct.squash(torch.randn(0, 8)).shape == (0, 8)
    lengths, reconstruction = ct.models.CapsNet(conv_channels=8, primary_types=2, return_lengths=True)(
        torch.rand(0, 1, 28, 28)
    )
    assert lengths.shape == (0, 10) and reconstruction.shape == (0, 784)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_efficient_capsnet_of_an_empty_batch_is_empty(training):
    """Its primary capsules reshaped to [B, -1, caps_dim], which an empty batch cannot infer (a
    RuntimeError, found by break-testing); now counted: the model and the module give empty results
    of the right shapes, and a backward through them."""
    model = ct.models.EfficientCapsNet().train(training)
    x = torch.rand(0, 1, 28, 28, requires_grad=True)
    v, reconstruction = model(x)
    assert v.shape == (0, 10, 16) and reconstruction.shape == (0, 784)
    (v.sum() + reconstruction.sum()).backward()
    assert x.grad.shape == x.shape
    primary = ct.nn.EfficientPrimaryCapsules(8, 4, 3)
    assert primary(torch.rand(0, 8, 5, 5)).shape == (0, 18, 4)
    assert primary(torch.rand(2, 8, 5, 5)).shape == (2, 18, 4)  # 3 x 3 positions x 8 / 4 capsules


def test_tuning_knobs_are_checked_and_tiles_hold_powers_of_two():
    """The ops' launch knobs (bench/tune.py's grids, ``tuning=`` of the ops): a tile of 1000
    elements gave the routing kernels blocks of 3 input capsules, which Triton refused deep in the
    compiler ("Shape element 0 must be a power of 2", found by break-testing); it now holds the
    largest power of two that fits, as the fused layer's tiles already did. Knobs that cannot launch
    are refused by name."""
    from capstriton.ops._passes import FusedTuning, fused_config, rows_per_tile
    from capstriton.ops.dynamic_routing import RoutingTuning, routing_config

    assert [rows_per_tile(t, 256) for t in (1, 255, 256, 511, 512, 1000, 4096, 10**6)] == [1, 1, 1, 1, 2, 2, 16, 64]
    assert rows_per_tile(10**6, 256, cap=8) == 8
    config = routing_config(1152, 10, 16, 64, RoutingTuning(tile=1000, tile_bwd=3000))
    assert (config.fwd.block_i, config.bwd.block_i) == (2, 8)  # 1000 // 256 = 3, 3000 // 256 = 11
    assert routing_config(1152, 10, 16, 64) == routing_config(1152, 10, 16, 64, RoutingTuning(tile=1024))
    assert fused_config(1152, 10, 16, 8, 64, FusedTuning(tile=3000)).block_b == 8  # 3000 // 256 = 11
    for cls, knob, value, error, message in [
        (RoutingTuning, "tile", 0, ValueError, "RoutingTuning.tile must be >= 1, got 0"),
        (RoutingTuning, "tile_bwd", 2.5, TypeError, "RoutingTuning.tile_bwd must be an int, got float"),
        (RoutingTuning, "target_programs", True, TypeError, "RoutingTuning.target_programs must be an int"),
        (RoutingTuning, "num_warps", 3, ValueError, "num_warps must be a power of two from 1 to 32, or None"),
        (FusedTuning, "num_warps", 64, ValueError, "FusedTuning.num_warps must be a power of two"),
        (FusedTuning, "fwd_warps", None, TypeError, "FusedTuning.fwd_warps must be an int, got NoneType"),
        (FusedTuning, "fwd_warps", 6, ValueError, "FusedTuning.fwd_warps must be a power of two from 1 to 32, got 6"),
        (FusedTuning, "groups", -1, ValueError, "FusedTuning.groups must be >= 1"),
    ]:
        with pytest.raises(error, match=re.escape(message)):
            cls(**{knob: value})
    assert RoutingTuning(num_warps=None).num_warps is None and FusedTuning(num_warps=8).num_warps == 8


def test_numpy_margins_are_numbers():
    """NumPy scalars are real numbers (the margin checks refused np.float32 as "not a finite
    number"): the loss with them equals the loss with the same Python floats."""
    import numpy as np

    lengths, target = torch.rand(3, 4), torch.tensor([0, 3, 1])
    module = ct.nn.MarginLoss(np.float32(0.75), np.float64(0.25), np.int64(2))
    assert (module.m_pos, module.m_neg, module.lam) == (0.75, 0.25, 2.0)
    assert "m_pos=0.75, m_neg=0.25, lam=2.0" in repr(module)
    expected = ct.margin_loss(lengths, target, 0.75, 0.25, 2.0)
    assert torch.equal(module(lengths, target), expected)
    assert torch.equal(ct.margin_loss(lengths, target, np.float32(0.75), np.float64(0.25), np.int64(2)), expected)
    assert "reconstruction_weight=0.25" in repr(ct.nn.CapsuleLoss(np.float16(0.25)))


def test_losses_of_an_empty_batch_are_zero():
    """The mean over no examples was NaN, which poisons a training step's gradients."""
    lengths = torch.rand(0, 10, requires_grad=True)
    reconstruction = torch.rand(0, 784, requires_grad=True)
    images = torch.rand(0, 1, 28, 28)
    for target in (torch.zeros(0, dtype=torch.long), torch.zeros(0, 10)):
        assert ct.margin_loss(lengths, target).item() == 0.0
    assert ct.reconstruction_loss(reconstruction, images).item() == 0.0
    loss = ct.nn.CapsuleLoss()(lengths, torch.zeros(0, dtype=torch.long), reconstruction, images)
    loss.backward()
    assert loss.item() == 0.0 and lengths.grad.shape == (0, 10) and reconstruction.grad.shape == (0, 784)


# Float64: the reference may take different summation orders for different strides, a few ulps.
NONCONTIG_TOL = 1e-13


def noncontiguous(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, y.contiguous())`` with ``y`` holding values from ``x`` in a non-contiguous layout."""
    if layout == "transposed":
        y = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "strided":
        y = torch.empty(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)[..., ::2]
        y.copy_(x)
    else:  # stride 0 over the first dimension
        y = x[:1].expand(x.shape)
    assert not y.is_contiguous()
    return y, y.contiguous()


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
def test_noncontiguous_inputs_match_contiguous(layout):
    uh, uh_c = noncontiguous(torch.randn(3, 7, 3, 5, dtype=torch.float64), layout)
    u, u_c = noncontiguous(torch.randn(3, 7, 4, dtype=torch.float64), layout)
    w, w_c = noncontiguous(torch.randn(7, 3, 5, 4, dtype=torch.float64), layout)
    assert rel_err(ct.dynamic_routing(uh), ct.dynamic_routing(uh_c)) < NONCONTIG_TOL
    assert rel_err(ct.squash(uh), ct.squash(uh_c)) < NONCONTIG_TOL
    assert rel_err(ct.capsule_routing(u, w), ct.capsule_routing(u_c, w_c)) < NONCONTIG_TOL
    assert rel_err(ct.capsule_routing(u, w_c), ct.capsule_routing(u_c, w_c)) < NONCONTIG_TOL


def test_noncontiguous_upstream_gradient():
    # out.sum() sends a gradient with stride 0 into backward (DESIGN.md section 4).
    x = torch.randn(3, 7, 3, 5, dtype=torch.float64, requires_grad=True)
    ct.dynamic_routing(x).sum().backward()
    expanded_grad = x.grad.clone()
    x.grad = None
    ct.dynamic_routing(x).backward(torch.ones(3, 3, 5, dtype=torch.float64))
    assert rel_err(expanded_grad, x.grad) < NONCONTIG_TOL


def test_meta_tensors_give_shapes_on_the_torch_backend():
    """Meta tensors (shape inference without data) run the torch backend, "auto" included, and the
    modules moved to meta: outputs of the right shape on meta (autocast, which has no meta
    device, is skipped there)."""
    meta = {"device": "meta"}
    calls = {
        "capsule_routing": lambda: ct.capsule_routing(U.to(**meta), W.to(**meta)),
        "dynamic_routing": lambda: ct.dynamic_routing(u_hat(**meta)),
        "self_attention_routing": lambda: ct.self_attention_routing(u_hat(**meta)),
        "squash": lambda: ct.squash(U.to(**meta)),
        "efficient_squash": lambda: ct.efficient_squash(U.to(**meta)),
        "RoutingCapsules": lambda: ct.nn.RoutingCapsules(7, 4, 3, 5).to(**meta)(U.to(**meta)),
    }
    shapes = {"squash": U.shape, "efficient_squash": U.shape}
    for name, call in calls.items():
        out = call()
        assert out.device.type == "meta", name
        assert out.shape == shapes.get(name, (2, 3, 5)), name


@pytest.mark.parametrize(
    "make, backend",
    [
        pytest.param(lambda: lambda lengths, caps, t: ct.margin_loss(lengths, t), "aot_eager", id="margin_loss"),
        pytest.param(lambda: lambda lengths, caps, t: ct.margin_loss(lengths, t), "inductor",
                     id="margin_loss-inductor"),
        pytest.param(lambda: (lambda loss: lambda lengths, caps, t: loss(lengths, t))(ct.nn.CapsuleLoss()),
                     "aot_eager", id="CapsuleLoss"),
        pytest.param(lambda: (lambda dec: lambda lengths, caps, t: dec(caps, t))(ct.nn.CapsuleDecoder(hidden=(8,))),
                     "aot_eager", id="CapsuleDecoder"),
    ],
)
def test_class_indices_are_checked_under_compile(make, backend):
    """Compiled (fullgraph: no data-dependent branch), the class-index check is an asynchronous
    assertion, as on CUDA; it was skipped, and a label of 10 of 10 classes gave a row an all-zero
    one-hot without a word (break-testing). Good labels still run."""
    torch._dynamo.reset()
    fn = torch.compile(make(), fullgraph=True, backend=backend)  # modules built outside the graph
    caps = torch.randn(4, 10, 16)
    lengths = caps.norm(dim=-1)
    fn(lengths, caps, torch.tensor([1, 2, 3, 9]))
    for bad in ([1, 2, 10, 3], [1, -1, 2, 3]):
        with pytest.raises(RuntimeError, match=r"target must hold class indices in \[0, 10\)"):
            fn(lengths, caps, torch.tensor(bad))
