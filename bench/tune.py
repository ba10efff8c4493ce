"""Time an op's kernels under alternative launch parameters (a CUDA GPU; see --device cpu).

Each op spec in ``bench/specs/`` may declare launch knobs (``TuneSpec``): per mode, the
parameters varied and their default grids (for ``routing``: ``tile`` and ``target_programs`` of
the forward, ``tile_bwd`` and ``target_programs_bwd`` of the backward, ``num_warps``). This
script times the op with every combination, passing the parameters to the op explicitly, so a
change of the defaults rests on measurements; each row also records the launch configuration
the parameters resolved to. Check candidates offline first with ``bench/kernel_report.py
--config`` (registers, spills).

    python bench/tune.py --op routing --batch-sizes 64 1024 --out results/
    python bench/tune.py --op routing --set tile=1024,2048 target_programs=1024

``--device cpu`` runs the same grid on CPU tensors through Triton's interpreter (set
``TRITON_INTERPRET=1``): a check that the script works, not a measurement.

Prints a table (median ms and examples/s per configuration and mode) and writes
``tune_<op>.json`` to ``--out`` when given, after every row.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

harness.ensure_capstriton()

import torch  # noqa: E402

registry = harness.import_registry()


def _values(text: str):
    return [None if v == "None" else int(v) for v in text.split(",")]


def parse_args(argv=None):
    tunable = sorted(name for name, spec in registry.specs().items() if spec.tune is not None)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", choices=tunable, default="routing")
    p.add_argument("--batch-sizes", type=harness.positive_int, nargs="+", default=[64, 1024])
    harness.add_size_options(p)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--modes", nargs="+", default=None, help="default: every mode the op's knobs name")
    p.add_argument(
        "--set", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
        help="replace a knob's grid (integers >= 1, or None for the heuristic's choice; repeatable)",
    )
    p.add_argument("--out", type=harness.output_folder, default=None, help="folder for tune_<op>.json")
    p.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda",
        help="cpu: the interpreter (TRITON_INTERPRET=1), to check the script only",
    )
    args = p.parse_args(argv)
    args.sizes = harness.sizes_of(p, args)
    spec = registry.get(args.op)
    knobs = {mode: dict(grid) for mode, grid in spec.tune.knobs.items()}
    for item in args.set:
        key, _, values = item.partition("=")
        if not values or not any(key in grid for grid in knobs.values()):
            p.error(f"--set takes KEY=V1,V2 with KEY one of {sorted({k for g in knobs.values() for k in g})}")
        try:
            parsed = _values(values)
        except ValueError:
            parsed = []
        if not parsed or any(v is not None and v < 1 for v in parsed):
            p.error(f"--set {item!r}: values must be integers >= 1 or None")
        for grid in knobs.values():
            if key in grid:
                grid[key] = parsed
    modes = args.modes or list(knobs)
    if any(m not in knobs for m in modes):
        p.error(f"--modes: {args.op} is tuned in {list(knobs)}")
    args.knobs = {m: knobs[m] for m in modes}
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("tune.py needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    if args.device == "cpu":
        from capstriton._checks import triton_unavailable_reason  # the library's own rule

        reason = triton_unavailable_reason(torch.device("cpu"))
        if reason is not None:
            print(f"tune.py --device cpu: {reason}", file=sys.stderr)
            return 2
    import triton.testing

    spec = registry.get(args.op)
    dtype = getattr(torch, args.dtype)
    sizes = spec.op_sizes(args.sizes)
    device = torch.device(args.device)
    env = {
        "device": harness.device_name(device) + ("" if device.type == "cuda" else " (interpreter)"),
        "torch": torch.__version__, "triton": triton.__version__, "op": args.op, "sizes": sizes,
        "dtype": args.dtype, "capstriton_git": harness.git_revision(),
    }
    rows: list[dict] = []

    def write():
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            harness.write_json(Path(args.out) / f"tune_{args.op}.json", {"environment": env, "results": rows})

    def bench(fn):
        if device.type == "cuda":
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        start = time.perf_counter()  # the interpreter: one call, to check it runs
        fn()
        return (time.perf_counter() - start) * 1e3

    for batch in args.batch_sizes:
        gen = torch.Generator().manual_seed(batch)
        inputs = spec.make_inputs(sizes, batch, device, dtype, False, gen)
        grad_inputs = [x.detach().clone().requires_grad_() for x in inputs]
        dv = torch.randn(spec.output_shape(sizes, batch), generator=gen).to(device, dtype)
        default_launch = spec.tune.launch(sizes, batch, {})
        for mode, grid in args.knobs.items():
            for values in itertools.product(*grid.values()):
                overrides = {k: v for k, v in zip(grid, values, strict=True) if v is not None}
                shown = " ".join(f"{k}={v}" for k, v in zip(grid, values, strict=True))
                try:
                    fn = spec.tune.call(sizes, overrides)
                    if mode == "forward":

                        def step(fn=fn, inputs=inputs):
                            with torch.no_grad():
                                fn(*inputs)

                    else:

                        def step(fn=fn, inputs=grad_inputs, dv=dv):
                            torch.autograd.grad(fn(*inputs), inputs, dv)

                    ms = bench(step)
                    launch = spec.tune.launch(sizes, batch, overrides)
                except Exception as exc:  # a grid point that cannot run (num_warps=3): a row saying why
                    error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                    rows.append({"batch_size": batch, "mode": mode, **dict(zip(grid, values, strict=True)),
                                 "time_ms": None, "examples_per_s": None, "launch": None, "default": False,
                                 "error": error})
                    print(f"B={batch:5d} {mode:17s} {shown:50s} failed: {error}", flush=True)
                    write()
                    continue
                rows.append({
                    "batch_size": batch, "mode": mode, **dict(zip(grid, values, strict=True)), "time_ms": ms,
                    "examples_per_s": batch / ms * 1e3, "launch": launch,
                    # the parameters resolve to the defaults' launch (an explicit default included)
                    "default": launch == default_launch, "error": None,
                })
                mark = "  (default)" if rows[-1]["default"] else ""
                rate = batch / ms * 1e3
                print(f"B={batch:5d} {mode:17s} {shown:50s} {ms:8.3f} ms {rate:11.4g} ex/s{mark}", flush=True)
                write()  # after every row: a run cut short by its time limit keeps its data
    return 0


if __name__ == "__main__":
    sys.exit(main())
