"""Plots and summaries drawn from the JSON written by ``bench/routing_sweep.py`` (data only:
nothing re-measured; the targets come from the JSON, or from the bench specs for files written
before the sweep recorded them).

    python bench/plot_results.py bench/results/amd-epyc/results.json [--out DIR]

writes ``throughput.png`` (examples/s against batch size, log-log, one line per implementation,
and on CUDA the memory-bound ceiling from the measured copy bandwidth), ``speedup.png`` (time of
eager / time of each implementation) and ``memory.png`` (peak memory per call), each with one
panel per (op, mode) row and dtype column, and prints the summary table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

#: Row and column order of known names; names the JSON holds beyond these follow in the order
#: they first appear (an op or implementation added to the registry needs no edit here).
OPS = ("layer", "routing", "squash")
MODES = ("forward", "forward+backward")
DTYPES = ("float32", "bfloat16", "float16")
IMPLEMENTATIONS = ("eager", "compile", "triton", "fused", "module")
#: one colour and marker per implementation across every figure; others cycle through the rest
STYLE = {
    "eager": ("tab:gray", "o"),
    "compile": ("tab:blue", "s"),
    "triton": ("tab:orange", "^"),
    "fused": ("tab:red", "D"),
    "module": ("tab:green", "v"),
    "port": ("black", "x"),
    "cudagraphs": ("tab:purple", "P"),
}
_SPARE_STYLES = [("tab:purple", "P"), ("tab:brown", "X"), ("tab:pink", "*"), ("tab:olive", "h"), ("tab:cyan", "<")]
SUMMARY_BATCH = 1024


def ordered(names, known) -> list[str]:
    """``names`` (any iterable) in the order of ``known``, unknown ones after, in first-seen order."""
    seen = list(dict.fromkeys(names))
    return [n for n in known if n in seen] + [n for n in seen if n not in known]


def style(impl: str, data: dict) -> tuple[str, str]:
    if impl in STYLE:
        return STYLE[impl]
    others = [i for i in ordered((r["implementation"] for r in data["results"]), IMPLEMENTATIONS) if i not in STYLE]
    return _SPARE_STYLES[others.index(impl) % len(_SPARE_STYLES)]


def targets(data: dict) -> list[dict]:
    """The targets the results are judged against: as the sweep recorded them, or for files
    written before it did, those of the registry's specs."""
    if data.get("targets"):
        return data["targets"]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import registry

    ops = {r["op"] for r in data["results"]}
    return [{"op": name, **vars(t)} for name, spec in registry.specs().items() if name in ops for t in spec.targets]


def device_slug(name: str) -> str:
    """A directory name for a device: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    name = re.sub(r"\((R|TM|tm|r)\)", "", name)
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.") or "unknown-device"


#: what every results row of routing_sweep.py holds
ROW_KEYS = ("op", "implementation", "mode", "dtype", "batch_size", "status")


def load(path: str | Path) -> dict:
    """A bench driver's results file (environment and results: routing_sweep.py's, model_bench.py's,
    layer_memory.py's); ValueError naming the file when it is not one, or not JSON."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("environment"), dict) or "results" not in data:
        raise ValueError(f"{path} is not a bench result (no environment/results)")
    return data


def load_sweep(path: str | Path) -> dict:
    """A routing_sweep.py results file, what the plots here draw; ValueError naming the file when it
    is another driver's (model_bench.py's draws its own plots) or no bench result."""
    data = load(path)
    config = data["environment"].get("config") or {}
    if "model" in config:
        raise ValueError(f"{path} is a model_bench.py result (model {config['model']!r}), not a routing_sweep.py one")
    rows = data["results"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) and all(k in r for k in ROW_KEYS) for r in rows):
        raise ValueError(f"{path} is not a routing_sweep.py result (rows without {', '.join(ROW_KEYS)})")
    return data


def _ok(data: dict) -> list[dict]:
    return [r for r in data["results"] if r["status"] == "ok"]


def summarize(data: dict, dtype: str = "float32", batch: int = SUMMARY_BATCH) -> list[dict]:
    """Per (op, mode, implementation) at ``batch`` (or the largest batch with an eager time):
    throughput, time, speedup over eager and over compile, peak memory relative to eager."""
    rows = [r for r in _ok(data) if r["dtype"] == dtype]
    out = []
    for op in ordered((r["op"] for r in data["results"]), OPS):
        for mode in MODES:
            group = [r for r in rows if r["op"] == op and r["mode"] == mode]
            eager_batches = {r["batch_size"] for r in group if r["implementation"] == "eager"}
            if not eager_batches:
                continue
            at_batch = batch if batch in eager_batches else max(eager_batches)
            at = {r["implementation"]: r for r in group if r["batch_size"] == at_batch}
            eager, compiled = at["eager"], at.get("compile")
            for impl in ordered(at, IMPLEMENTATIONS):
                r = at[impl]
                entry = {
                    "op": op,
                    "mode": mode,
                    "implementation": impl,
                    "dtype": dtype,
                    "batch_size": at_batch,
                    "examples_per_s": r["examples_per_s"],
                    "time_ms_median": r["time_ms_median"],
                    "speedup_vs_eager": eager["time_ms_median"] / r["time_ms_median"],
                    "speedup_vs_compile": None,
                    "memory_fraction_of_eager": None,
                }
                if compiled:
                    entry["speedup_vs_compile"] = compiled["time_ms_median"] / r["time_ms_median"]
                if eager.get("peak_memory_bytes") and r.get("peak_memory_bytes") is not None:
                    entry["memory_fraction_of_eager"] = r["peak_memory_bytes"] / eager["peak_memory_bytes"]
                out.append(entry)
    return out


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _fmt_ms(x) -> str:
    return "-" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def summary_markdown(data: dict, dtype: str = "float32", batch: int = SUMMARY_BATCH) -> str:
    """The summary as a Markdown table (for the notebook and the README)."""
    lines = [
        "| op | mode | implementation | batch | examples/s | ms | x eager | x compile | memory / eager |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in summarize(data, dtype, batch):
        lines.append(
            f"| {e['op']} | {e['mode']} | {e['implementation']} | {e['batch_size']} "
            f"| {_fmt(e['examples_per_s'], ',.0f')} | {_fmt_ms(e['time_ms_median'])} "
            f"| {_fmt(e['speedup_vs_eager'], '.2f')} | {_fmt(e['speedup_vs_compile'], '.2f')} "
            f"| {_fmt(e['memory_fraction_of_eager'], '.2f')} |"
        )
    return "\n".join(lines)


def target_lines(data: dict) -> list[str]:
    """One line per target: the value measured (at B = 1024, or the largest batch measured in
    eager) and whether it is met."""
    summaries = {}
    lines = []
    for t in targets(data):
        if t["dtype"] not in summaries:
            summaries[t["dtype"]] = summarize(data, t["dtype"])
        key = (t["op"], t["mode"], t["implementation"])
        entry = next((e for e in summaries[t["dtype"]] if (e["op"], e["mode"], e["implementation"]) == key), None)
        quantity, threshold = t["quantity"], t["threshold"]
        value = entry.get(quantity) if entry else None
        at_most = quantity == "memory_fraction_of_eager"
        want = f"{'<=' if at_most else '>='} {threshold:g}"
        if value is None:
            verdict, shown = "not measured", "-"
        else:
            met = value <= threshold if at_most else value >= threshold
            verdict, shown = ("met" if met else "NOT met"), f"{value:.4g}"
            if entry["batch_size"] != SUMMARY_BATCH:
                verdict += f" (at B={entry['batch_size']})"
        lines.append(
            f"  {t['op']:8s} {t['mode']:17s} {t['implementation']:8s} {t['dtype']:8s} {quantity:25s} "
            f"{want:>9s} {shown:>10s}  {verdict}  [{t['source']}]"
        )
    return lines


def targets_text(data: dict) -> str:
    """The targets met or not, then what was not measured and why."""
    out = ["Targets (from the bench specs; DESIGN.md section 5 and the issues):", *target_lines(data)]
    missing = {(r["implementation"], r["reason"]) for r in data["results"] if r["status"] != "ok"}
    out += [f"  not measured: {impl}: {reason}" for impl, reason in sorted(missing)]
    return "\n".join(out)


def summary_text(data: dict) -> str:
    """The end-of-sweep report: the float32 summary table, the targets, what was not measured."""
    summary = summarize(data)
    out = [
        f"Summary: float32 at B={SUMMARY_BATCH} (or the largest batch with an eager time) on "
        f"{data['environment']['device']}",
        f"  {'op':8s} {'mode':17s} {'impl':8s} {'batch':>5s} {'ex/s':>11s} {'ms':>9s} "
        f"{'x eager':>8s} {'x compile':>9s} {'mem/eager':>9s}",
    ]
    for e in summary:
        out.append(
            f"  {e['op']:8s} {e['mode']:17s} {e['implementation']:8s} {e['batch_size']:5d} "
            f"{_fmt(e['examples_per_s'], '11.4g')} {_fmt(e['time_ms_median'], '9.4g')} "
            f"{_fmt(e['speedup_vs_eager'], '8.3g')} {_fmt(e['speedup_vs_compile'], '9.3g')} "
            f"{_fmt(e['memory_fraction_of_eager'], '9.3g')}"
        )
    out.append(targets_text(data))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Figures


def _panels(data: dict):
    rows_present = {(r["op"], r["mode"]) for r in data["results"]}
    ops = ordered((r["op"] for r in data["results"]), OPS)
    rows = [(op, mode) for op in ops for mode in MODES if (op, mode) in rows_present]
    cols = ordered((r["dtype"] for r in data["results"]), DTYPES)
    return rows, cols


def _series(data: dict, op: str, mode: str, dtype: str, impl: str, key: str):
    pts = sorted(
        (r["batch_size"], r[key])
        for r in _ok(data)
        if (r["op"], r["mode"], r["dtype"], r["implementation"]) == (op, mode, dtype, impl) and r.get(key) is not None
    )
    return [p[0] for p in pts], [p[1] for p in pts]


def _figure(data: dict, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows, cols = _panels(data)
    fig, axes = plt.subplots(
        max(len(rows), 1),
        max(len(cols), 1),
        figsize=(max(4.6 * len(cols), 6.0), 3.4 * max(len(rows), 1) + 0.4),
        squeeze=False,
        constrained_layout=True,
    )
    env = data["environment"]
    cfg = env.get("config", {})
    shape = (
        f"N_in={cfg.get('n_in')} N_out={cfg.get('n_out')} D_in={cfg.get('d_in')} "
        f"D={cfg.get('d')} iterations={cfg.get('iterations')}"
    )
    fig.suptitle(f"{title}: {env['device']}\n{shape}; torch {env['torch']}", fontsize=9)
    panels = []
    for i, (op, mode) in enumerate(rows):
        for j, dtype in enumerate(cols):
            ax = axes[i][j]
            ax.set_title(f"{op}, {mode}, {dtype}", fontsize=9)
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xlabel("batch size")
            panels.append((ax, op, mode, dtype))
    return fig, panels


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _lines(ax, data, op, mode, dtype, key, transform=None, skip=()):
    drawn = False
    for impl in ordered((r["implementation"] for r in data["results"]), IMPLEMENTATIONS):
        if impl in skip:
            continue
        xs, ys = _series(data, op, mode, dtype, impl, key)
        if transform is not None:
            xs, ys = transform(impl, xs, ys)
        if xs:
            color, marker = style(impl, data)
            ax.plot(xs, ys, marker=marker, color=color, label=impl, markersize=4)
            drawn = True
    return drawn


def _no_data(ax, text="no measurement"):
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8, wrap=True)


def plot_throughput(data: dict, out: Path) -> Path:
    fig, panels = _figure(data, "Throughput")
    bandwidth = data["environment"].get("copy_bandwidth_bytes_per_s")
    for ax, op, mode, dtype in panels:
        drawn = _lines(ax, data, op, mode, dtype, "examples_per_s")
        if bandwidth:
            bound = {}
            for r in _ok(data):
                if (r["op"], r["mode"], r["dtype"]) == (op, mode, dtype) and r.get("min_bytes_per_example"):
                    bound[r["batch_size"]] = bandwidth / r["min_bytes_per_example"]
            if bound:
                xs = sorted(bound)
                ax.plot(
                    xs,
                    [bound[x] for x in xs],
                    "k--",
                    linewidth=1,
                    label=f"memory bound ({bandwidth / 1e9:.0f} GB/s copy)",
                )
        if drawn:
            ax.set_yscale("log")
            ax.set_ylabel("examples / s")
            ax.legend(fontsize=7)
        else:
            _no_data(ax)
    return _save(fig, out / "throughput.png")


def plot_speedup(data: dict, out: Path) -> Path:
    fig, panels = _figure(data, "Speedup over eager")
    for ax, op, mode, dtype in panels:
        eager = dict(zip(*_series(data, op, mode, dtype, "eager", "time_ms_median"), strict=True))

        def over_eager(impl, xs, ys, eager=eager):
            pts = [(x, eager[x] / y) for x, y in zip(xs, ys, strict=True) if x in eager]
            return [p[0] for p in pts], [p[1] for p in pts]

        drawn = _lines(ax, data, op, mode, dtype, "time_ms_median", over_eager, skip=("eager",))
        ax.axhline(1.0, color=STYLE["eager"][0], linestyle=":", linewidth=1)
        if drawn:
            ax.set_yscale("log")
            ax.set_ylabel("eager time / time")
            ax.legend(fontsize=7)
        else:
            _no_data(ax, "no implementation besides eager measured")
    return _save(fig, out / "speedup.png")


def plot_memory(data: dict, out: Path) -> Path:
    fig, panels = _figure(data, "Peak memory per call")
    note = data["environment"].get("memory_note", "")
    for ax, op, mode, dtype in panels:
        drawn = _lines(
            ax,
            data,
            op,
            mode,
            dtype,
            "peak_memory_bytes",
            lambda impl, xs, ys: (xs, [y / 2**20 for y in ys]),
        )
        if drawn:
            ax.set_yscale("log")
            ax.set_ylabel("MiB beyond inputs")
            ax.legend(fontsize=7)
        else:
            _no_data(ax, f"peak memory {note}" if note else "no measurement")
    return _save(fig, out / "memory.png")


def plot_all(data: dict, out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [plot_throughput(data, out), plot_speedup(data, out), plot_memory(data, out)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import harness

    p.add_argument("results", type=Path, help="results.json written by routing_sweep.py")
    p.add_argument(
        "--out", type=harness.output_folder, default=None, help="directory for the PNGs (default: beside the JSON)"
    )
    args = p.parse_args(argv)
    try:
        data = load_sweep(args.results)
    except (OSError, ValueError) as exc:
        p.error(str(exc))
    for path in plot_all(data, args.out or args.results.parent):
        print(f"wrote {path}")
    print(summary_text(data))


if __name__ == "__main__":
    main()
