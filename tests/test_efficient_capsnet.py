"""Efficient-CapsNet's modules and model (``EfficientPrimaryCapsules``, ``SelfAttentionCapsules``,
``models.EfficientCapsNet``): the paper's parameter count, shapes, the primary capsules' grouping,
initialisation, bad input, a learning step, and tracing by ``torch.compile``."""

from __future__ import annotations

import pytest
import torch
from _helpers import KERNEL_TOL, rel_err

import capstriton as ct
from capstriton.models import EfficientCapsNet

SMALL = dict(channels=(8, 8, 8, 16))  # 16 channels of 8D: 2 primary capsules


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_parameter_count_is_the_papers():
    # 161,824 trainable parameters (the paper's count; batch norm's running statistics are buffers)
    assert n_params(EfficientCapsNet(decoder_hidden=None)) == 161_824
    # the decoder 160 -> 512 -> 1024 -> 784 adds 82,432 + 525,312 + 803,600
    assert n_params(EfficientCapsNet()) == 161_824 + 1_411_344


def test_default_shapes_and_layers():
    model = EfficientCapsNet()
    assert model.routing.weight.shape == (16, 10, 16, 8) and model.routing.bias.shape == (16, 10)
    x = torch.rand(3, 1, 28, 28)
    v, reconstruction = model(x)
    assert v.shape == (3, 10, 16) and reconstruction.shape == (3, 784)
    assert ((reconstruction > 0) & (reconstruction < 1)).all()
    assert (ct.nn.capsule_lengths(v) < 1).all()
    model.return_lengths = True
    lengths, _ = model(x)
    assert lengths.shape == (3, 10)
    bare = EfficientCapsNet(decoder_hidden=None)
    assert bare(x)[1] is None


def test_configurable_sizes():
    model = EfficientCapsNet(in_channels=3, image_size=32, channels=(8, 8, 8, 24), primary_dim=4,
                             num_classes=5, out_dim=6, decoder_hidden=(32,))  # fmt: skip
    # 32 -> 28 -> 26 -> 24 -> 11; the depthwise 11x11 kernel leaves 1x1: 24 / 4 = 6 capsules
    assert model.routing.weight.shape == (6, 5, 6, 4)
    v, reconstruction = model(torch.rand(2, 3, 32, 32))
    assert v.shape == (2, 5, 6) and reconstruction.shape == (2, 3 * 32 * 32)


def test_primary_capsules_grouping():
    """Channels last: the capsule at (row, col, group) holds channels group * D .. group * D + D - 1
    of that position, squashed with the efficient squash."""
    layer = ct.nn.EfficientPrimaryCapsules(in_channels=6, caps_dim=2, kernel_size=3).double()
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    out = layer(x)
    y = layer.conv(x)  # [2, 6, 3, 2], depthwise
    assert layer.conv.groups == 6 and out.shape == (2, 3 * 2 * 3, 2) == (2, layer.output_caps(5, 4), 2)
    row, col, group = 2, 1, 1
    index = (row * 2 + col) * 3 + group
    capsule = y[:, group * 2 : group * 2 + 2, row, col]
    assert rel_err(out[:, index], ct.efficient_squash(capsule)) < 1e-12
    # depthwise: channel c sees only input channel c
    x2 = x.clone()
    x2[:, 0] += 1.0
    assert torch.equal(layer(x2)[:, 1:3], out[:, 1:3]) and not torch.equal(layer(x2)[:, 0], out[:, 0])


def test_self_attention_capsules_initialisation_and_function():
    torch.manual_seed(0)
    layer = ct.nn.SelfAttentionCapsules(64, 8, 10, 16)
    std = (2.0 / (10 * 64 * 8)) ** 0.5  # He-normal over the official layer's fan-in
    assert abs(layer.weight.std().item() / std - 1) < 0.02  # 81,920 samples: 0.25% standard error
    assert (layer.bias == 0).all()
    u = torch.randn(3, 64, 8)
    assert torch.equal(layer(u), ct.self_attention_capsule_routing(u, layer.weight, layer.bias))
    no_bias = ct.nn.SelfAttentionCapsules(64, 8, 10, 16, bias=False)
    assert no_bias.bias is None and len(list(no_bias.parameters())) == 1
    assert torch.equal(no_bias(u), ct.self_attention_capsule_routing(u, no_bias.weight))
    assert "in_caps=64" in repr(layer) and "bias=True" in repr(layer)


BAD_MODULES = [
    ("in-caps", lambda: ct.nn.SelfAttentionCapsules(0, 8, 10, 16), ValueError, "in_caps"),
    ("out-dim-float", lambda: ct.nn.SelfAttentionCapsules(16, 8, 10, 1.5), TypeError, "out_dim"),
    ("bias-str", lambda: ct.nn.SelfAttentionCapsules(16, 8, 10, 16, bias="yes"), TypeError, "bias"),
    ("backend", lambda: ct.nn.SelfAttentionCapsules(16, 8, 10, 16, backend="gpu"), ValueError, "backend"),
    ("u-shape", lambda: ct.nn.SelfAttentionCapsules(16, 8, 10, 16)(torch.rand(2, 16, 9)), ValueError,
     r"u must have shape \[B, in_caps=16, in_dim=8\]"),
    ("caps-dim", lambda: ct.nn.EfficientPrimaryCapsules(12, 8), ValueError, "in_channels=12 must be a multiple"),
    ("primary-rank", lambda: ct.nn.EfficientPrimaryCapsules(16, 8)(torch.rand(16, 9, 9)), ValueError, "x must have 4"),
    ("channels-len", lambda: EfficientCapsNet(channels=(8, 8, 8)), ValueError, "channels must give the 4"),
    ("channels-zero", lambda: EfficientCapsNet(channels=(8, 0, 8, 8)), ValueError, r"channels\[1\]"),
    ("image-small", lambda: EfficientCapsNet(image_size=8), ValueError, "image_size=8 is too small"),
    ("x-shape", lambda: EfficientCapsNet()(torch.rand(2, 1, 32, 32)), ValueError,
     r"x must have shape \[B, 1, 28, 28\]"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in BAD_MODULES], ids=[c[0] for c in BAD_MODULES])
def test_bad_arguments_raise_naming_them(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_one_adam_step_lowers_the_loss():
    torch.manual_seed(0)
    model = EfficientCapsNet()
    x = torch.rand(16, 1, 28, 28)
    y = torch.arange(16) % 10
    loss_fn = ct.nn.CapsuleLoss()
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)

    def loss():
        v, reconstruction = model(x, y)
        return loss_fn(ct.nn.capsule_lengths(v), y, reconstruction, x)

    before = loss()
    before.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.routing.weight.grad.abs().sum() > 0 and model.routing.bias.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after < before


def test_empty_batch():
    layer = ct.nn.SelfAttentionCapsules(16, 8, 10, 16)
    u = torch.rand(0, 16, 8, requires_grad=True)
    v = layer(u)
    v.sum().backward()
    assert v.shape == (0, 10, 16) and (layer.weight.grad == 0).all() and (layer.bias.grad == 0).all()


# --- torch.compile --------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_reference_functions_trace_without_graph_breaks(fresh_dynamo):
    """backend="eager" runs Dynamo's tracing only: fullgraph=True raises on any graph break."""
    u_hat = torch.randn(2, 7, 3, 5, requires_grad=True)
    u, w, b = torch.randn(2, 7, 4), torch.randn(7, 3, 5, 4), torch.randn(7, 3)
    routing = torch.compile(ct.self_attention_routing, fullgraph=True, backend="eager")
    layer = torch.compile(ct.self_attention_capsule_routing, fullgraph=True, backend="eager")
    squash = torch.compile(ct.efficient_squash, fullgraph=True, backend="eager")
    assert torch.equal(routing(u_hat, b), ct.self_attention_routing(u_hat, b))
    assert torch.equal(layer(u, w, b), ct.self_attention_capsule_routing(u, w, b))
    assert torch.equal(squash(u_hat), ct.efficient_squash(u_hat))
    routing(u_hat, b).sum().backward()
    assert torch.isfinite(u_hat.grad).all()


def test_training_forward_traces_as_one_graph(fresh_dynamo):
    model = EfficientCapsNet(**SMALL)
    x = torch.rand(2, 1, 28, 28)
    y = torch.tensor([3, 8])
    v, reconstruction = torch.compile(model, fullgraph=True, backend="eager")(x, y)
    v_eager, reconstruction_eager = model(x, y)
    assert torch.equal(v, v_eager) and torch.equal(reconstruction, reconstruction_eager)


def test_inductor_forward_of_the_reference_equals_eager(fresh_dynamo):
    """Inductor on the CPU (compiles C++: a slow test here) on the layer, with the 1e30 inputs
    whose logits pass float32's range: the scaled logits survive Inductor's fusion."""
    u, w, b = torch.randn(3, 16, 8), 0.3 * torch.randn(16, 10, 16, 8), 0.1 * torch.randn(16, 10)
    compiled = torch.compile(ct.self_attention_capsule_routing, fullgraph=True)
    for scale in (1.0, 1e30):
        v = compiled(scale * u, w, b)
        ref = ct.self_attention_capsule_routing((scale * u).double(), w.double(), b.double())
        assert torch.isfinite(v).all() and rel_err(v, ref) < KERNEL_TOL[torch.float32]  # float32, sums of 16 x 8 terms
