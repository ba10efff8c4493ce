"""Model-level checks that need a real GPU: the compiled CapsNet and the triton CapsNet against
the torch backend. They skip cleanly without CUDA; each algorithm's opcheck and compiled checks
are in tests/ops/, whose numerical checks run on the GPU too."""

import pytest
import torch
from _helpers import KERNEL_TOL, rel_err, requires_cuda

import capstriton as ct

pytestmark = [pytest.mark.cuda, requires_cuda]


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 off for convolutions and matmuls ("highest"), so float32 comparisons mean float32
    accuracy: IEEE products in PyTorch, 3xTF32 in the fused and self-attention layers' kernels."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


TOL32 = KERNEL_TOL[torch.float32]


def test_compiled_capsnet_training_step_matches_eager():
    torch._dynamo.reset()
    model = ct.models.CapsNet(backend="auto").cuda()
    x = torch.rand(8, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    loss_fn = ct.nn.CapsuleLoss()

    def step(m):
        v, rec = m(x, y)
        loss = loss_fn(ct.nn.capsule_lengths(v), y, rec, x)
        grads = torch.autograd.grad(loss, list(m.parameters()))
        return loss, grads

    loss_e, grads_e = step(model)
    loss_c, grads_c = step(torch.compile(model, fullgraph=True))
    # inductor fuses and reorders the convolutions' and the decoder's float32 arithmetic:
    # agreement to float32 accumulation over ~1e4-term sums (well above 1e-7 per op)
    assert abs(loss_e.item() - loss_c.item()) <= 1e-5 * abs(loss_e.item())
    for ge, gc in zip(grads_e, grads_c, strict=True):
        assert rel_err(gc, ge) < 1e-4


def test_capsnet_triton_matches_torch_backend():
    model = ct.models.CapsNet(backend="triton").cuda()
    x = torch.rand(16, 1, 28, 28, device="cuda")
    v_triton, rec_triton = model(x)
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = "torch"
    v_torch, rec_torch = model(x)
    # identical convolutions; the capsule layer differs by float32 summation order and its
    # 3xTF32 products (float32 accuracy)
    assert rel_err(v_triton, v_torch) < TOL32
    assert rel_err(rec_triton, rec_torch) < 1e-5
