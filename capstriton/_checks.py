"""Argument validation and backend resolution shared by the functional API and the modules.

Every error names the argument and what was expected; nothing is silently broadcast.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, x, ndim: int | None = None, layout: str | None = None) -> None:
    """``x`` is a floating tensor (float16/bfloat16/float32/float64) of rank ``ndim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}"
        )
    if ndim is not None and x.dim() != ndim:
        shape = f" {layout}" if layout else ""
        raise ValueError(
            f"{name} must have {ndim} dimensions{shape}, got shape {tuple(x.shape)}"
        )


def check_positive_sizes(name: str, x: torch.Tensor, layout: str, skip_first: bool = True) -> None:
    """Every size but the batch (first) one is at least 1."""
    sizes = x.shape[1:] if skip_first else x.shape
    if any(n < 1 for n in sizes):
        raise ValueError(f"{name} must have non-empty capsule dimensions {layout}, got {tuple(x.shape)}")


def check_size(name: str, value) -> int:
    """``value`` is an int >= 1 (a bool is not); returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_backend(backend) -> str:
    """``backend`` is one of :data:`BACKENDS`; returns it."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")


#: Looked up once at import: dispatch runs inside torch.compile'd code, where dynamo refuses to
#: trace importlib (a graph break on torch 2.11, seen on an H200).
HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the triton backend cannot run on ``device`` (None when it can)."""
    if not HAS_TRITON:
        return "the triton package is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"triton kernels run on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
        f"triton is imported), got a tensor on {device}"
    )


def resolve_backend(backend, x: torch.Tensor) -> str:
    """Map ``backend`` to ``"torch"`` or ``"triton"`` for tensor ``x``, or raise."""
    if check_backend(backend) == "torch":
        return "torch"
    if backend == "auto":
        if x.device.type == "cuda" and x.dtype in TRITON_DTYPES and triton_unavailable_reason(x.device) is None:
            return "triton"
        return "torch"
    reason = triton_unavailable_reason(x.device)
    if reason is not None:
        raise ValueError(f"backend='triton' cannot run here: {reason}")
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"backend='triton' supports float16, bfloat16 and float32 inputs, got {x.dtype} "
            "(use backend='torch' for float64)"
        )
    return "triton"
