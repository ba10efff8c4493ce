"""bench/routing_sweep.py end to end on a CPU with a tiny configuration, and the plots and
summaries drawn from its JSON. Timings are never asserted: only the shape of the data."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "bench" / "routing_sweep.py"
PLOT = REPO / "bench" / "plot_results.py"
sys.path.insert(0, str(REPO / "bench"))

import plot_results  # noqa: E402

TINY = ["--n-in", "8", "--n-out", "3", "--d-in", "4", "--d", "5", "--iterations", "2", "--quick"]
OPS = ["layer", "routing"]
IMPLS = ["eager", "triton", "fused"]
MODES = ["forward", "forward+backward"]
DTYPES = ["float32", "bfloat16"]
BATCHES = [1, 2]
ROW_FIELDS = {
    "implementation",
    "op",
    "mode",
    "dtype",
    "batch_size",
    "examples_per_s",
    "time_ms_median",
    "time_ms_p20",
    "time_ms_p80",
    "peak_memory_bytes",
    "compile_time_s",
    "status",
    "reason",
}
PNGS = ("throughput.png", "speedup.png", "memory.png")


def run_script(script: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    # The sweep must time real code: no Triton interpreter (the conftest may have set it).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    proc = run_script(
        SWEEP,
        "--device",
        "cpu",
        *TINY,
        "--batch-sizes",
        *map(str, BATCHES),
        "--op",
        *OPS,
        "--implementations",
        *IMPLS,
        "--modes",
        *MODES,
        "--dtypes",
        *DTYPES,
        "--out",
        str(out),
        "--no-progress",
    )
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def test_environment_names_device_versions_and_config(sweep):
    _, data, _ = sweep
    env = data["environment"]
    for key in ("device", "device_type", "torch", "triton", "python", "cuda", "config", "timing"):
        assert key in env
    assert env["device_type"] == "cpu" and env["device"]
    assert env["config"]["n_in"] == 8 and env["config"]["iterations"] == 2
    assert env["config"]["batch_sizes"] == BATCHES
    assert "not measured" in env["memory_note"]


def test_one_row_per_combination(sweep):
    _, data, _ = sweep
    rows = data["results"]
    keys = [(r["op"], r["implementation"], r["mode"], r["dtype"], r["batch_size"]) for r in rows]
    assert sorted(keys) == sorted(itertools.product(OPS, IMPLS, MODES, DTYPES, BATCHES))
    for r in rows:
        assert ROW_FIELDS <= r.keys()


def test_measured_rows_are_consistent(sweep):
    _, data, _ = sweep
    eager = [r for r in data["results"] if r["implementation"] == "eager"]
    assert len(eager) == len(OPS) * len(MODES) * len(DTYPES) * len(BATCHES)
    for r in eager:
        assert r["status"] == "ok", r
        assert r["reason"] is None
        assert r["examples_per_s"] > 0
        assert r["time_ms_p20"] <= r["time_ms_median"] <= r["time_ms_p80"]
        assert r["examples_per_s"] == pytest.approx(r["batch_size"] / (r["time_ms_median"] * 1e-3))
        assert r["compile_time_s"] >= 0
        assert r["peak_memory_bytes"] is None  # not measurable on CPU: null, never made up
        assert r["min_bytes_per_example"] > 0


def test_skipped_rows_have_reasons(sweep):
    _, data, _ = sweep
    assert not [r for r in data["results"] if r["status"] == "error"]
    for r in data["results"]:
        if r["implementation"] == "eager":
            continue
        assert r["status"] == "skipped" and r["reason"], r
        assert r["examples_per_s"] is None and r["time_ms_median"] is None
        if r["implementation"] == "triton":
            assert "CUDA" in r["reason"]
        if r["implementation"] == "fused" and r["op"] == "routing":
            assert "op routing has no implementation 'fused'" in r["reason"]


def test_summary_and_plots_written(sweep):
    out, data, stdout = sweep
    assert "Targets (from the bench specs" in stdout
    # the targets of the ops swept are recorded with the data
    assert {t["op"] for t in data["targets"]} == set(OPS)
    fields = {"mode", "implementation", "quantity", "threshold", "source", "dtype"}
    assert all(fields <= t.keys() for t in data["targets"])
    assert {(e["op"], e["mode"]) for e in data["summary"]} == set(itertools.product(OPS, MODES))
    assert all(e["speedup_vs_eager"] == 1.0 for e in data["summary"])
    for name in PNGS:
        assert is_png(out / name), name


def test_plot_script_redraws_from_json_alone(sweep, tmp_path):
    out, _, _ = sweep
    proc = run_script(PLOT, str(out / "results.json"), "--out", str(tmp_path), timeout=120)
    assert "Summary: float32" in proc.stdout
    for name in PNGS:
        assert is_png(tmp_path / name), name


def test_append_and_time_budget(sweep, tmp_path):
    out, data, _ = sweep
    (tmp_path / "results.json").write_text((out / "results.json").read_text())
    run_script(
        SWEEP,
        "--device",
        "cpu",
        *TINY,
        "--batch-sizes",
        "4",
        "--op",
        "routing",
        "--implementations",
        "eager",
        "--modes",
        "forward",
        "--out",
        str(tmp_path),
        "--append",
        "--time-budget",
        "0",
        "--no-plots",
        "--no-progress",
    )
    merged = json.loads((tmp_path / "results.json").read_text())
    assert merged["results"][: len(data["results"])] == data["results"]
    (new,) = merged["results"][len(data["results"]) :]
    assert (new["batch_size"], new["status"], new["reason"]) == (4, "skipped", "time budget exhausted")
    assert len(merged["environment"]["previous_runs"]) == 1

    # a point measured again replaces its row (it was appended beside it, one zigzag a batch size
    # in the plots); the other rows stay as they were, in order
    again = [*TINY, "--op", "routing", "--implementations", "eager", "--modes", "forward", "--dtypes", "float32"]
    run_script(SWEEP, "--device", "cpu", *again, "--batch-sizes", "1", "4", "--out", str(tmp_path), "--append",
               "--time-budget", "0", "--no-plots", "--no-progress")
    final = json.loads((tmp_path / "results.json").read_text())["results"]
    key = ("routing", "eager", "forward", "float32")
    assert len(final) == len(merged["results"])
    def of_key(rows, batches):
        return [r for r in rows if (r["op"], r["implementation"], r["mode"], r["dtype"]) == key
                and r["batch_size"] in batches]

    replaced = of_key(final, (1, 2, 4))
    assert sorted(r["batch_size"] for r in replaced) == [1, 2, 4]
    assert {r["batch_size"]: r["status"] for r in replaced} == {1: "skipped", 2: "ok", 4: "skipped"}
    assert of_key(final, (2,)) == of_key(merged["results"], (2,))
    others = [r for r in final if r not in of_key(final, (1, 4))]
    assert others == [r for r in merged["results"] if r not in of_key(merged["results"], (1, 4))]


def run_refused(script: Path, *args: str, env_extra: dict | None = None) -> str:
    """``script`` with ``args`` exits 2 with a one-line usage error, no traceback: its message."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=240,
                          env={**env, **(env_extra or {})}, cwd=REPO)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def test_append_refuses_results_of_other_sizes(sweep, tmp_path):
    """Rows do not record their sizes: appending points of other sizes to a file silently mixed
    them (found by break-testing: rows at N_in 512 and 32 in one file, the plot titled by the last)."""
    out, _, _ = sweep
    (tmp_path / "results.json").write_text((out / "results.json").read_text())
    other = [arg if arg != "8" else "9" for arg in TINY]  # --n-in 9
    proc = subprocess.run(
        [sys.executable, str(SWEEP), "--device", "cpu", *other, "--op", "routing", "--implementations", "eager",
         "--batch-sizes", "1", "--out", str(tmp_path), "--append", "--no-plots", "--no-progress"],
        capture_output=True, text=True, timeout=240, cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "holds points of other sizes (n_in 8 -> 9)" in proc.stderr
    assert (tmp_path / "results.json").read_text() == (out / "results.json").read_text()  # untouched


def test_drivers_refuse_bad_options_by_name(tmp_path, capsys):
    """A file where a folder is asked for, a negative time budget or memory cap, batch sizes and
    job counts below 1, tune grids of values below 1, another driver's JSON to plot: usage errors
    (exit 2) naming the option or file (they were tracebacks, or accepted: --batch-sizes 0 printed
    "0 ex/s" rows). Each driver's argument parsing, in this process; one whole script below."""
    import importlib

    afile = tmp_path / "afile"
    afile.write_text("")
    results = REPO / "bench" / "results"
    cases = [
        ("routing_sweep", "parse_args", ["--out", str(afile)], "argument --out"),
        ("routing_sweep", "parse_args", ["--out", str(afile / "below")], "argument --out"),
        ("routing_sweep", "parse_args", ["--time-budget", "-5"], "argument --time-budget: must be a finite number"),
        ("routing_sweep", "parse_args", ["--batch-sizes", "0"], "argument --batch-sizes: must be >= 1"),
        ("model_bench", "parse_args", ["--memory-cap", "-5"], "argument --memory-cap"),
        ("model_bench", "parse_args", ["--out", str(afile)], "argument --out"),
        ("layer_memory", "parse_args", ["--out", str(afile)], "argument --out"),
        ("layer_memory", "parse_args", ["--batch-sizes", "-1"], "argument --batch-sizes: must be >= 1"),
        ("kernel_report", "main", ["--jobs", "0"], "argument --jobs: must be >= 1"),
        ("kernel_report", "main", ["--out", str(afile)], "argument --out"),
        ("issue_model", "main", ["--jobs", "-2"], "argument --jobs: must be >= 1"),
        ("tune", "parse_args", ["--batch-sizes", "0"], "argument --batch-sizes: must be >= 1"),
        ("tune", "parse_args", ["--set", "tile=0"], "values must be integers >= 1 or None"),
        ("tune", "parse_args", ["--set", "tile="], "--set takes KEY=V1,V2"),
        ("tune", "parse_args", ["--out", str(afile)], "argument --out"),
        ("plot_results", "main", [str(afile), "--out", str(tmp_path)], "is not JSON"),
        ("plot_results", "main", [str(tmp_path / "missing.json")], "No such file"),
        ("plot_results", "main", [str(results / "amd-epyc/model_bench/results.json"), "--out", str(tmp_path)],
         "is a model_bench.py result"),
        ("plot_results", "main",
         [str(results / "layer_memory/digitcaps_1152x10x16x8/results.json"), "--out", str(tmp_path)],
         "is not a routing_sweep.py result"),
    ]
    for module, function, args, message in cases:
        with pytest.raises(SystemExit) as info:
            getattr(importlib.import_module(module), function)(args)
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err, (module, args, err)
    assert not list(tmp_path.glob("*.png"))  # nothing drawn
    # the whole script: one line of usage error, no traceback
    err = run_refused(SWEEP, "--out", str(afile))
    assert f"argument --out: {str(afile)!r} cannot be a folder: {str(afile)!r} exists and is not one" in err


def test_sweep_order_float32_first_then_half_types_interleaved():
    import routing_sweep

    argv = ["--op", "routing", "layer", "--modes", "forward", "--implementations", "eager", "triton"]
    args = routing_sweep.parse_args([*argv, "--dtypes", "float16", "bfloat16", "float32"])
    order = [(op, impl, dtype) for op, impl, _, dtype, _ in routing_sweep.sweep_points(args, [1])]
    assert len(order) == len(set(order)) == 2 * 2 * 3
    assert {dtype for _, _, dtype in order[:4]} == {"float32"}
    # a budget cut after four half-precision groups has measured both half types on routing
    assert order[4:8] == [
        ("routing", "eager", "float16"),
        ("routing", "eager", "bfloat16"),
        ("routing", "triton", "float16"),
        ("routing", "triton", "bfloat16"),
    ]


def test_tune_runs_through_the_interpreter(tmp_path):
    """bench/tune.py (run by gpu_check.sh) on CPU tensors: every configuration of both grids runs
    and is recorded with the launch it resolved to (the times mean nothing here)."""
    from capstriton.ops.dynamic_routing import RoutingTuning, routing_config

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    args = ["--op", "routing", "--device", "cpu", "--batch-sizes", "2", "--n-in", "7", "--n-out", "3", "--d", "5"]
    args += ["--set", "tile=64,1024", "tile_bwd=32", "target_programs=1,4", "target_programs_bwd=1,8"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "tune.py"), *args, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "tune_routing.json").read_text())["results"]
    knobs = ("tile", "target_programs", "tile_bwd", "target_programs_bwd")
    got = {(r["mode"], *(r.get(k) for k in knobs)) for r in rows}
    fwd = {("forward", t, p, None, None) for t in (64, 1024) for p in (1, 4)}
    bwd = {("forward+backward", None, None, 32, p) for p in (1, 8)}
    assert len(rows) == len(got) == 6 and got == fwd | bwd
    assert all(r["time_ms"] > 0 and r["batch_size"] == 2 for r in rows)
    # each row records the launch its parameters resolve to, passed to the op explicitly
    for r in rows:
        asked = {k: r[k] for k in knobs if r.get(k) is not None}
        assert r["launch"] == dataclasses.asdict(routing_config(7, 3, 5, 2, RoutingTuning(**asked)))
    assert {r["launch"]["fwd"]["block_i"] for r in rows if r["mode"] == "forward"} == {2, 8}
    assert {r["launch"]["bwd"]["split"] for r in rows if r["mode"] != "forward"} == {1, 4}
    # the row whose parameters resolve to the defaults' launch is marked, and only that one
    default = dataclasses.asdict(routing_config(7, 3, 5, 2))
    assert [r["default"] for r in rows] == [r["launch"] == default for r in rows]


def test_tune_repeated_sets_and_a_failing_grid_point(tmp_path):
    """Two --set options both apply (the first was dropped), and a grid point that cannot launch
    (3 warps a program) is a row saying why, where a traceback ended the run."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    args = ["--op", "routing", "--device", "cpu", "--batch-sizes", "2", "--n-in", "7", "--n-out", "3", "--d", "5",
            "--modes", "forward", "--set", "num_warps=4,3", "--set", "tile=1000", "target_programs=4"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "tune.py"), *args, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "tune_routing.json").read_text())["results"]
    assert [(r["tile"], r["target_programs"], r["num_warps"]) for r in rows] == [(1000, 4, 4), (1000, 4, 3)]
    ok, failed = rows
    assert ok["error"] is None and ok["time_ms"] > 0 and ok["launch"]["fwd"]["split"] >= 1
    assert failed["time_ms"] is None and failed["launch"] is None
    assert failed["error"] == "ValueError: RoutingTuning.num_warps must be a power of two from 1 to 32, or None, got 3"
    assert "failed: " + failed["error"] in proc.stdout
    assert ok["launch"]["fwd"]["block_i"] == 8  # a tile of 1000 elements, capped at N_in's power of two


def test_layer_tune_knobs_reach_the_recorded_launch():
    """Every value of every knob in the layer's tune grid resolves to its own launch at the paper's
    layer and B = 1024: tune.py's rows tell them apart and mark only the defaults' as default."""
    import harness

    spec = harness.import_registry().get("layer")
    sizes = {"n_in": 1152, "n_out": 10, "d": 16, "d_in": 8, "iterations": 3, "grad_through_routing": True}
    for grid in spec.tune.knobs.values():
        for knob, values in grid.items():
            launches = [json.dumps(spec.tune.launch(sizes, 1024, {knob: v}), sort_keys=True) for v in values]
            assert len(set(launches)) == len(values), knob


def test_every_spec_runs_its_eager_implementation():
    """Each op in the registry (bench/specs/) builds inputs and runs eagerly with the declared
    output shape; its bytes, FLOPs and targets are well formed. Adding an op adds a spec only."""
    import harness
    import torch

    registry = harness.import_registry()
    specs = registry.specs()
    assert {"routing", "layer", "squash"} <= set(specs)
    sizes = {"n_in": 7, "n_out": 3, "d_in": 4, "d": 5, "iterations": 2, "grad_through_routing": True}
    for name, spec in specs.items():
        fn, params = spec.implementations["eager"](sizes, torch.device("cpu"), torch.float32)
        inputs = spec.make_inputs(sizes, 2, torch.device("cpu"), torch.float32, False, torch.Generator().manual_seed(0))
        assert fn(*inputs).shape == spec.output_shape(sizes, 2), name
        for mode in ("forward", "forward+backward"):
            assert spec.min_bytes_per_example(sizes, torch.float32, mode, 2) > 0
            assert spec.flops_per_example(sizes, mode) > 0
        for target in spec.targets:
            assert target.implementation in spec.implementations and target.mode in ("forward", "forward+backward")


def test_sweep_runs_from_a_checkout_that_is_not_installed(tmp_path):
    """Without site's .pth files the installed (editable) capstriton is invisible: the bench
    scripts import the checkout, kernels/ included as capstriton.kernels."""
    import sysconfig

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]  # torch and friends, no .pth processing
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['routing_sweep.py', '--device', 'cpu', '--op', 'routing', '--implementations', 'eager',"
        f" '--batch-sizes', '1', '--n-in', '3', '--n-out', '2', '--d', '4', '--quick', '--no-plots',"
        f" '--no-progress', '--out', {str(tmp_path)!r}]\n"
        f"runpy.run_path({str(SWEEP)!r}, run_name='__main__')\n"
        "import capstriton, capstriton.kernels\n"
        "print('FROM', capstriton.__file__, capstriton.kernels.__file__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    where = [Path(p).resolve() for p in proc.stdout.split("FROM", 1)[1].split()]
    assert where == [REPO / "capstriton" / "__init__.py", REPO / "kernels" / "__init__.py"]
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["status"] for r in rows] == ["ok", "ok"]  # forward, forward+backward


def _row(impl, op, mode, batch, ms, mem=None, dtype="float32"):
    return {
        "implementation": impl,
        "op": op,
        "mode": mode,
        "dtype": dtype,
        "batch_size": batch,
        "examples_per_s": batch / (ms * 1e-3),
        "time_ms_median": ms,
        "time_ms_p20": ms,
        "time_ms_p80": ms,
        "peak_memory_bytes": mem,
        "compile_time_s": 0.0,
        "status": "ok",
        "reason": None,
    }


def test_summarize_ratios_and_targets():
    data = {
        "environment": {"device": "test device"},
        "results": [
            _row("eager", "routing", "forward", 1024, 10.0, mem=400),
            _row("compile", "routing", "forward", 1024, 4.0, mem=300),
            _row("triton", "routing", "forward", 1024, 1.0, mem=100),
            _row("eager", "routing", "forward", 512, 1.0),  # another batch: not in the summary
            _row("eager", "layer", "forward", 64, 8.0),  # no 1024: the largest batch is used
            _row("triton", "layer", "forward", 64, 2.0),
        ],
    }
    summary = {(e["op"], e["implementation"]): e for e in plot_results.summarize(data)}
    triton = summary["routing", "triton"]
    assert triton["batch_size"] == 1024
    assert triton["speedup_vs_eager"] == pytest.approx(10.0)
    assert triton["speedup_vs_compile"] == pytest.approx(4.0)
    assert triton["memory_fraction_of_eager"] == pytest.approx(0.25)
    assert summary["layer", "triton"]["batch_size"] == 64
    assert summary["layer", "triton"]["speedup_vs_compile"] is None
    lines = plot_results.target_lines(data)  # no targets in the file: the registry's
    assert any("speedup_vs_eager" in line and "  met  [DESIGN.md section 5]" in line for line in lines)
    assert any("fused" in line and "not measured" in line for line in lines)
    table = plot_results.summary_markdown(data)
    assert table.count("\n") == 1 + len(summary)


def test_device_slug():
    assert plot_results.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert plot_results.device_slug("Intel(R) Xeon(R) CPU @ 2.20GHz") == "intel-xeon-cpu-2.20ghz"


@pytest.mark.slow
def test_compile_implementation_on_cpu(tmp_path):
    """torch.compile of the reference runs in the sweep (slow: a C++ compile on the CPU)."""
    run_script(
        SWEEP,
        "--device",
        "cpu",
        *TINY,
        "--batch-sizes",
        "2",
        "--op",
        "routing",
        "--implementations",
        "eager",
        "compile",
        "--modes",
        "forward",
        "--out",
        str(tmp_path),
        "--no-plots",
        "--no-progress",
        timeout=600,
    )
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    (compiled,) = [r for r in rows if r["implementation"] == "compile"]
    assert compiled["status"] == "ok", compiled
    assert compiled["examples_per_s"] > 0 and compiled["compile_time_s"] > 0
