"""Peak memory of the capsule layer (``ct.capsule_routing``) without a GPU: the bytes of the tensors a
forward or a training step allocates and holds at once, counted at PyTorch's dispatcher
(``harness.peak_tensor_bytes``) on fake tensors, where nothing is computed. The count includes the
scratch buffers inside capstriton's triton ops (their Python bodies run under it; their kernel
launches are recorded, not run). No buffer size depends on values or on the device, so the count is
the same on a GPU, up to what the dispatcher cannot see: the CUDA allocator's rounding to 512-byte
blocks and cuBLAS workspaces (``tests/test_layer_memory.py::test_count_matches_the_cuda_allocator``
compares it with ``torch.cuda.max_memory_allocated`` where a GPU is lent).

Implementations: ``eager`` (the PyTorch reference), ``unfused`` (the predictions as a PyTorch
matmul, then the routing kernels) and ``fused`` (the fused layer). Modes as in
``routing_sweep.py``: ``forward`` is inference (under ``torch.no_grad``), ``forward+backward`` the
forward, then the gradients of u and the weight for a given output gradient. Inputs and the weight exist
before the step and are not counted; the gradients it returns are.

    python bench/layer_memory.py                                # paper's layer, B = 512 1024
    python bench/layer_memory.py --n-in 2048 --out bench/results/layer_memory/cifar10_2048x10x16x8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

harness.ensure_capstriton()

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from capstriton import reference  # noqa: E402
from capstriton.ops import fused_layer  # noqa: E402
from capstriton.ops._launch import recording  # noqa: E402

IMPLEMENTATIONS = {
    "eager": reference.capsule_routing,
    "unfused": fused_layer.capsule_routing_unfused,
    "fused": fused_layer.capsule_routing,
}
MODES = ("forward", "forward+backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="layer_memory.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_size_options(p)
    p.add_argument("--batch-sizes", nargs="+", type=harness.positive_int, default=[512, 1024])
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["float32", "bfloat16"])
    p.add_argument("--implementations", nargs="+", choices=tuple(IMPLEMENTATIONS), default=list(IMPLEMENTATIONS))
    p.add_argument("--out", type=harness.output_folder, default=None, help="write OUT/results.json and OUT/table.txt")
    args = p.parse_args(argv)
    args.sizes = harness.sizes_of(p, args)
    return args


def peak_bytes(implementation: str, sizes: dict, batch: int, dtype: torch.dtype, mode: str) -> int:
    """The peak tensor bytes of one call of ``implementation``, counted on fake CPU tensors (the
    ops choose their buffers from shapes and dtypes alone); no kernel runs."""
    fn = IMPLEMENTATIONS[implementation]
    n_in, n_out, d, d_in = sizes["n_in"], sizes["n_out"], sizes["d"], sizes["d_in"]
    with FakeTensorMode(), recording(lambda kernel, grid, kwargs: None):
        u = torch.empty(batch, n_in, d_in, dtype=dtype, requires_grad=True)
        weight = torch.empty(n_in, n_out, d, d_in, dtype=dtype, requires_grad=True)
        grad_v = torch.empty(batch, n_out, d, dtype=dtype)

        def step():
            if mode == "forward":
                with torch.no_grad():
                    return fn(u, weight, sizes["iterations"], sizes["grad_through_routing"])
            v = fn(u, weight, sizes["iterations"], sizes["grad_through_routing"])
            return torch.autograd.grad(v, (u, weight), grad_v)

        return harness.peak_tensor_bytes(step)


def run(args: argparse.Namespace) -> list[dict]:
    sizes = args.sizes
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for batch in args.batch_sizes:
            u_hat = batch * args.n_in * args.n_out * args.d * dtype.itemsize
            for mode in MODES:
                eager = peak_bytes("eager", sizes, batch, dtype, mode)
                for name in args.implementations:
                    peak = eager if name == "eager" else peak_bytes(name, sizes, batch, dtype, mode)
                    rows.append({
                        "implementation": name, "dtype": dtype_name, "batch_size": batch, "mode": mode,
                        "peak_bytes": peak, "peak_bytes_per_example": peak / batch,
                        "fraction_of_eager": peak / eager, "u_hat_bytes": u_hat,
                    })
    return rows


def table(rows: list[dict]) -> str:
    bw = max([5, *(len(str(r["batch_size"])) for r in rows)])  # the batch column fits its largest
    head = f"{'dtype':9} {'batch':>{bw}}  {'mode':16} {'implementation':14} {'peak MB':>9} {'KB/example':>10} " \
        f"{'of eager':>8} {'of u_hat':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['dtype']:9} {r['batch_size']:>{bw}}  {r['mode']:16} {r['implementation']:14} "
            f"{r['peak_bytes'] / 1e6:>9.1f} {r['peak_bytes_per_example'] / 1e3:>10.1f} "
            f"{r['fraction_of_eager']:>8.3f} {r['peak_bytes'] / r['u_hat_bytes']:>8.2f}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = run(args)
    text = table(rows)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.txt").write_text(text + "\n")
        config = {
            **args.sizes, "batch_sizes": args.batch_sizes, "dtypes": args.dtypes,
            "implementations": args.implementations,
        }
        env = harness.environment(torch.device("cpu"), config)
        env["device"] = "none: fake tensors, counted at the dispatcher"
        env["memory_note"] = (
            "peak tensor bytes counted at the dispatcher on fake tensors (harness.peak_tensor_bytes): "
            "no kernel ran; the same buffers on any device"
        )
        env["timing"] = None
        harness.write_json(args.out / "results.json", {"environment": env, "results": rows})


if __name__ == "__main__":
    main()
