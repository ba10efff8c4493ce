"""Time the routing kernels under alternative launch parameters (a CUDA GPU; see --device cpu).

``kernels.routing.routing_config`` picks tile sizes, warps and the number of programs per
example from the shape; this script times the library's ops with other choices of its keyword
arguments (``tile`` and ``target_programs`` of the forward, ``tile_bwd`` and
``target_programs_bwd`` of the backward, ``num_warps``) on the paper's DigitCaps shape, so a
change of the defaults rests on measurements. Check candidates offline first with
``bench/kernel_report.py`` (registers, spills).

    python bench/tune_routing.py --batch-sizes 64 1024 --out results/

``--device cpu`` runs the same grid on CPU tensors through Triton's interpreter (set
``TRITON_INTERPRET=1``): a check that the script works, not a measurement.

Prints a table (median ms and examples/s per configuration, forward and forward+backward) and
writes ``tune_routing.json`` to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import sys
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--shape", type=int, nargs=3, default=[1152, 10, 16], metavar=("N_IN", "N_OUT", "D"))
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--tiles", type=int, nargs="+", default=[1024, 2048, 4096], help="forward tile sizes")
    p.add_argument("--tiles-bwd", type=int, nargs="+", default=[512, 1024, 2048], help="backward tile sizes")
    p.add_argument("--target-programs", type=int, nargs="+", default=[1024, 8192], help="forward programs")
    p.add_argument("--target-programs-bwd", type=int, nargs="+", default=[1024, 8192], help="backward programs")
    p.add_argument("--num-warps", type=int, nargs="+", default=[4])
    p.add_argument("--out", default=None, help="folder for tune_routing.json")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: the interpreter (TRITON_INTERPRET=1), to check the script only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("tune_routing.py needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("tune_routing.py --device cpu needs TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    import triton.testing
    from capstriton.kernels.routing import routing_config

    import capstriton as ct
    from capstriton import ops

    dtype = getattr(torch, args.dtype)
    defaults = {k: v.default for k, v in inspect.signature(routing_config).parameters.items()
                if v.kind == v.KEYWORD_ONLY}
    rows = []
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter)"
    env = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
           "shape": args.shape, "iterations": args.iterations, "dtype": args.dtype}

    def write(rows):
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, "tune_routing.json")
            with open(path + ".tmp", "w") as f:
                json.dump({"environment": env, "results": rows}, f, indent=1)
            os.replace(path + ".tmp", path)

    def bench(fn):
        if args.device == "cuda":
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        start = time.perf_counter()  # the interpreter: one call, to check it runs
        fn()
        return (time.perf_counter() - start) * 1e3

    # forward: vary the forward's parameters; forward+backward: the backward's, at the default forward
    grids = {
        "forward": [dict(tile=t, target_programs=p, num_warps=w)
                    for t, p, w in itertools.product(args.tiles, args.target_programs, args.num_warps)],
        "forward+backward": [dict(tile_bwd=t, target_programs_bwd=p, num_warps=w)
                             for t, p, w in itertools.product(args.tiles_bwd, args.target_programs_bwd,
                                                              args.num_warps)],
    }
    try:
        for batch in args.batch_sizes:
            u = torch.randn(batch, *args.shape, device=args.device, dtype=dtype)
            u_grad = u.clone().requires_grad_()
            dv = torch.randn(batch, args.shape[1], args.shape[2], device=args.device, dtype=dtype)
            for mode, grid in grids.items():
                for overrides in grid:
                    used = []  # what the ops' launches got: proof that the overrides reached them

                    def config(*a, _overrides=overrides, _used=used, **k):
                        c = routing_config(*a, **k, **_overrides)
                        if not _used:  # the first call's is enough: this runs in the timed loop
                            _used.append(c)
                        return c

                    ops.routing_config = config
                    cfg = {**defaults, **overrides}
                    if mode == "forward":
                        def fn(u=u):
                            with torch.no_grad():
                                ct.dynamic_routing(u, args.iterations, backend="triton")
                    else:
                        def fn(u=u_grad, dv=dv):
                            v = ct.dynamic_routing(u, args.iterations, backend="triton")
                            torch.autograd.grad(v, u, dv)
                    ms = bench(fn)
                    launch = used[0]
                    rows.append({"batch_size": batch, "mode": mode, **cfg, "time_ms": ms,
                                 "examples_per_s": batch / ms * 1e3, "launch": launch,
                                 # the launch parameters the defaults resolve to (num_warps=None too)
                                 "default": launch == routing_config(*args.shape, batch)})
                    print(f"B={batch:5d} {mode:17s} tile={cfg['tile']:5d} tile_bwd={cfg['tile_bwd']:5d} "
                          f"programs={cfg['target_programs']:5d}/{cfg['target_programs_bwd']:5d} "
                          f"warps={cfg['num_warps']} "
                          f"{ms:8.3f} ms {batch / ms * 1e3:11.4g} ex/s{'  (default)' if rows[-1]['default'] else ''}",
                          flush=True)
                    write(rows)  # after every row: a run cut short by its time limit keeps its data
    finally:
        ops.routing_config = routing_config
    return 0


if __name__ == "__main__":
    sys.exit(main())
