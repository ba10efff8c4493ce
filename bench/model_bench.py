"""Whole-model benchmark: a training step and inference of a model in the bench registry (the
paper's CapsNet, ``bench/specs/capsnet.py``) against a port-style baseline, data first.

Implementations (``--implementations``): ``port`` (``bench/port_capsnet.py``: the structure most
public PyTorch ports share), ``eager`` (``ct.models.CapsNet(backend="torch")``), ``compile``
(``torch.compile`` of it), ``triton`` (the routing kernels after a PyTorch prediction matmul),
``fused`` (the fused capsule layer) and, on CUDA, ``cudagraphs`` (``torch.compile(mode=
"reduce-overhead")``, inference). All route with the gradient through the last iteration only,
as the ports do, so they compute the same function.

Modes (``--modes``): ``train`` is forward, loss (margin + reconstruction), backward and an Adam
step; ``inference`` is the forward in eval mode under ``torch.no_grad``. ``--dtypes bfloat16``
runs them under ``torch.autocast``.

Recorded per point (``bench/harness.py``): examples/s (median, 20/80% quantiles), the first
call's time (``compile_time_s``: compilation, autotuning), on CUDA the peak memory of one step
beyond what was allocated before it (parameters, optimizer state and inputs excluded), and for
``train`` on any device the bytes autograd saves for the backward per example
(``saved_tensors_hooks``: every distinct storage once, parameters included). With ``--max-batch``
on CUDA, the largest training batch (a power of two) whose step stays under ``--memory-cap``
bytes of total allocator memory, tried upwards until one does not fit.

    python bench/model_bench.py --device cpu --batch-sizes 2 4 --implementations port eager \\
        --modes train inference --out DIR            # -> DIR/results.json and plots
    python bench/model_bench.py --device cuda --max-batch --out DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

harness.isolated_inductor_cache()  # before torch is imported
harness.ensure_capstriton()

import torch  # noqa: E402

registry = harness.import_registry()
MODELS = registry.model_specs()
MODES = ("train", "inference")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CUDA_BATCHES = (1, 8, 32, 128, 512, 1024)
CPU_BATCHES = (1, 8, 32)
GiB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="model_bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=sorted(MODELS), default="capsnet")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    names = sorted({n for spec in MODELS.values() for n in spec.implementations})
    p.add_argument("--implementations", nargs="+", choices=names, default=None, help="default: all of the model's")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["float32"])
    p.add_argument(
        "--batch-sizes",
        nargs="+",
        type=harness.positive_int,
        default=None,
        help=f"default: {' '.join(map(str, CUDA_BATCHES))} on cuda, {' '.join(map(str, CPU_BATCHES))} on cpu",
    )
    p.add_argument("--max-batch", action="store_true", help="CUDA: the largest training batch under --memory-cap")
    p.add_argument("--memory-cap", type=harness.nonnegative_float, default=16 * GiB, help="bytes (default: 16 GiB)")
    p.add_argument(
        "--out", type=harness.output_folder, default=None, help="default: bench/results/<device>/model_bench/"
    )
    p.add_argument("--quick", action="store_true", help="short timing runs")
    p.add_argument(
        "--time-budget", type=harness.nonnegative_float, default=None, metavar="SECONDS",
        help="start no new point after this many seconds",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def make_batch(spec, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch)
    images = torch.rand(batch, *spec.input_shape, generator=gen).to(device)
    target = torch.randint(0, spec.num_classes, (batch,), generator=gen).to(device)
    return images, target


def make_step(spec, impl: str, model, wrapped, mode: str, dtype, images, target):
    """A no-argument callable running one training step or one inference of the model."""
    device_type = images.device.type
    amp = dict(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32)
    if mode == "inference":
        model.eval()

        def step():
            with torch.no_grad(), torch.autocast(**amp):
                return wrapped(images)[0]

        return step
    model.train()
    loss_fn = spec.losses.get(impl, spec.loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        with torch.autocast(**amp):
            outputs, reconstruction = wrapped(images, target)
        loss = loss_fn(outputs, target, reconstruction, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def forward_for_saved_bytes(model, wrapped, dtype, images, target):
    """One training forward and loss, for counting what autograd saves."""
    amp = dict(device_type=images.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def forward():
        with torch.autocast(**amp):
            return wrapped(images, target)

    return forward


def max_batch(spec, impl, dtype, device, cap: float, start: int = 64, limit: int = 2**17) -> dict:
    """The largest power-of-two training batch whose step keeps the allocator's peak (everything
    allocated, parameters and optimizer state included) under ``cap`` bytes."""
    fits, peak_at_fit, batch = None, None, start
    while batch <= limit:
        model = step = images = target = None
        try:
            model, wrap = spec.implementations[impl](device, DTYPES[dtype])
            images, target = make_batch(spec, batch, device)
            step = make_step(spec, impl, model, wrap(model), "train", DTYPES[dtype], images, target)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            if peak > cap:
                break
            fits, peak_at_fit = batch, peak
        except Exception as exc:
            if not harness.is_oom(exc):
                raise
            break
        finally:
            model = step = images = target = None
            torch.cuda.empty_cache()
        batch *= 2
    return {"max_batch": fits, "peak_memory_at_max_batch": peak_at_fit}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.max_batch and args.device != "cuda":
        # the search needs the CUDA allocator's peak (a CPU run would skip it without a word)
        raise SystemExit(f"--max-batch needs a CUDA device (--device cuda); this run is on {args.device}")
    device = torch.device(args.device)
    spec = MODELS[args.model]
    impls = args.implementations or list(spec.implementations)
    batches = args.batch_sizes or list(CUDA_BATCHES if device.type == "cuda" else CPU_BATCHES)
    config = {"model": spec.name, "batch_sizes": batches, "quick": args.quick, "memory_cap_bytes": args.memory_cap}
    import plot_results

    out = (
        args.out
        or harness.REPO / "bench" / "results" / plot_results.device_slug(harness.device_name(device)) / "model_bench"
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    data = {
        "environment": harness.environment(device, config),
        "targets": [{"op": spec.name, **vars(t)} for t in spec.targets],
        "results": [],
        "max_batch": [],
    }
    harness.write_json(path, data)
    deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    points = [(i, m, d) for d in args.dtypes for m in args.modes for i in impls]

    from tqdm import tqdm

    with tqdm(
        total=len(points) * len(batches), desc="model bench", unit="pt", disable=args.no_progress, file=sys.stderr
    ) as bar:
        for impl, mode, dtype_name in points:
            dtype = DTYPES[dtype_name]
            base = {"op": spec.name, "implementation": impl, "mode": mode, "dtype": dtype_name}
            if mode not in spec.modes.get(impl, MODES):
                reason = f"{impl} runs {', '.join(spec.modes[impl])} only"
            else:
                reason = None
            torch._dynamo.reset()
            for batch in batches:
                row = {
                    **base,
                    "batch_size": batch,
                    "examples_per_s": None,
                    "time_ms_median": None,
                    "time_ms_p20": None,
                    "time_ms_p80": None,
                    "peak_memory_bytes": None,
                    "saved_bytes_per_example": None,
                    "compile_time_s": None,
                    "status": "ok",
                    "reason": None,
                }
                if reason is None and deadline is not None and time.monotonic() > deadline:
                    row.update(status="skipped", reason="time budget exhausted")
                elif reason is not None:
                    row.update(status="skipped", reason=reason)
                else:
                    model = step = images = target = None
                    try:
                        model, wrap = spec.implementations[impl](device, dtype)
                        wrapped = wrap(model)
                        images, target = make_batch(spec, batch, device)
                        step = make_step(spec, impl, model, wrapped, mode, dtype, images, target)
                        harness.sync(device)
                        start = time.perf_counter()
                        step()
                        harness.sync(device)
                        row["compile_time_s"] = time.perf_counter() - start
                        median, p20, p80 = harness.time_step(step, device, args.quick)
                        row.update(
                            examples_per_s=batch / (median * 1e-3),
                            time_ms_median=median,
                            time_ms_p20=p20,
                            time_ms_p80=p80,
                            peak_memory_bytes=harness.peak_memory(step, device),
                        )
                        if mode == "train":
                            forward = forward_for_saved_bytes(model, wrapped, dtype, images, target)
                            row["saved_bytes_per_example"] = harness.saved_tensor_bytes(forward) / batch
                    except registry.Skip as skip:
                        row.update(status="skipped", reason=str(skip))
                    except Exception as exc:
                        if harness.is_oom(exc):
                            row.update(status="skipped", reason="out of memory")
                        else:
                            row.update(
                                status="error", reason=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                            )
                    finally:
                        model = step = images = target = None
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                data["results"].append(row)
                harness.write_json(path, data)
                bar.update(1)
        if args.max_batch and device.type == "cuda":
            for impl in impls:
                if "train" not in spec.modes.get(impl, MODES):
                    continue
                for dtype_name in args.dtypes:
                    if deadline is not None and time.monotonic() > deadline:
                        entry = {"status": "skipped", "reason": "time budget exhausted"}
                    else:
                        try:
                            entry = {"status": "ok", **max_batch(spec, impl, dtype_name, device, args.memory_cap)}
                        except registry.Skip as skip:
                            entry = {"status": "skipped", "reason": str(skip)}
                        except Exception as exc:
                            entry = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
                    data["max_batch"].append(
                        {"implementation": impl, "dtype": dtype_name, "memory_cap_bytes": args.memory_cap, **entry}
                    )
                    harness.write_json(path, data)

    data["summary"] = summarize(data)
    harness.write_json(path, data)
    print(f"wrote {path}")
    print(summary_text(data))
    if not args.no_plots:
        for png in plot_model(data, out):
            print(f"wrote {png}")
    return data


# --------------------------------------------------------------------------------------------
# summary and plots (from the JSON alone)


def summarize(data: dict, batches=(1, 128, 1024)) -> list[dict]:
    """Per (mode, dtype, implementation) at each of ``batches`` measured and the largest batch:
    examples/s, speedup over port, saved bytes per example against port's, and the largest batch against port's."""
    ok = [r for r in data["results"] if r["status"] == "ok"]
    batches = set(batches) | {max((r["batch_size"] for r in ok), default=0)}
    port_max = {m["dtype"]: m.get("max_batch") for m in data.get("max_batch", []) if m["implementation"] == "port"}
    out = []
    for r in ok:
        if r["batch_size"] not in batches:
            continue
        port = next(
            (
                p
                for p in ok
                if p["implementation"] == "port"
                and (p["mode"], p["dtype"], p["batch_size"]) == (r["mode"], r["dtype"], r["batch_size"])
            ),
            None,
        )
        entry = {
            k: r[k]
            for k in (
                "implementation",
                "mode",
                "dtype",
                "batch_size",
                "examples_per_s",
                "saved_bytes_per_example",
                "peak_memory_bytes",
            )
        }
        entry["speedup_vs_port"] = port["time_ms_median"] / r["time_ms_median"] if port else None
        saved, port_saved = r.get("saved_bytes_per_example"), port and port.get("saved_bytes_per_example")
        entry["saved_bytes_fraction_of_port"] = saved / port_saved if saved and port_saved else None
        mine = next(
            (
                m.get("max_batch")
                for m in data.get("max_batch", [])
                if (m["implementation"], m["dtype"]) == (r["implementation"], r["dtype"])
            ),
            None,
        )
        entry["max_batch_vs_port"] = mine / port_max[r["dtype"]] if mine and port_max.get(r["dtype"]) else None
        out.append(entry)
    return out


def summary_text(data: dict) -> str:
    lines = [
        f"Summary on {data['environment']['device']} (speedups against port at the same batch):",
        f"  {'impl':10s} {'mode':9s} {'dtype':8s} {'batch':>5s} {'ex/s':>10s} {'x port':>7s} "
        f"{'saved B/ex':>11s} {'saved/port':>10s}",
    ]
    for e in data.get("summary") or summarize(data):
        lines.append(
            f"  {e['implementation']:10s} {e['mode']:9s} {e['dtype']:8s} {e['batch_size']:5d} "
            f"{e['examples_per_s']:10.4g} {_fmt(e['speedup_vs_port'], '7.3g')} "
            f"{_fmt(e['saved_bytes_per_example'], '11.4g')} {_fmt(e['saved_bytes_fraction_of_port'], '10.3g')}"
        )
    for m in data.get("max_batch", []):
        lines.append(
            f"  largest training batch under {m['memory_cap_bytes'] / GiB:g} GiB: {m['implementation']} "
            f"{m['dtype']}: {m.get('max_batch')} ({m['status']}{': ' + m['reason'] if m.get('reason') else ''})"
        )
    skipped = {(r["implementation"], r["reason"]) for r in data["results"] if r["status"] != "ok"}
    lines += [f"  not measured: {i}: {why}" for i, why in sorted(skipped)]
    return "\n".join(lines)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def plot_model(data: dict, out: Path) -> list[Path]:
    """``model_throughput.png`` (examples/s against batch size) and ``model_memory.png`` (bytes
    saved for backward per example, and on CUDA peak memory per example, against batch size):
    one panel per (mode or quantity, dtype) that has data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plot_results

    ok = [r for r in data["results"] if r["status"] == "ok"]
    impls = plot_results.ordered((r["implementation"] for r in ok), ("port", "eager", "compile", "triton", "fused"))
    dtypes = plot_results.ordered((r["dtype"] for r in ok), tuple(DTYPES))
    written = []
    panels = {
        "model_throughput.png": [(m, "examples_per_s", "examples / s") for m in MODES],
        "model_memory.png": [
            ("train", "saved_bytes_per_example", "bytes saved for backward / example"),
            ("train", "peak_memory_bytes", "peak memory / example (bytes)"),
        ],
    }
    for name, rows in panels.items():
        rows = [(m, key, label) for m, key, label in rows if any(r["mode"] == m and r.get(key) for r in ok)]
        if not rows or not dtypes:
            continue
        fig, axes = plt.subplots(
            len(rows),
            len(dtypes),
            figsize=(5 * len(dtypes), 3.4 * len(rows) + 0.5),
            squeeze=False,
            constrained_layout=True,
        )
        fig.suptitle(f"{data['environment']['device']}: {data['environment']['config']['model']}", fontsize=9)
        for i, (mode, key, label) in enumerate(rows):
            for j, dtype in enumerate(dtypes):
                ax = axes[i][j]
                for impl in impls:
                    pts = sorted(
                        (r["batch_size"], r[key] / (r["batch_size"] if key == "peak_memory_bytes" else 1))
                        for r in ok
                        if (r["implementation"], r["mode"], r["dtype"]) == (impl, mode, dtype) and r.get(key)
                    )
                    if pts:
                        color, marker = plot_results.style(impl, {"results": ok})
                        ax.plot(*zip(*pts, strict=True), marker=marker, color=color, label=impl, markersize=4)
                ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel=label, title=f"{mode}, {dtype}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written


if __name__ == "__main__":
    main()
