"""bench/routing_sweep.py end to end on a CPU with a tiny configuration, and the plots and
summaries drawn from its JSON. Timings are never asserted: only the shape of the data."""

from __future__ import annotations

import inspect
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
            assert "layer only" in r["reason"]


def test_summary_and_plots_written(sweep):
    out, data, stdout = sweep
    assert "Targets (DESIGN.md section 5; routing forward+backward: issue 3)" in stdout
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


def test_tune_routing_runs_through_the_interpreter(tmp_path):
    """bench/tune_routing.py (run by gpu_check.sh) on CPU tensors: every configuration of both
    grids runs and is recorded (the times mean nothing here)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    args = ["--device", "cpu", "--batch-sizes", "2", "--shape", "7", "3", "5", "--tiles", "64", "1024"]
    args += ["--tiles-bwd", "32", "--target-programs", "1", "4", "--target-programs-bwd", "1", "8"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "tune_routing.py"), *args, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "tune_routing.json").read_text())["results"]
    got = {(r["mode"], r["tile"], r["tile_bwd"], r["target_programs"], r["target_programs_bwd"]) for r in rows}
    from capstriton.kernels.routing import routing_config

    default = {k: v.default for k, v in inspect.signature(routing_config).parameters.items()}
    fwd = {("forward", t, default["tile_bwd"], p, default["target_programs_bwd"]) for t in (64, 1024) for p in (1, 4)}
    bwd = {("forward+backward", default["tile"], 32, default["target_programs"], p) for p in (1, 8)}
    assert len(rows) == len(got) == 6 and got == fwd | bwd
    assert all(r["time_ms"] > 0 and r["batch_size"] == 2 for r in rows)
    # the ops' launches got the overridden parameters (recorded from inside ops.routing_config)
    for r in rows:
        asked = {k: r[k] for k in ("tile", "tile_bwd", "target_programs", "target_programs_bwd")}
        assert r["launch"] == routing_config(7, 3, 5, 2, **asked)
    assert {r["launch"]["BLOCK_I"] for r in rows if r["mode"] == "forward"} == {2, 8}
    assert {r["launch"]["SPLIT_BWD"] for r in rows if r["mode"] != "forward"} == {1, 4}
    # the row whose parameters resolve to the defaults' launch is marked, and only that one
    assert [r["default"] for r in rows] == [r["launch"] == routing_config(7, 3, 5, 2) for r in rows]


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
    lines = plot_results.target_lines(list(summary.values()))
    assert any("speedup_vs_eager" in line and line.rstrip().endswith(" met") for line in lines)
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
