"""Benchmark sweep of the ops in the bench registry: data first, plots drawn from the data.

What is timed (``--op``, the specs in ``bench/specs/``; default: every op marked default there):

- ``layer``: the paper's DigitCaps layer, ``ct.capsule_routing``: u ``[B, N_in, D_in]`` and
  weight ``[N_in, N_out, D, D_in]`` -> v ``[B, N_out, D]`` (predictions, then routing).
- ``routing``: routing alone, ``ct.dynamic_routing`` on u_hat ``[B, N_in, N_out, D]``.
- ``attention``: the self-attention routing layer, ``ct.self_attention_capsule_routing`` (u and
  weight as ``layer``, a bias ``[N_in, N_out]``), at the drivers' sizes.
- ``fccaps``: the same layer at Efficient-CapsNet's MNIST sizes, always 16 x 10 x 16 x 8.
- ``squash``: ``ct.squash`` of ``[B, N_in, D_in]`` (not in the default sweep).

Implementations (``--implementations``, as each spec declares them): ``eager`` (the public
function with ``backend="torch"``), ``compile`` (``torch.compile`` of the reference function),
``triton`` (``backend="triton"``, CUDA only), ``fused`` (the fused layer kernels), ``module``
(``torch.compile`` of ``ct.nn.RoutingCapsules(backend="auto")``). An implementation an op does
not declare, or one that cannot run here, gives a skipped row with the reason.

Modes (``--modes``): ``forward`` is inference (under ``torch.no_grad``); ``forward+backward`` is
``torch.autograd.grad`` of the output against a fixed random dv, with respect to every input
(and the parameters an implementation owns).

Timing (``bench/harness.py``): on CUDA ``triton.testing.do_bench`` (median and 20%/80%
quantiles of per-call times measured with CUDA events; warm-up excluded); on a CPU
``torch.utils.benchmark.Timer.blocked_autorange`` with all intra-op threads. ``compile_time_s``
is the wall time of the first call of each point (tracing, code generation, Triton JIT),
excluded from the timing. Each compiled implementation is compiled afresh per (op,
implementation, mode, dtype); batch sizes then follow PyTorch's default dynamic-shape policy.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during one call minus what was
allocated before it; null on a CPU (the reason is in ``environment.memory_note``).

Output: ``OUT/results.json`` (environment, the targets of the ops swept, one row per (op,
implementation, mode, dtype, batch)), rewritten after every point so that a sweep stopped early
leaves valid data, and the PNG plots drawn from it by ``bench/plot_results.py``. A summary at
B = 1024 (or the largest batch measured) against the targets is printed at the end.

Examples:
    python bench/routing_sweep.py --device cpu                          # CPU defaults
    python bench/routing_sweep.py --device cuda --out /tmp/sweep        # full GPU sweep
    python bench/routing_sweep.py --quick --op routing --batch-sizes 1 64 --implementations eager
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

harness.isolated_inductor_cache()  # before torch is imported
harness.ensure_capstriton()

import plot_results  # noqa: E402
import torch  # noqa: E402

registry = harness.import_registry()
SPECS = registry.specs()
IMPLEMENTATIONS = registry.implementation_names()
MODES = ("forward", "forward+backward")
DTYPES = {name: getattr(torch, name) for name in ("float32", "bfloat16", "float16")}
CUDA_BATCHES = tuple(2**k for k in range(13))  # 1 .. 4096
CPU_BATCHES = (1, 8, 64, 256)
#: implementations whose first call compiles: a fresh dynamo state per group
COMPILED = ("compile", "module")


def build(spec, impl: str, sizes: dict, device, dtype):
    """``(fn, params, reason)``: the implementation, parameters it owns, or why it cannot run."""
    if impl not in spec.implementations:
        return None, [], f"op {spec.name} has no implementation {impl!r} (it has {sorted(spec.implementations)})"
    try:
        fn, params = spec.implementations[impl](sizes, device, dtype)
    except registry.Skip as skip:
        return None, [], str(skip)
    except Exception as exc:  # a broken implementation must not stop the others
        return None, [], f"{type(exc).__name__}: {exc}"
    return fn, params, None


def make_step(fn, inputs, params, mode: str, dv):
    """A no-argument callable running one forward (or forward+backward) of ``fn``."""
    if mode == "forward":

        def step():
            with torch.no_grad():
                return fn(*inputs)

        return step
    wrt = [*inputs, *params]

    def step():
        # allow_unused: an implementation may take an input it does not use (the module owns
        # its weight)
        return torch.autograd.grad(fn(*inputs), wrt, dv, allow_unused=True)

    return step


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="routing_sweep.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    defaults = [name for name, spec in SPECS.items() if spec.default]
    p.add_argument("--op", nargs="+", choices=sorted(SPECS), default=defaults, help="ops (default: %(default)s)")
    p.add_argument(
        "--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS),
        help="implementations to time (default: %(default)s)",
    )
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="default: %(default)s")
    p.add_argument(
        "--dtypes", nargs="+", choices=tuple(DTYPES), default=["float32"],
        help="input dtypes; accumulation is float32 in every implementation (default: %(default)s)",
    )
    p.add_argument(
        "--batch-sizes", nargs="+", type=harness.positive_int, default=None,
        help=f"default: {' '.join(map(str, CUDA_BATCHES))} on cuda, {' '.join(map(str, CPU_BATCHES))} on cpu",
    )
    harness.add_size_options(p)
    p.add_argument("--out", type=harness.output_folder, default=None, help="default: bench/results/<device name>/")
    p.add_argument(
        "--append", action="store_true",
        help="add rows to an existing OUT/results.json of the same sizes (a point measured again replaces its row)",
    )
    p.add_argument("--quick", action="store_true", help="short timing runs (less precise)")
    p.add_argument(
        "--time-budget", type=harness.nonnegative_float, default=None, metavar="SECONDS",
        help="start no new point after this many seconds; the rest are skipped rows",
    )
    p.add_argument("--no-plots", action="store_true", help="write the JSON only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.sizes = harness.sizes_of(p, args)
    return args


def sweep_points(args, batches):
    """Groups ``(op, impl, mode, dtype, batches)`` in run order, every batch of one callable
    together: float32 first, then the half types interleaved per (op, mode, implementation), so
    that a time budget cut short still measures each of them on the first ops and modes asked for.
    """
    half = [d for d in args.dtypes if d != "float32"]
    dtype_runs = ([["float32"]] if "float32" in args.dtypes else []) + ([half] if half else [])
    for dtypes in dtype_runs:
        for op in args.op:
            for mode in args.modes:
                for impl in args.implementations:
                    for dtype in dtypes:
                        yield op, impl, mode, dtype, batches


def run_group(op, impl, mode, dtype_name, batches, sizes, device, args, deadline, on_row) -> None:
    spec, dtype = SPECS[op], DTYPES[dtype_name]
    sizes = spec.op_sizes(sizes)
    base = {"op": op, "implementation": impl, "mode": mode, "dtype": dtype_name}

    def row(batch, **fields):
        on_row(
            {
                **base,
                "batch_size": batch,
                "examples_per_s": None,
                "time_ms_median": None,
                "time_ms_p20": None,
                "time_ms_p80": None,
                "peak_memory_bytes": None,
                "compile_time_s": None,
                "status": "ok",
                "reason": None,
                **fields,
            }
        )

    if impl in COMPILED:
        torch._dynamo.reset()  # a fresh compile per group: honest compile times, no cache limits
    fn, params, reason = build(spec, impl, sizes, device, dtype)
    for batch in batches:
        if reason is not None:
            row(batch, status="skipped", reason=reason)
            continue
        if deadline is not None and time.monotonic() > deadline:
            row(batch, status="skipped", reason="time budget exhausted")
            continue
        inputs = step = dv = None
        try:
            gen = torch.Generator().manual_seed(batch)
            inputs = spec.make_inputs(sizes, batch, device, dtype, mode != "forward", gen)
            if mode != "forward":
                dv = torch.randn(spec.output_shape(sizes, batch), generator=torch.Generator().manual_seed(1))
                dv = dv.to(device, dtype)
            step = make_step(fn, inputs, params, mode, dv)
            harness.sync(device)
            start = time.perf_counter()
            step()
            harness.sync(device)
            first_call = time.perf_counter() - start
            median, p20, p80 = harness.time_step(step, device, args.quick)
            row(
                batch,
                examples_per_s=batch / (median * 1e-3),
                time_ms_median=median,
                time_ms_p20=p20,
                time_ms_p80=p80,
                peak_memory_bytes=harness.peak_memory(step, device),
                compile_time_s=first_call,
            )
        except Exception as exc:
            if harness.is_oom(exc):
                row(batch, status="skipped", reason="out of memory")
            else:
                message = (str(exc).splitlines() or [""])[0]
                row(batch, status="error", reason=f"{type(exc).__name__}: {message}")
        finally:
            inputs = step = dv = None
            if device.type == "cuda":
                torch.cuda.empty_cache()


def point_key(row: dict) -> tuple:
    """What a results row measures: (op, implementation, mode, dtype, batch size)."""
    return row["op"], row["implementation"], row["mode"], row["dtype"], row["batch_size"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    batches = args.batch_sizes or list(CUDA_BATCHES if device.type == "cuda" else CPU_BATCHES)
    sizes = args.sizes
    config = {**sizes, "batch_sizes": batches, "quick": args.quick}
    out = args.out or harness.REPO / "bench" / "results" / plot_results.device_slug(harness.device_name(device))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    for limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)

    data = {"environment": harness.environment(device, config), "targets": [], "results": []}
    if args.append and path.exists():
        previous = json.loads(path.read_text())
        before = {k: previous["environment"].get("config", {}).get(k) for k in sizes}
        if before != sizes:
            changed = ", ".join(f"{k} {before[k]} -> {sizes[k]}" for k in sizes if before[k] != sizes[k])
            raise SystemExit(
                f"--append: {path} holds points of other sizes ({changed}); its rows do not record them, so "
                "they cannot share a file: use another --out"
            )
        data["results"] = previous["results"]
        data["targets"] = previous.get("targets", [])
        data["environment"]["previous_runs"] = [
            *previous["environment"].get("previous_runs", []),
            {k: previous["environment"][k] for k in ("command", "date", "config")},
        ]
    for op in args.op:
        for target in SPECS[op].targets:
            entry = {"op": op, **vars(target)}
            if entry not in data["targets"]:
                data["targets"].append(entry)
    data["environment"]["copy_bandwidth_bytes_per_s"] = harness.copy_bandwidth(device)
    harness.write_json(path, data)

    groups = list(sweep_points(args, batches))
    deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    from tqdm import tqdm

    total = sum(len(g[-1]) for g in groups)
    bar = tqdm(
        total=total, desc="sweep", unit="pt", disable=args.no_progress, mininterval=2.0, file=sys.stderr,
        dynamic_ncols=True,
    )
    with bar:

        def on_row(r):
            if r["status"] == "ok" and r["examples_per_s"]:
                spec = SPECS[r["op"]]
                op_sizes = spec.op_sizes(sizes)
                r["min_bytes_per_example"] = spec.min_bytes_per_example(
                    op_sizes, DTYPES[r["dtype"]], r["mode"], r["batch_size"]
                )
                r["flops_per_example"] = spec.flops_per_example(op_sizes, r["mode"])
            key = point_key(r)
            data["results"] = [old for old in data["results"] if point_key(old) != key]  # measured again
            data["results"].append(r)
            harness.write_json(path, data)
            bar.set_postfix_str(
                f"{r['op']} {r['implementation']} {r['mode']} {r['dtype']} B={r['batch_size']}", refresh=False
            )
            bar.update(1)

        for op, impl, mode, dtype, bs in groups:
            run_group(op, impl, mode, dtype, bs, sizes, device, args, deadline, on_row)

    data["environment"]["load_average_end"] = harness.load_average()
    data["summary"] = plot_results.summarize(data)
    harness.write_json(path, data)
    print(f"wrote {path}")
    print(plot_results.summary_text(data))
    if not args.no_plots:
        for png in plot_results.plot_all(data, out):
            print(f"wrote {png}")
    return data


if __name__ == "__main__":
    main()
