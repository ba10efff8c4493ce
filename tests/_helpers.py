"""Helpers shared by the test modules (imported by name; nothing is imported from conftest): where
kernels run, the error measure and assertions that name the tensor, tolerances, and independent,
deliberately naive oracles written from the paper's formulas (they never call ``capstriton``),
used to check the reference itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from capstriton import data

REPO = Path(__file__).resolve().parents[1]

HAS_CUDA = torch.cuda.is_available()
#: The device kernel tests run on: the GPU when there is one, else CPU tensors under the
#: interpreter (conftest.py switches it on before triton is imported).
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# CI clones the repository with a copy of shared/ beside it.
MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
requires_mnist_test_files = pytest.mark.skipif(
    not all((MNIST_DIR / n).is_file() for n in data.FILES["test"]),
    reason=f"the real MNIST test files {data.FILES['test']} are not in {MNIST_DIR}",
)

#: The oldest supported triton (the GPU machines'), as .ci/oldest-triton.txt pins it; .ci/run
#: installs it into a folder and exports the folder as CT_OLDEST_TRITON_PATH.
OLDEST_TRITON = re.search(r"^triton==(\S+)", (REPO / ".ci" / "oldest-triton.txt").read_text(), re.M).group(1)


#: Marks the further shapes of a kernel test's shape grid: the rerun with the oldest supported
#: triton (tests/test_oldest_triton.py) deselects them and keeps a few cases per test that still
#: reach every kernel and every compile-time path (dtypes, gradient modes, product paths, the
#: first iteration, tails); the whole grid runs with the current triton.
shape_grid = pytest.mark.shape_grid


def grid_params(cases, ids, keep) -> list:
    """``cases`` (each a tuple of the test's arguments) as ``pytest.param``s named by ``ids``; those
    whose id is not in ``keep`` carry the ``shape_grid`` marker."""
    missing = set(keep) - set(ids)
    assert not missing, f"kept cases {sorted(missing)} are not in the grid"
    return [
        pytest.param(*case, id=case_id, marks=() if case_id in keep else shape_grid)
        for case, case_id in zip(cases, ids, strict=True)
    ]


def oldest_triton_env() -> dict[str, str]:
    """The environment of a subprocess that imports the oldest supported triton: this one's with
    CT_OLDEST_TRITON_PATH first on PYTHONPATH and without TRITON_INTERPRET. Skips the test when
    the folder is not set up, or fails it under CT_REQUIRE_OLDEST_TRITON=1 (as .ci/run sets)."""
    path = os.environ.get("CT_OLDEST_TRITON_PATH")
    if not path or not Path(path, "triton").is_dir():
        reason = f"CT_OLDEST_TRITON_PATH={path!r} is not a folder holding triton {OLDEST_TRITON} (.ci/run makes one)"
        if os.environ.get("CT_REQUIRE_OLDEST_TRITON") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH")) if p)
    return env


#: Relative errors ``||out - ref|| / ||ref||`` the Triton kernels may show against float64:
#: float32 5e-6, about 80 units of float32 rounding (2^-24 = 6e-8) over sums of at most a few
#: thousand terms and well under DESIGN.md's 1e-5 (seen: ~3e-7); float16/bfloat16 one eps of the
#: half type: inputs are rounded to it first and the reference gets the same rounded values, so
#: only the final rounding of the output (half an ulp, 2^-11 / 2^-8 relative) and the float32
#: arithmetic remain (seen: ~2e-4 / ~3.6e-3).
KERNEL_TOL = {
    torch.float32: 5e-6,
    torch.float16: torch.finfo(torch.float16).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
}


def shape_id(shape) -> str:
    """A test id that reads like the shape: (37, 10, 16) -> "37x10x16"."""
    return "x".join(map(str, shape))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` computed in float64 on the CPU (``||out - ref||`` when ``ref``
    is 0); ``out`` must be finite."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    diff = torch.linalg.vector_norm(out - ref).item()
    scale = torch.linalg.vector_norm(ref).item()
    return diff / scale if scale > 0 else diff


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """``rel_err(out, ref) < tol``, failing with the tensor's name, the error and the bound."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol:.3g} ({out.dtype}, shape {tuple(out.shape)})"


#: (u scale, weight scale, output-gradient scale) for float16 layers whose gradients' float32
#: intermediates leave float16's range: large |s| (the gradient of s below float16's normals:
#: "small-ds", and dw itself subnormal: "small-dw") and loss-scaled output gradients (factors
#: beyond 65504, part of dw beyond it too)
FLOAT16_RANGE_CASES = [(1e3, 1e3, 1.0), (30.0, 3e4, 1.0), (3.0, 0.1, 3e4), (10.0, 0.1, 2e4)]
FLOAT16_RANGE_IDS = ["small-ds", "small-dw", "large-dw", "larger-dw"]


def float16_range_inputs(u_scale: float, w_scale: float, grad_scale: float, device):
    """float16 u [4, 7, 4], weight [7, 3, 5, 4] and output gradient [4, 3, 5] at those scales
    (draws clamped to +-2 so that every input is a finite float16 number)."""
    gen = torch.Generator().manual_seed(0)
    u = (u_scale * torch.randn(4, 7, 4, generator=gen).clamp(-2, 2)).half().to(device)
    w = (w_scale * torch.randn(7, 3, 5, 4, generator=gen).clamp(-2, 2)).half().to(device)
    grad_out = (grad_scale * torch.randn(4, 3, 5, generator=gen).clamp(-1, 1)).half().to(device)
    return u, w, grad_out


def assert_float16_range(name: str, out: torch.Tensor, ref: torch.Tensor, min_normal: int = 0) -> None:
    """A float16 gradient against float64: never NaN; within float16's tolerance over the entries
    float16 holds as normal numbers (at least ``min_normal`` of them), within its subnormal step
    (2^-24; its rounding is half a step) below them, and infinity of the true value's sign where
    that rounds beyond 65504 in float16."""
    out, ref = out.double().cpu(), ref.double().cpu()
    tiny, big = torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max
    assert not out.isnan().any(), f"{name}: NaN"
    beyond = ref.abs() > big + 16  # rounds to infinity in float16 (half an ulp past 65504)
    assert torch.equal(out[beyond], ref[beyond].sign() * float("inf")), f"{name}: overflow"
    normal = (ref.abs() >= tiny) & ~beyond
    assert normal.sum() >= min_normal, f"{name}: {int(normal.sum())} normal entries"
    if normal.any():
        assert_close(name, out[normal], ref[normal], KERNEL_TOL[torch.float16])
    sub = ref.abs() < tiny
    assert ((out[sub] - ref[sub]).abs() <= 2.0**-24).all(), f"{name}: subnormals"


SUBNORMAL_QUANTUM = 2.0**-149  # float32's smallest subnormal: the absolute rounding step there


def assert_float32_close(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    """``out`` is ``ref`` (float64) up to float32 rounding: relative ``KERNEL_TOL`` for normal
    values and a few subnormal quanta for results below float32's normal range."""
    err = (out.double().cpu() - ref).abs().max().item()
    bound = KERNEL_TOL[torch.float32] * ref.abs().max().item() + 4 * SUBNORMAL_QUANTUM
    assert torch.isfinite(out).all() and err <= bound, f"{name}: error {err:.3g} > {bound:.3g}"


def naive_squash(s: torch.Tensor) -> torch.Tensor:
    """Eq. 1 as printed, for one capsule vector ``[D]``: ``s * ||s|| / (1 + ||s||^2)``.

    No guard at 0 (autograd would give NaN there), which is the point: it is the plain formula.
    """
    n2 = (s * s).sum()
    return s * torch.sqrt(n2) / (1.0 + n2)


def naive_routing(u_hat: torch.Tensor, iterations: int, grad_through_routing: bool = True) -> torch.Tensor:
    """Procedure 1 with explicit loops over examples, input capsules and output capsules.

    ``u_hat`` ``[B, N_in, N_out, D]`` -> ``v`` ``[B, N_out, D]``. With
    ``grad_through_routing=False`` the logits (hence the coupling coefficients) and every
    iteration but the last weighted sum see a detached ``u_hat``.
    """
    batch, n_in, n_out, _ = u_hat.shape
    outputs = []
    for b in range(batch):
        votes = u_hat[b]
        routed = votes if grad_through_routing else votes.detach()
        logits = [votes.new_zeros(n_out) for _ in range(n_in)]
        for r in range(iterations):
            last = r == iterations - 1
            used = votes if last else routed
            s = [votes.new_zeros(votes.shape[-1]) for _ in range(n_out)]
            for i in range(n_in):
                e = torch.exp(logits[i] - logits[i].max())
                c_i = e / e.sum()  # softmax over the output capsules j of input capsule i
                for j in range(n_out):
                    s[j] = s[j] + c_i[j] * used[i, j]
            v = [naive_squash(s_j) for s_j in s]
            if not last:
                for i in range(n_in):
                    agreement = torch.stack([(routed[i, j] * v[j]).sum() for j in range(n_out)])
                    logits[i] = logits[i] + agreement
        outputs.append(torch.stack(v))
    return torch.stack(outputs)


def naive_predictions(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``u_hat[b, i, j] = weight[i, j] @ u[b, i]`` with explicit loops."""
    batch, n_in, _ = u.shape
    n_out = weight.shape[1]
    return torch.stack(
        [
            torch.stack([torch.stack([weight[i, j] @ u[b, i] for j in range(n_out)]) for i in range(n_in)])
            for b in range(batch)
        ]
    )


def grads(fn, inputs: list[torch.Tensor], upstream: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of ``(fn(*inputs) * upstream).sum()`` with respect to ``inputs``."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    return list(torch.autograd.grad((out * upstream).sum(), leaves))


def saved_storages(fn) -> dict[int, int]:
    """What autograd saves for backward in a call of ``fn``: bytes of each distinct storage."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return storages
