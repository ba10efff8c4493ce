"""Benchmark sweep of capstriton's routing implementations: data first, plots drawn from the data.

What is timed (``--op``):

- ``layer``: the paper's DigitCaps layer, ``ct.capsule_routing``: u ``[B, N_in, D_in]`` and weight
  ``[N_in, N_out, D, D_in]`` -> v ``[B, N_out, D]`` (predictions, then routing). DESIGN.md section 5
  targets for the fused layer apply here.
- ``routing``: routing alone, ``ct.dynamic_routing`` on u_hat ``[B, N_in, N_out, D]``: the Triton
  routing kernel's targets (>= 5x eager, >= 2x torch.compile at B = 1024 fp32) apply here.

Implementations (``--implementations``):

- ``eager``: the public function with ``backend="torch"`` (the pure-PyTorch reference).
- ``compile``: ``torch.compile`` of the reference function (``capstriton.reference``).
- ``triton``: the public function with ``backend="triton"`` (for ``layer``: PyTorch predictions,
  then the routing kernel, until a fused kernel replaces them).
- ``fused``: the fused capsule_routing kernel; see :func:`fused_capsule_routing_or_reason`, the
  one place to update when it lands. ``layer`` only.
- ``module``: ``torch.compile`` of the whole ``ct.nn.RoutingCapsules`` module with
  ``backend="auto"`` (triton on CUDA, the reference on CPU). ``layer`` only.

Modes (``--modes``): ``forward`` is inference (inputs without gradients, under ``torch.no_grad``);
``forward+backward`` is ``torch.autograd.grad`` of v against a fixed random dv, with respect to
u_hat (routing) or u and weight (layer).

Timing: on CUDA ``triton.testing.do_bench`` (median and 20%/80% quantiles of per-call times
measured with CUDA events; warm-up excluded). On CPU ``torch.utils.benchmark.Timer``
``blocked_autorange`` with all intra-op threads (median and 20%/80% quantiles over blocks).
``compile_time_s`` is the wall time of the first call of each point (torch.compile tracing and
code generation, Triton JIT and autotuning included), measured before and excluded from the
timing. Each compiled implementation is compiled afresh (``torch._dynamo.reset``) per
(op, implementation, mode, dtype); batch sizes then follow PyTorch's default dynamic-shape
policy (a recompile with a dynamic batch at the second size), whose cost shows up in that
point's ``compile_time_s``.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during one call, minus what was
allocated before it (the inputs, weight and dv); on CPU PyTorch keeps no allocator statistics, so
``peak_memory_bytes`` is null (the reason is in ``environment.memory_note``).

Output: ``OUT/results.json`` (environment + one row per (op, implementation, mode, dtype, batch))
and PNG plots drawn from that file by ``bench/plot_results.py``. The JSON is rewritten after every
point, so a sweep stopped early leaves valid data behind. A summary of speedups at B = 1024 fp32
(or the largest batch measured) against DESIGN.md's targets is printed at the end.

Examples:
    python bench/routing_sweep.py --device cpu                          # CPU defaults
    python bench/routing_sweep.py --device cuda --out /tmp/sweep        # full GPU sweep
    python bench/routing_sweep.py --quick --op routing --batch-sizes 1 64 --implementations eager
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A private inductor cache per sweep: compile times are cold-cache ones, and no other process
# can delete files from under a running compile. Inductor keeps its precompiled C++ headers in
# the shared /tmp/torchinductor_<user> whatever the cache dir, and remembers them per process:
# if another process clears that folder, every later CPU compile fails, so they are turned off.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _INDUCTOR_CACHE = tempfile.TemporaryDirectory(prefix="capstriton-sweep-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE.name
os.environ.setdefault("TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS", "0")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("capstriton") is None:  # a checkout that is not installed
    sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plot_results  # noqa: E402

import capstriton as ct  # noqa: E402
from capstriton import reference  # noqa: E402
from capstriton._checks import triton_unavailable_reason as _library_reason  # noqa: E402

# The names are plot_results' (which draws and summarises them), the dtypes as torch's.
OPS, IMPLEMENTATIONS, MODES = plot_results.OPS, plot_results.IMPLEMENTATIONS, plot_results.MODES
DTYPES = {name: getattr(torch, name) for name in plot_results.DTYPES}
CUDA_BATCHES = tuple(2**k for k in range(13))  # 1 .. 4096
CPU_BATCHES = (1, 8, 64, 256)
COMPILED = ("compile", "module")


# --------------------------------------------------------------------------------------------
# Implementations


def fused_capsule_routing_or_reason():
    """``(fn, None)`` with ``fn(u, weight, iterations, grad_through_routing) -> v`` when the fused
    capsule_routing kernel exists, else ``(None, reason)``.

    The one place to update when the fused kernel lands: it is looked up as
    ``capstriton.ops.fused_capsule_routing``.
    """
    try:
        ops = importlib.import_module("capstriton.ops")
    except Exception as exc:  # a broken ops module must not stop the other implementations
        return None, f"capstriton.ops failed to import: {type(exc).__name__}: {exc}"
    fn = getattr(ops, "fused_capsule_routing", None)
    if callable(fn):
        return fn, None
    return None, "not implemented (no capstriton.ops.fused_capsule_routing)"


def triton_unavailable_reason(device: torch.device) -> str | None:
    """The library's reason, except that the interpreter on a CPU does not count here."""
    if device.type != "cuda":
        return (
            "triton kernels need a CUDA device; on CPU they run only under TRITON_INTERPRET=1, "
            "an emulator whose timings mean nothing"
        )
    return _library_reason(device)


def build_callable(impl: str, op: str, cfg: dict, device: torch.device, dtype: torch.dtype):
    """``(fn, extra_params, reason)``: ``fn(*inputs) -> v``, parameters owned by fn that also get
    gradients (the module's weight), or a reason why ``impl`` cannot run."""
    iters, grad = cfg["iterations"], cfg["grad_through_routing"]
    if impl in ("fused", "module") and op != "layer":
        return None, [], f"{impl} applies to op=layer only"
    if impl == "triton" and (reason := triton_unavailable_reason(device)):
        return None, [], reason
    if impl in ("eager", "triton"):
        backend = "torch" if impl == "eager" else "triton"
        if op == "routing":
            return (
                (lambda uh: ct.dynamic_routing(uh, iters, grad_through_routing=grad, backend=backend)),
                [],
                None,
            )
        return (
            (lambda u, w: ct.capsule_routing(u, w, iters, grad_through_routing=grad, backend=backend)),
            [],
            None,
        )
    if impl == "compile":
        if op == "routing":
            f = torch.compile(reference.dynamic_routing)
            return (lambda uh: f(uh, iters, grad)), [], None
        f = torch.compile(reference.capsule_routing)
        return (lambda u, w: f(u, w, iters, grad)), [], None
    if impl == "fused":
        fn, reason = fused_capsule_routing_or_reason()
        reason = reason or triton_unavailable_reason(device)
        if reason:
            return None, [], reason
        return (lambda u, w: fn(u, w, iters, grad)), [], None
    if impl == "module":
        layer = ct.nn.RoutingCapsules(cfg["n_in"], cfg["d_in"], cfg["n_out"], cfg["d"], iters, grad, backend="auto").to(
            device=device, dtype=dtype
        )
        f = torch.compile(layer)
        return (lambda u: f(u)), [layer.weight], None
    raise ValueError(f"unknown implementation {impl!r}")


def make_inputs(impl: str, op: str, cfg: dict, batch: int, device, dtype, needs_grad: bool):
    """The call's positional inputs (the module takes u alone: its weight is a parameter)."""
    gen = torch.Generator(device="cpu").manual_seed(batch)

    def rand(*shape, scale):
        x = (scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)
        return x.requires_grad_(needs_grad)

    if op == "routing":
        return [rand(batch, cfg["n_in"], cfg["n_out"], cfg["d"], scale=0.1)]
    u = rand(batch, cfg["n_in"], cfg["d_in"], scale=0.5)
    if impl == "module":
        return [u]
    return [u, rand(cfg["n_in"], cfg["n_out"], cfg["d"], cfg["d_in"], scale=0.05)]


def make_step(fn, inputs, params, mode: str, dv: torch.Tensor | None):
    """A no-argument callable running one forward (or forward+backward) of ``fn``."""
    if mode == "forward":

        def step():
            with torch.no_grad():
                return fn(*inputs)

        return step
    wrt = [*inputs, *params]

    def step():
        return torch.autograd.grad(fn(*inputs), wrt, dv)

    return step


# --------------------------------------------------------------------------------------------
# Measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(step, device: torch.device, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) of one call's time, in ms, warm-up excluded."""
    if device.type == "cuda":
        import triton.testing

        warmup, rep = (5, 20) if quick else (25, 100)
        med, p20, p80 = triton.testing.do_bench(step, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=0.05 if quick else 0.3)
    times = sorted(m.times)
    return 1e3 * m.median, 1e3 * _quantile(times, 0.2), 1e3 * _quantile(times, 0.8)


def _quantile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def peak_memory(step, device: torch.device) -> int | None:
    """Peak bytes allocated by one call beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    sync(device)
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak)


def copy_bandwidth(device: torch.device) -> float | None:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written per second), CUDA only."""
    if device.type != "cuda":
        return None
    import triton.testing

    n = 256 * 2**20 // 4  # 256 MiB of float32: far beyond L2
    buffers = [torch.empty(n, device=device) for _ in range(2)]
    ms = triton.testing.do_bench(lambda: buffers[1].copy_(buffers[0]), warmup=25, rep=100, return_mode="median")
    bandwidth = 2 * n * 4 / (ms * 1e-3)
    buffers.clear()
    torch.cuda.empty_cache()
    return bandwidth


def min_bytes_per_example(op: str, mode: str, cfg: dict, dtype: torch.dtype, batch: int) -> float:
    """Bytes an ideal kernel must move per example: each input read once, each gradient written
    once (routing: u_hat; layer: u and the weight shared by the batch)."""
    size = torch.empty((), dtype=dtype).element_size()
    if op == "routing":
        per_example = cfg["n_in"] * cfg["n_out"] * cfg["d"] * size
    else:
        per_example = cfg["n_in"] * cfg["d_in"] * size
        per_example += cfg["n_in"] * cfg["n_out"] * cfg["d"] * cfg["d_in"] * size / batch
    return per_example * (2 if mode == "forward+backward" else 1)


def is_oom(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------------------------
# Environment


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def environment(device: torch.device, cfg: dict, args: argparse.Namespace) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        # Other processes skew CPU timings: the 1-minute load average says how busy it was.
        "load_average_start": _load_average(),
        "capstriton_git": git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": cfg,
        "timing": (
            "triton.testing.do_bench, CUDA events per call, median and 20/80% quantiles"
            if device.type == "cuda"
            else "torch.utils.benchmark.Timer.blocked_autorange, median and 20/80% quantiles over blocks"
        ),
        "memory_note": (
            "torch.cuda.max_memory_allocated during one call minus memory allocated before it"
            if device.type == "cuda"
            else "not measured: PyTorch's CPU allocator keeps no peak statistics"
        ),
        "copy_bandwidth_bytes_per_s": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_bytes"] = props.total_memory
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    return env


# --------------------------------------------------------------------------------------------
# The sweep


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="routing_sweep.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="device to run on (default: cuda when available, else cpu)",
    )
    p.add_argument(
        "--op",
        nargs="+",
        choices=OPS,
        default=list(OPS),
        help="layer: ct.capsule_routing from u and weight; routing: ct.dynamic_routing on u_hat (default: %(default)s)",
    )
    p.add_argument(
        "--implementations",
        nargs="+",
        choices=IMPLEMENTATIONS,
        default=list(IMPLEMENTATIONS),
        help="implementations to time (default: %(default)s)",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="what is timed (default: %(default)s)",
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=tuple(DTYPES),
        default=["float32"],
        help="input dtypes; accumulation is float32 in every implementation (default: %(default)s)",
    )
    p.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=None,
        help=f"batch sizes (default: {' '.join(map(str, CUDA_BATCHES))} on cuda, "
        f"{' '.join(map(str, CPU_BATCHES))} on cpu)",
    )
    p.add_argument("--n-in", type=int, default=1152, help="input capsules N_in (default: %(default)s)")
    p.add_argument("--n-out", type=int, default=10, help="output capsules N_out (default: %(default)s)")
    p.add_argument(
        "--d-in",
        type=int,
        default=8,
        help="input capsule dimension D_in (layer) (default: %(default)s)",
    )
    p.add_argument("--d", type=int, default=16, help="output capsule dimension D (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=3, help="routing iterations (default: %(default)s)")
    p.add_argument(
        "--no-grad-through-routing",
        action="store_true",
        help="time grad_through_routing=False instead of the default True",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory for results.json and the plots (default: bench/results/<device name>/)",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="add rows to an existing OUT/results.json instead of replacing it",
    )
    p.add_argument("--quick", action="store_true", help="short timing runs (less precise)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no new point after this many seconds; the rest are skipped rows",
    )
    p.add_argument("--no-plots", action="store_true", help="write the JSON only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if any(b < 1 for b in args.batch_sizes or ()):
        p.error("--batch-sizes must be >= 1")
    for name in ("n_in", "n_out", "d_in", "d", "iterations"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
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


def run_group(op, impl, mode, dtype_name, batches, cfg, device, args, deadline, on_row) -> None:
    dtype = DTYPES[dtype_name]
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
    try:
        fn, params, reason = build_callable(impl, op, cfg, device, dtype)
    except Exception as exc:
        fn, params, reason = None, [], f"{type(exc).__name__}: {exc}"
    for batch in batches:
        if reason is not None:
            row(batch, status="skipped", reason=reason)
            continue
        if deadline is not None and time.monotonic() > deadline:
            row(batch, status="skipped", reason="time budget exhausted")
            continue
        try:
            inputs = make_inputs(impl, op, cfg, batch, device, dtype, mode != "forward")
            dv = None
            if mode != "forward":
                shape = (batch, cfg["n_out"], cfg["d"])
                dv = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
            step = make_step(fn, inputs, params, mode, dv)
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            first_call = time.perf_counter() - start
            median, p20, p80 = time_step(step, device, args.quick)
            peak = peak_memory(step, device)
            row(
                batch,
                examples_per_s=batch / (median * 1e-3),
                time_ms_median=median,
                time_ms_p20=p20,
                time_ms_p80=p80,
                peak_memory_bytes=peak,
                compile_time_s=first_call,
            )
        except Exception as exc:
            if is_oom(exc):
                row(batch, status="skipped", reason="out of memory")
            else:
                message = (str(exc).splitlines() or [""])[0]
                row(batch, status="error", reason=f"{type(exc).__name__}: {message}")
        finally:
            inputs = step = dv = None
            if device.type == "cuda":
                torch.cuda.empty_cache()


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    batches = args.batch_sizes or list(CUDA_BATCHES if device.type == "cuda" else CPU_BATCHES)
    cfg = {
        "n_in": args.n_in,
        "n_out": args.n_out,
        "d_in": args.d_in,
        "d": args.d,
        "iterations": args.iterations,
        "grad_through_routing": not args.no_grad_through_routing,
        "batch_sizes": batches,
        "quick": args.quick,
    }
    out = args.out or REPO / "bench" / "results" / plot_results.device_slug(device_name(device))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    for limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)

    data = {"environment": environment(device, cfg, args), "results": []}
    if args.append and path.exists():
        previous = json.loads(path.read_text())
        data["results"] = previous["results"]
        data["environment"]["previous_runs"] = [
            *previous["environment"].get("previous_runs", []),
            {k: previous["environment"][k] for k in ("command", "date", "config")},
        ]
    data["environment"]["copy_bandwidth_bytes_per_s"] = copy_bandwidth(device)
    write_json(path, data)

    groups = list(sweep_points(args, batches))
    total = sum(len(g[-1]) for g in groups)
    deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    from tqdm import tqdm

    with tqdm(
        total=total,
        desc="sweep",
        unit="pt",
        disable=args.no_progress,
        mininterval=2.0,
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:

        def on_row(r):
            if r["status"] == "ok" and r["examples_per_s"]:
                r["min_bytes_per_example"] = min_bytes_per_example(
                    r["op"], r["mode"], cfg, DTYPES[r["dtype"]], r["batch_size"]
                )
            data["results"].append(r)
            write_json(path, data)
            bar.set_postfix_str(
                f"{r['op']} {r['implementation']} {r['mode']} {r['dtype']} B={r['batch_size']}",
                refresh=False,
            )
            bar.update(1)

        for op, impl, mode, dtype, bs in groups:
            run_group(op, impl, mode, dtype, bs, cfg, device, args, deadline, on_row)

    data["environment"]["load_average_end"] = _load_average()
    data["summary"] = plot_results.summarize(data)
    write_json(path, data)
    print(f"wrote {path}")
    print(plot_results.summary_text(data))
    if not args.no_plots:
        for png in plot_results.plot_all(data, out):
            print(f"wrote {png}")
    return data


if __name__ == "__main__":
    main()
