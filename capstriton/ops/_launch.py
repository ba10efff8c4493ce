"""Launch helpers shared by every op module: the launcher through which ``torch.compile`` traces a
kernel launch, the allocator of every output and scratch buffer (which the tests poison with
NaN), and a recorder of launches for the offline kernel report (``bench/kernel_report.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import triton.language.standard
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

from ..kernels.common import squash_parts

__all__ = ["INTERPRETED", "LIBRARY_INTERPRETED", "launch", "empty", "poisoned", "recording"]

#: Whether the kernels run under Triton's interpreter (on CPU tensors): what ``triton.jit`` made
#: of them when they were imported (TRITON_INTERPRET then), not what the variable says now. A
#: module constant: dispatch reads it inside torch.compile'd code.
INTERPRETED = not isinstance(squash_parts, JITFunction)
#: The same for triton's own jitted library (``tl.max`` and the rest), made when triton itself was
#: imported: with the variable set between that import and capstriton's, the kernels are the
#: interpreter's but call compiled library functions, which fail inside the interpreter.
LIBRARY_INTERPRETED = not isinstance(triton.language.standard.max, JITFunction)

#: Set by :func:`poisoned`: buffers come NaN-filled instead of uninitialised.
_poison = False
#: Set by :func:`recording`: launches are handed to it instead of running.
_recorder: Callable | None = None


def launch(kernel, grid: tuple[int, ...], **kwargs) -> None:
    """Launch ``kernel`` on ``grid`` with keyword arguments only (kernel parameters, constexprs,
    ``num_warps``), through ``wrap_triton`` so that torch.compile traces the launch. Under
    TRITON_INTERPRET the kernels are interpreter functions that run eagerly on CPU tensors:
    torch 2.13's wrap_triton hands them back unchanged, torch 2.11's refuses them, so they are
    launched directly.

    Every launch asks for floating-point contraction (a * b + c as one FMA) explicitly: it is
    Triton's default up to 3.9, which warns that 3.10 turns it off; the kernel report's
    instruction counts and the issue model's times assume it (the tolerances of the tests hold
    either way: the interpreter never contracts). Under torch.compile inductor drops the option
    and triton's default applies (``bench/results/kernel_report/NOTES.md``)."""
    kwargs.setdefault("enable_fp_fusion", True)
    if _recorder is not None:
        _recorder(kernel, grid, kwargs)
        return
    runner = wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel
    runner[grid](**kwargs)


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer of the ops comes from here: uninitialised memory, since
    each kernel writes every element it owns. Under :func:`poisoned` it is NaN-filled, so that an
    element a kernel forgot to write, or a buffer read before it was written, fails loudly."""
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Within the block the ops' buffers are NaN-filled (tests)."""
    global _poison
    saved, _poison = _poison, True
    try:
        yield
    finally:
        _poison = saved


@contextlib.contextmanager
def recording(record: Callable) -> Iterator[None]:
    """Within the block no kernel runs: each launch calls ``record(kernel, grid, kwargs)`` instead
    (the kernel report runs the ops on fake CUDA tensors and compiles what they would launch)."""
    global _recorder
    saved, _recorder = _recorder, record
    try:
        yield
    finally:
        _recorder = saved
