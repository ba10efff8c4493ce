"""Builders the op specs share: seeded random inputs, the triton availability rule of the bench,
and torch.compile of a function."""

from __future__ import annotations

import torch
from registry import Skip


def rand(generator: torch.Generator, shape, scale: float, device, dtype, requires_grad: bool) -> torch.Tensor:
    """``scale * randn(shape)`` drawn on the CPU from ``generator`` (the same values on every
    device), then moved and cast."""
    x = (scale * torch.randn(*shape, generator=generator)).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def require_triton(device: torch.device) -> None:
    """Raise :class:`Skip` unless the Triton kernels can be timed here: CUDA with triton (on a
    CPU they run only under TRITON_INTERPRET, an emulator whose timings mean nothing)."""
    if device.type != "cuda":
        raise Skip(
            "triton kernels need a CUDA device; on CPU they run only under TRITON_INTERPRET=1, "
            "an emulator whose timings mean nothing"
        )
    from capstriton._checks import triton_unavailable_reason

    reason = triton_unavailable_reason(device)
    if reason:
        raise Skip(reason)


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def public_function(call):
    """The ``eager`` and ``triton`` builders of a public capstriton function: ``call(sizes,
    backend)`` returns it as a function of the inputs, bound to that backend."""

    def on(backend: str):
        def build(sizes, device, dtype):
            if backend == "triton":
                require_triton(device)
            return call(sizes, backend), []

        return build

    return {"eager": on("torch"), "triton": on("triton")}
