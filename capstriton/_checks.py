"""Argument validation and backend resolution shared by the functional API and the modules.

Every error names the argument and what was expected; nothing is silently broadcast.
"""

from __future__ import annotations

import importlib.util
import math
import numbers

import torch

BACKENDS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, x, ndim: int | None = None, layout: str | None = None) -> None:
    """``x`` is a dense floating tensor (float16/bfloat16/float32/float64) of rank ``ndim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
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


def as_int(value) -> int | None:
    """``value`` as a Python int when it is an integer scalar, Python's or NumPy's (a
    ``numbers.Integral``: not a bool, a tensor or an array), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def check_size(name: str, value, minimum: int = 1) -> int:
    """``value`` is an integer >= ``minimum`` (Python's or NumPy's; a bool is not); returns it as
    an int."""
    size = as_int(value)
    if size is None:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if size < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {size}")
    return size


def check_bool(name: str, value) -> bool:
    """``value`` is a bool (not any truthy object: ``"no"`` would read as True); returns it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    return value


def _check_number(name: str, value) -> None:
    """``value`` is a real number, Python's or NumPy's (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")


def check_real(name: str, value) -> float:
    """``value`` is a finite real number; returns it as a float."""
    _check_number(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def check_nonnegative(name: str, value) -> float:
    """``value`` is a finite real number >= 0 (a loss weight); returns it as a float."""
    _check_number(name, value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def check_class_indices(name: str, target: torch.Tensor, num_classes: int) -> None:
    """Integer ``target`` holds class indices in ``[0, num_classes)``. On a CPU the check raises
    here; on CUDA, and under torch.compile on any device (a data-dependent branch would break the
    graph), it is an asynchronous assertion, with no host synchronisation per training step, as
    PyTorch's own losses: compiled on a CPU a RuntimeError with this message, on CUDA a
    device-side assert (the message on stderr)."""
    if target.numel() == 0:
        return
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(target)
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} must hold class indices in [0, {num_classes}), got values from {int(lo)} to {int(hi)}"
            )
    else:
        torch._assert_async(
            ((target >= 0) & (target < num_classes)).all(),
            f"{name} must hold class indices in [0, {num_classes})",
        )


def check_backend(backend) -> str:
    """``backend`` is one of :data:`BACKENDS`; returns it."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_same(
    name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, given: tuple[torch.Tensor, torch.Tensor] | None = None
) -> None:
    """``a`` and ``b`` share device and dtype; ``given``: the tensors as the caller passed them,
    before autocast's casts made ``a`` and ``b`` (the message names both)."""
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
    if a.dtype != b.dtype:
        cast = ""
        if given is not None and (given[0].dtype, given[1].dtype) != (a.dtype, b.dtype):
            cast = f" (given as {given[0].dtype} and {given[1].dtype}: float64 is not cast by autocast)"
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}{cast}")


#: Looked up once at import: dispatch runs inside torch.compile'd code, where dynamo refuses to
#: trace importlib (a graph break on torch 2.11).
HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the triton backend cannot run on ``device`` (None when it can)."""
    if not HAS_TRITON:
        return "the triton package is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        try:  # (imports triton: not before the triton backend is asked for)
            import triton

            from .ops._launch import INTERPRETED, LIBRARY_INTERPRETED
        except ImportError as e:
            return f"triton cannot be imported: {e}"
        if INTERPRETED and LIBRARY_INTERPRETED:
            return None
        if INTERPRETED:
            return (
                "TRITON_INTERPRET was set after triton was imported (and before capstriton was): triton's own "
                "functions were made for a GPU; set it before triton is imported"
            )
        knobs = getattr(triton, "knobs", None)
        if knobs is not None and knobs.runtime.interpret:  # the variable, read as triton.jit reads it
            return (
                "TRITON_INTERPRET is set, but capstriton's kernels were made for a GPU: set it before triton "
                "is imported"
            )
    return (
        f"triton kernels run on CUDA tensors (or CPU tensors under Triton's interpreter: TRITON_INTERPRET=1 "
        f"set before triton is imported), got a tensor on {device}"
    )


def unsupported_transform(*tensors: torch.Tensor) -> str | None:
    """The autograd transform the Triton ops cannot differentiate that one of ``tensors`` is
    under, or None. Their autograd is reverse mode only (``register_autograd``): forward-mode AD
    would silently get a zero tangent, and ``torch.func.grad``/``jacrev`` fail inside PyTorch.
    ``torch.func.vmap`` alone is not reported: PyTorch runs the ops once per example (slow, with
    its warning, but correct). Under ``torch.compile`` nothing is reported: tracing sees no
    transform wrappers."""
    if torch.compiler.is_compiling():
        return None
    from torch._C import _functorch

    for t in tensors:
        if torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
            return "forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad)"
        while _functorch.is_functorch_wrapped_tensor(t):  # vmap(grad(f)) nests its wrappers
            if _functorch.is_gradtrackingtensor(t):
                return "torch.func's function transforms (grad, vjp, jacrev)"
            t = _functorch.get_unwrapped(t)
    return None


def auto_takes_triton(x: torch.Tensor) -> bool:
    """``backend="auto"`` runs the kernels on ``x`` (transforms aside): CUDA, a kernel dtype, triton
    installed."""
    return x.device.type == "cuda" and x.dtype in TRITON_DTYPES and triton_unavailable_reason(x.device) is None


def _wrapped(t: torch.Tensor) -> bool:
    return not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(t)


def resolve_backend(backend, *tensors: torch.Tensor | None) -> str:
    """Map ``backend`` to ``"torch"`` or ``"triton"`` for the inputs ``tensors`` (the first one
    decides device and dtype; None, an absent optional input, is skipped), or raise.

    ``"auto"`` takes triton for CUDA tensors, except under torch.func transforms or forward-mode
    AD, which the reference supports natively; ``"triton"`` there is an error naming the transform.
    """
    tensors = tuple(t for t in tensors if t is not None)
    x = tensors[0]
    if check_backend(backend) == "torch":
        return "torch"
    if backend == "auto":
        if auto_takes_triton(x) and not any(_wrapped(t) or unsupported_transform(t) for t in tensors):
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
    transform = unsupported_transform(*tensors)
    if transform is not None:
        raise NotImplementedError(
            f"backend='triton' cannot be differentiated by {transform}: its kernels have reverse-mode "
            "autograd only (loss.backward(), torch.autograd.grad, torch.compile). Use backend='torch', "
            "which supports every transform, or backend='auto', which picks it for such inputs."
        )
    return "triton"
