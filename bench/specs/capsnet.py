"""Bench model ``capsnet``: the paper's MNIST CapsNet (8,215,568 parameters) against a port-style
baseline (``bench/port_capsnet.py``), for ``bench/model_bench.py``. Every implementation routes
with the gradient through the last iteration only, as the ports do
(``grad_through_routing=False``), so that they compute the same function."""

from __future__ import annotations

import torch
from registry import ModelSpec, Skip, Target, register_model

from specs._common import require_triton


def _identity(model):
    return model


def _capsnet(backend, fused=True):
    def build(device, dtype):
        import capstriton as ct

        if backend == "triton":
            require_triton(device)
        model = ct.models.CapsNet(grad_through_routing=False, backend=backend, fused=fused)
        return model.to(device), _identity

    return build


def build_port(device, dtype):
    from port_capsnet import PortCapsNet

    return PortCapsNet().to(device), _identity


def build_compile(device, dtype):
    import capstriton as ct

    return ct.models.CapsNet(grad_through_routing=False, backend="torch").to(device), torch.compile


def build_cudagraphs(device, dtype):
    """torch.compile(mode="reduce-overhead") of the model on its fastest path (CUDA graphs:
    one launch of the whole inference graph, for small batches)."""
    import capstriton as ct

    if device.type != "cuda":
        raise Skip("CUDA graphs need a CUDA device")
    model = ct.models.CapsNet(grad_through_routing=False, backend="auto").to(device)
    return model, lambda m: torch.compile(m, mode="reduce-overhead")


def capsnet_loss(outputs, target, reconstruction, images):
    import capstriton as ct

    return ct.nn.CapsuleLoss()(ct.nn.capsule_lengths(outputs.float()), target, reconstruction, images)


def port_loss(outputs, target, reconstruction, images):
    from port_capsnet import port_loss as loss

    return loss(outputs.float(), target, reconstruction.float(), images)


register_model(
    ModelSpec(
        name="capsnet",
        description="the paper's MNIST CapsNet: conv, 1152 primary capsules, routing to 10 x 16D, decoder",
        input_shape=(1, 28, 28),
        num_classes=10,
        implementations={
            "port": build_port,
            "eager": _capsnet("torch"),
            "compile": build_compile,
            "triton": _capsnet("triton", fused=False),
            "fused": _capsnet("triton"),
            "cudagraphs": build_cudagraphs,
        },
        loss=capsnet_loss,
        losses={"port": port_loss},
        modes={"cudagraphs": ("inference",)},
        targets=(
            Target("train", "fused", "speedup_vs_port", 5.0, "issue 14 (B = 128)"),
            Target("inference", "fused", "speedup_vs_port", 10.0, "issue 14 (B = 1024)"),
            Target("train", "fused", "saved_bytes_fraction_of_port", 0.25, "issue 14"),
            Target("train", "fused", "max_batch_vs_port", 4.0, "issue 14"),
        ),
    )
)
