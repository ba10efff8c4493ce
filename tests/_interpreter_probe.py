"""Run by tests/test_interpreter.py in a fresh process under TRITON_INTERPRET=1:
``python _interpreter_probe.py MODE OUT`` with MODE ``skip`` (``_interpreter`` installed, every
skipped call verified) or ``triton`` (triton's own patching). Writes to OUT (torch.save) the
outputs and gradients of every kernel family, and what two kernels outside the kernel modules'
pattern did: a helper whose module sees no ``triton.language`` (triton refuses it), and a kernel
that sees only ``triton.language.core``, launched after a jit function ran on the host."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import textwrap
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import capstriton as ct  # noqa: E402


def layer_and_routing(dtype):
    """Outputs and gradients of the fused layer, the unfused routing, self-attention routing and
    both squashes: every kernel module and its helpers (and triton's own ``tl.sum``, ``tl.max``)."""
    u = torch.randn(5, 7, 9).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(7, 3, 5, 9)).to(dtype).requires_grad_()
    grad = torch.randn(5, 3, 5).to(dtype)
    outs = []
    for fused in (True, False):
        v = ct.capsule_routing(u, w, 2, backend="triton", fused=fused)
        outs += [v, *torch.autograd.grad(v, (u, w), grad)]
    u_hat = torch.randn(5, 7, 3, 5).to(dtype).requires_grad_()
    v = ct.self_attention_routing(u_hat, backend="triton")
    outs += [v, *torch.autograd.grad(v, u_hat, grad)]
    for squash in (ct.squash, ct.efficient_squash):
        s = torch.randn(5, 3, 5).to(dtype).requires_grad_()
        v = squash(s, backend="triton")
        outs += [v, *torch.autograd.grad(v, s, grad)]
    return outs


_NO_LANGUAGE = """
import triton


@triton.jit
def total(x):
    return triton.language.sum(x, axis=0)
"""

_KERNELS = """
import triton
import triton.language as tl
from triton.language import core

from no_language import total


@triton.jit
def plus_one(x):
    return x + 1


@triton.jit
def sums_kernel(x_ptr, out_ptr, N: tl.constexpr):
    tl.store(out_ptr, total(tl.load(x_ptr + tl.arange(0, N))))
"""

_CORE_ONLY = """
import triton
from triton.language import core


@triton.jit
def core_kernel(out_ptr):
    core.store(out_ptr, core.program_id(0) + 41)
"""


def _outcome(fn):
    try:
        return ("ok", fn())
    except Exception as e:  # what triton raised, by type
        return ("raised", type(e).__name__)


def odd_kernels() -> list:
    folder = tempfile.mkdtemp()
    for name, text in (("no_language", _NO_LANGUAGE), ("kernels_mod", _KERNELS), ("core_only", _CORE_ONLY)):
        Path(folder, f"{name}.py").write_text(textwrap.dedent(text))
    sys.path.insert(0, folder)
    mod = importlib.import_module("kernels_mod")
    core_only = importlib.import_module("core_only")
    out = torch.zeros(1, dtype=torch.int32)
    x = torch.arange(8, dtype=torch.float32)
    res = torch.zeros(1)

    def sums():
        mod.sums_kernel[(1,)](x, res, N=8)
        return res.item()

    def core_launch():
        core_only.core_kernel[(1,)](out)
        return out.item()

    results = [_outcome(sums), _outcome(lambda: int(mod.plus_one(1)))]
    results += [_outcome(core_launch) for _ in range(3)]
    return results


def main(mode: str, out: str) -> None:
    torch.manual_seed(0)
    if mode == "skip":
        import _interpreter

        assert _interpreter.install()
        with _interpreter.verifying():
            odd = odd_kernels()  # first: nothing patched yet but what import left
            outs = [layer_and_routing(d) for d in (torch.float32, torch.bfloat16)]
        counts = _interpreter.counts()
        assert not _interpreter.in_launch()
    else:
        odd = odd_kernels()
        outs = [layer_and_routing(d) for d in (torch.float32, torch.bfloat16)]
        counts = (0, 0)
    torch.save({"odd": odd, "outs": outs, "counts": counts}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
