"""``capstriton.nn`` modules, the losses and the paper's CapsNet, eager and compiled."""

from __future__ import annotations

import pytest
import torch
from _helpers import rel_err

import capstriton as ct
from capstriton.models import CapsNet

# A reduced CapsNet for speed: 28x28 images, 32 conv channels, 8 primary types (512 capsules).
SMALL = dict(conv_channels=32, primary_types=8)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- CapsNet ------------------------------------------------------------------------------------


def test_capsnet_parameter_count_is_the_papers():
    assert n_params(CapsNet()) == 8_215_568
    assert n_params(CapsNet(decoder_hidden=None)) == 6_804_224


def test_capsnet_default_shapes():
    model = CapsNet()
    assert model.digit.in_caps == 1152
    x = torch.rand(2, 1, 28, 28)
    v, reconstruction = model(x)
    assert v.shape == (2, 10, 16)
    assert reconstruction.shape == (2, 784)
    assert ((reconstruction > 0) & (reconstruction < 1)).all()
    assert (ct.nn.capsule_lengths(v) < 1).all()


def test_capsnet_return_lengths_and_no_decoder():
    model = CapsNet(**SMALL, return_lengths=True)
    x = torch.rand(3, 1, 28, 28)
    lengths, reconstruction = model(x)
    assert lengths.shape == (3, 10)
    assert reconstruction.shape == (3, 784)
    model.return_lengths = False
    v, _ = model(x)
    assert torch.equal(lengths, torch.linalg.vector_norm(v, dim=-1))

    bare = CapsNet(**SMALL, decoder_hidden=None)
    v, reconstruction = bare(x)
    assert v.shape == (3, 10, 16) and reconstruction is None


def test_capsnet_configurable_sizes():
    model = CapsNet(in_channels=3, image_size=32, conv_channels=16, primary_types=4, num_classes=5, out_dim=6)
    # 32 - 9 + 1 = 24; (24 - 9) // 2 + 1 = 8; 4 types x 8 x 8 = 256 capsules.
    assert model.digit.in_caps == 256
    v, reconstruction = model(torch.rand(2, 3, 32, 32))
    assert v.shape == (2, 5, 6)
    assert reconstruction.shape == (2, 3 * 32 * 32)


def test_primary_capsules_grouping():
    """Channel c * caps_dim + k is component k of capsule type c; capsules are type-major."""
    layer = ct.nn.PrimaryCapsules(in_channels=2, caps_types=3, caps_dim=4, kernel_size=3, stride=2)
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    layer = layer.double()
    out = layer(x)
    y = layer.conv(x)  # [2, 12, 3, 3]
    assert out.shape == (2, 3 * 3 * 3, 4)
    c, row, col = 2, 1, 0
    capsule = y[:, c * 4 : (c + 1) * 4, row, col]
    index = c * 9 + row * 3 + col
    assert rel_err(out[:, index], ct.squash(capsule)) < 1e-12


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_one_optimisation_step_lowers_the_loss(optimizer):
    model = CapsNet(**SMALL)
    x = torch.rand(8, 1, 28, 28)
    y = torch.arange(8) % 10
    loss_fn = ct.nn.CapsuleLoss()
    opt = (
        torch.optim.Adam(model.parameters(), lr=1e-3)
        if optimizer == "adam"
        else torch.optim.SGD(model.parameters(), lr=1.0)
    )

    def loss():
        v, reconstruction = model(x, y)
        return loss_fn(ct.nn.capsule_lengths(v), y, reconstruction, x)

    before = loss()
    opt.zero_grad()
    before.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.digit.weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after < before


# --- decoder masking ----------------------------------------------------------------------------


def decoder_and_capsules():
    decoder = ct.nn.CapsuleDecoder(num_caps=4, caps_dim=3, hidden=(8,), out_features=5).double()
    v = 0.1 * torch.randn(2, 4, 3, dtype=torch.float64)
    v[0, 2] *= 5  # longest capsule of example 0: 2
    v[1, 0] *= 5  # longest capsule of example 1: 0
    longest = torch.tensor([2, 0])
    target = torch.tensor([1, 3])
    return decoder, v, longest, target


def one_hot(index: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(index, 4).double()


def test_decoder_masks_by_target_in_training():
    decoder, v, longest, target = decoder_and_capsules()
    decoder.train()
    by_target = decoder(v, target)
    assert torch.equal(by_target, decoder(v, mask=one_hot(target)))
    assert not torch.allclose(by_target, decoder(v, mask=one_hot(longest)))
    # The decoder sees only the masked capsule: changing the others changes nothing.
    other = v.clone()
    other[0, 0] += 1.0
    other[1, 1] += 1.0
    assert torch.equal(decoder(other, target), by_target)
    # Labels of any integer dtype (MNIST's come as uint8).
    for dtype in (torch.uint8, torch.int32):
        assert torch.equal(decoder(v, target.to(dtype)), by_target)
    # Training without a target falls back to the longest capsule.
    assert torch.equal(decoder(v), decoder(v, mask=one_hot(longest)))


def test_decoder_masks_by_longest_capsule_in_eval():
    decoder, v, longest, target = decoder_and_capsules()
    decoder.eval()
    expected = decoder(v, mask=one_hot(longest))
    assert torch.equal(decoder(v), expected)
    assert torch.equal(decoder(v, target), expected)  # the label is ignored at evaluation


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_decoder_explicit_mask_wins(mode):
    decoder, v, longest, target = decoder_and_capsules()
    decoder.train(mode == "train")
    mask = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    out = decoder(v, target, mask=mask)
    masked = (v * mask.unsqueeze(-1)).flatten(1)
    assert torch.equal(out, decoder.net(masked))
    assert torch.equal(decoder(v, mask=mask.bool()), out)


def test_capsnet_masks_decoder_like_its_decoder():
    model = CapsNet(**SMALL)
    x = torch.rand(4, 1, 28, 28)
    y = torch.tensor([3, 1, 4, 1])
    v, reconstruction = model(x, y)
    assert torch.equal(reconstruction, model.decoder(v, mask=torch.nn.functional.one_hot(y, 10)))
    model.eval()
    v, reconstruction = model(x, y)
    longest = torch.nn.functional.one_hot(v.norm(dim=-1).argmax(-1), 10)
    assert torch.equal(reconstruction, model.decoder(v, mask=longest))


# --- losses -------------------------------------------------------------------------------------

LENGTHS = [[0.95, 0.3, 0.05], [0.5, 0.08, 0.2]]
TARGET = [0, 2]
# By hand, m+ = 0.9, m- = 0.1, lam = 0.5:
#   example 0 (class 0): 0 + 0.5 * (0.3 - 0.1)^2 + 0                    = 0.02
#   example 1 (class 2): 0.5 * (0.5 - 0.1)^2 + 0 + (0.9 - 0.2)^2        = 0.08 + 0.49 = 0.57
MARGIN_BY_HAND = (0.02 + 0.57) / 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_margin_loss_by_hand(dtype):
    lengths = torch.tensor(LENGTHS, dtype=dtype)
    target = torch.tensor(TARGET)
    # float64: a handful of roundings of values < 1; float32: the same at eps = 1.2e-7.
    tol = 10 * torch.finfo(dtype).eps
    by_index = ct.margin_loss(lengths, target)
    assert abs(by_index.item() - MARGIN_BY_HAND) < tol
    by_one_hot = ct.margin_loss(lengths, torch.nn.functional.one_hot(target, 3).to(dtype))
    assert torch.equal(by_index, by_one_hot)
    assert torch.equal(ct.nn.MarginLoss()(lengths, target), by_index)
    # Other constants: m+ = 0.8, m- = 0.2, lam = 1 -> example 0: (0.3-0.2)^2 = 0.01;
    # example 1: (0.5-0.2)^2 + (0.8-0.2)^2 = 0.09 + 0.36 = 0.45.
    other = ct.margin_loss(lengths, target, m_pos=0.8, m_neg=0.2, lam=1.0)
    assert abs(other.item() - (0.01 + 0.45) / 2) < tol


def test_capsule_loss_adds_summed_reconstruction_error():
    lengths = torch.tensor(LENGTHS, dtype=torch.float64)
    target = torch.tensor(TARGET)
    images = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]], [[[1.0, 1.0], [0.0, 0.0]]]], dtype=torch.float64)
    reconstruction = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    # Squared errors per image: 0.25 + 0.25 + 0 + 0.0625 = 0.5625; 0 + 1 + 0 + 1 = 2.
    # Mean over the batch 1.28125, times 0.0005 (a sum per image, not a per-pixel mean).
    expected = MARGIN_BY_HAND + 0.0005 * (0.5625 + 2.0) / 2
    loss = ct.nn.CapsuleLoss()(lengths, target, reconstruction, images)
    assert abs(loss.item() - expected) < 1e-15  # float64 throughout, a few roundings of O(1)
    assert abs(ct.nn.CapsuleLoss()(lengths, target).item() - MARGIN_BY_HAND) < 1e-15
    assert ct.reconstruction_loss(reconstruction, images).item() == (0.5625 + 2.0) / 2
    with pytest.raises(ValueError, match="images"):
        ct.nn.CapsuleLoss()(lengths, target, reconstruction)


# --- modules match the functional API -----------------------------------------------------------


def test_routing_capsules_is_capsule_routing():
    layer = ct.nn.RoutingCapsules(in_caps=7, in_dim=4, out_caps=3, out_dim=5, iterations=2)
    assert tuple(layer.weight.shape) == (7, 3, 5, 4)
    # Initialisation 0.01 * randn: the standard deviation of 420 samples lies within 20%.
    assert 0.008 < layer.weight.std().item() < 0.012
    u = torch.randn(2, 7, 4, requires_grad=True)
    assert torch.equal(layer(u), ct.capsule_routing(u, layer.weight, 2))
    # grad_through_routing changes only the gradients (the forward values are the same), so the
    # flag's way through the layer is checked on them; inputs of 30 make the couplings move
    # (with 0.01 * randn weights and unit inputs the two gradients differ by only ~1e-4)
    u = (30 * torch.randn(2, 7, 4)).requires_grad_()
    grads = {}
    for through in (True, False):
        layer.grad_through_routing = through
        (g_layer,) = torch.autograd.grad(layer(u).sum(), u)
        (g_func,) = torch.autograd.grad(
            ct.capsule_routing(u, layer.weight, 2, grad_through_routing=through).sum(), u
        )
        assert torch.equal(g_layer, g_func)
        grads[through] = g_layer
    assert rel_err(grads[True], grads[False]) > 0.05  # seen: 0.24 to 0.31 for seeds 0-2
    assert torch.equal(ct.nn.Squash(dim=1)(u), ct.squash(u, dim=1))


# --- torch.compile ------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("grad_through_routing", [True, False], ids=["grad-all", "grad-last"])
def test_functional_api_compiles_without_graph_breaks(fresh_dynamo, grad_through_routing):
    # backend="eager" runs Dynamo's tracing only: fullgraph=True raises on any graph break,
    # without paying for Inductor's code generation.
    u_hat = torch.randn(2, 7, 3, 5, requires_grad=True)
    u = torch.randn(2, 7, 4, requires_grad=True)
    weight = torch.randn(7, 3, 5, 4, requires_grad=True)
    kw = dict(grad_through_routing=grad_through_routing, backend="torch")

    routing = torch.compile(ct.dynamic_routing, fullgraph=True, backend="eager")
    fused = torch.compile(ct.capsule_routing, fullgraph=True, backend="eager")
    squash = torch.compile(ct.squash, fullgraph=True, backend="eager")
    assert torch.equal(routing(u_hat, 3, **kw), ct.dynamic_routing(u_hat, 3, **kw))
    assert torch.equal(fused(u, weight, 3, **kw), ct.capsule_routing(u, weight, 3, **kw))
    assert torch.equal(squash(u_hat, backend="torch"), ct.squash(u_hat))
    routing(u_hat, 3, **kw).sum().backward()
    assert u_hat.grad is not None and torch.isfinite(u_hat.grad).all()


def test_capsnet_training_forward_traces_as_one_graph(fresh_dynamo):
    model = CapsNet(conv_channels=16, primary_types=4, image_size=20)
    x = torch.rand(2, 1, 20, 20)
    y = torch.tensor([1, 7])
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    v, reconstruction = compiled(x, y)
    v_eager, reconstruction_eager = model(x, y)
    assert torch.equal(v, v_eager) and torch.equal(reconstruction, reconstruction_eager)


def test_capsnet_inductor_forward_equals_eager(fresh_dynamo):
    """Inductor on the CPU (the slow test here: it compiles C++, ~30-60 s on 2 cores)."""
    model = CapsNet(conv_channels=16, primary_types=4, image_size=20).eval()
    x = torch.rand(3, 1, 20, 20)
    with torch.no_grad():
        v, reconstruction = torch.compile(model, fullgraph=True)(x)
        v_eager, reconstruction_eager = model(x)
    # Float32 with fused kernels that reorder sums (conv 9x9x16 = 1296 terms, routing over
    # 64 capsules): a few hundred ulps, well under 1e-5.
    assert rel_err(v, v_eager) < 1e-5
    assert rel_err(reconstruction, reconstruction_eager) < 1e-5
