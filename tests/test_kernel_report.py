"""bench/kernel_report.py: every default launch configuration compiles for sm_90 without a GPU and
none spills; the JSON carries the documented fields. The report runs in a subprocess without
TRITON_INTERPRET (conftest switches the interpreter on in this process when there is no GPU,
and the compiler must not see it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REPORT = REPO / "bench" / "kernel_report.py"
sys.path.insert(0, str(REPO / "bench"))

import kernel_report  # noqa: E402


#: every kernel the library has: the report must compile each of them (an algorithm's spec in
#: bench/specs/ declares the cases that launch its kernels)
def _library_kernels() -> set[str]:
    import importlib
    import pkgutil

    import capstriton.kernels as package

    modules = [importlib.import_module(f"capstriton.kernels.{m.name}") for m in pkgutil.iter_modules(package.__path__)]
    return {name for module in modules for name in getattr(module, "__all__", ()) if name.endswith("_kernel")}


KERNELS = _library_kernels()
ENTRY_FIELDS = {
    "arch": str,
    "kernel": str,
    "dtype": str,
    "blocks": dict,
    "constexprs": dict,
    "signature": dict,
    "divisibility": dict,
    "specialised": list,
    "cases": list,
    "num_warps": int,
    "num_stages": int,
    "registers": int,
    "spill_stores": int,
    "spill_loads": int,
    "stack": int,
    "local": int,
    "shared": int,
    "dynamic_shared": int,
    "static_shared": int,
    "blocks_per_sm": int,
    "warps_per_sm": int,
    "occupancy": float,
    "limiter": str,
    "sass": dict,
    "compile_s": float,
    "compile_key": str,
}
SASS_FIELDS = {"total", "FFMA", "FMUL", "FADD", "MMA", "MUFU", "SHFL", "LDS", "STS", "LDL", "STL", "BAR"} | {
    f"{k}.{w}" for k in ("LDG", "STG") for w in (128, 64, 32, 16, 8)
}


def _has_nvidia_tools() -> bool:
    try:
        return all(os.path.exists(kernel_report._tool(t)) for t in ("ptxas", "cuobjdump"))
    except Exception:
        return False


def run_report(out: Path, env: dict | None = None, *args: str) -> subprocess.CompletedProcess:
    """``kernel_report.py --arch sm_90 --fail-on-spill`` and ``args``, JSON into ``out``, in a
    subprocess with ``env`` (default: this one's without TRITON_INTERPRET)."""
    env = dict(env or {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    return subprocess.run(
        [sys.executable, str(REPORT), "--arch", "sm_90", "--out", str(out), "--fail-on-spill", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )


#: the committed reports (``--reuse``: a configuration whose triton compile key is found there is
#: that very compilation, so its results are not read again; a kernel changed since compiles anew)
COMMITTED = REPO / "bench" / "results" / "kernel_report"


@pytest.fixture(scope="module")
def sm90_report(tmp_path_factory):
    if not _has_nvidia_tools():
        pytest.skip("triton's NVIDIA backend tools (ptxas, cuobjdump) are not installed")
    out = tmp_path_factory.mktemp("kernel_report")
    return run_report(out, None, "--reuse", str(COMMITTED / "sm_90.json")), out


def test_every_default_configuration_compiles_for_sm90_without_spills(sm90_report):
    proc, out = sm90_report
    # --fail-on-spill: exit status 1 on a spill that no SPILL_EXCEPTIONS entry documents
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((out / "sm_90.json").read_text())
    exceptions = kernel_report.spill_exceptions()
    for entry in doc["kernels"]:
        if entry["kernel"] in exceptions:
            continue
        where = f"{entry['kernel']} {entry['blocks']} {entry['dtype']} warps={entry['num_warps']}"
        assert entry["spill_stores"] == entry["spill_loads"] == 0, where
        assert entry["local"] == 0 and entry["sass"]["LDL"] == entry["sass"]["STL"] == 0, where
    assert "distinct compilations" in proc.stdout and "regs" in proc.stdout


def test_compile_key_is_the_one_triton_compiles_under():
    """--reuse takes a configuration's results from an earlier report where its ``compile_key``
    matches: the key computed without compiling must be the hash ``triton.compile`` gives the
    kernel it compiles (triton's own cache key), for another kernel, other constexprs or another
    target a different one."""
    code = (
        "import json, kernel_report as k\n"
        "case = [c for c in k.shape_sets()['odd'] if c.label.startswith('layer 7x1x16x1')]\n"
        "kernels, backend = k._kernels(), k.backend_cls()\n"
        "comps = {k._key(c): c for c in (k.compilation_of(l, kernels, backend) for l in k.record_launches(case))}\n"
        "comps = sorted(comps.values(), key=lambda c: c['kernel'])[:2]\n"
        "print(json.dumps([[k.compile_key(c, a), k.compile_one(c, a)['compile_key']]\n"
        "                  for c in comps for a in ('sm_90', 'sm_80')]))\n"
    )
    pairs = _run_in_bench(code)
    assert len(pairs) == 4 and all(before == compiled for before, compiled in pairs), pairs
    assert len({key for key, _ in pairs}) == 4


def test_reuse_takes_only_entries_this_script_would_write(tmp_path):
    """--reuse takes an entry by its compile key only from a report of the same architecture
    written by the same version of the script's own analysis (``report_key``: occupancy rule,
    limits, SASS counts), and only with every field; anything else is compiled again, and a file
    that is no report is an error naming it."""
    entry = {k: f"value of {k}" for k in kernel_report.RESULT_FIELDS} | {"compile_key": "k1"}
    partial = {k: v for k, v in entry.items() if k != "sass"} | {"compile_key": "k2"}

    def report(name, **doc):
        path = tmp_path / name
        path.write_text(json.dumps({"arch": "sm_90", "report_key": kernel_report.report_key(),
                                    "kernels": [entry, partial], **doc}))
        return str(path)

    current = report("current.json")
    assert kernel_report.reusable([current], "sm_90") == {"k1": entry}
    assert kernel_report.reusable([current], "sm_80") == {}
    assert kernel_report.reusable([report("older.json", report_key="another")], "sm_90") == {}
    assert kernel_report.reusable([report("unkeyed.json", report_key=None)], "sm_90") == {}
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="list.json: not a kernel report"):
        kernel_report.reusable([str(tmp_path / "list.json")], "sm_90")


def test_report_json_fields(sm90_report):
    _, out = sm90_report
    doc = json.loads((out / "sm_90.json").read_text())
    assert doc["arch"] == "sm_90" and doc["report_key"] == kernel_report.report_key()
    assert doc["limits"]["regs_per_sm"] == 65536 and doc["limits"]["max_warps_per_sm"] == 64
    assert {"triton", "python"} <= set(doc["versions"])
    assert doc["launches"] >= len(doc["kernels"]) > 0
    assert {e["kernel"] for e in doc["kernels"]} == KERNELS
    keys = set()
    for entry in doc["kernels"]:
        for name, ty in ENTRY_FIELDS.items():
            assert isinstance(entry[name], ty), (name, entry[name])
        assert set(entry["sass"]) == SASS_FIELDS
        assert entry["arch"] == "sm_90" and entry["dtype"] in ("fp32", "fp16", "bf16")
        assert 1 <= entry["registers"] <= 255 and entry["num_warps"] in (1, 2, 4, 8, 16, 32)
        assert 0 < entry["warps_per_sm"] <= 64 and entry["warps_per_sm"] % entry["num_warps"] == 0
        assert entry["occupancy"] == pytest.approx(entry["warps_per_sm"] / 64)
        assert entry["limiter"] in ("warps", "blocks", "registers", "shared")
        assert entry["shared"] == entry["dynamic_shared"] + entry["static_shared"]
        assert entry["cases"] and entry["sass"]["total"] > 0
        key = json.dumps(
            [entry["kernel"], entry["signature"], entry["constexprs"], entry["divisibility"], entry["num_warps"]],
            sort_keys=True,
        )
        assert key not in keys, f"duplicate compilation {key}"
        keys.add(key)


def test_digitcaps_u_hat_loads_are_128_bit(sm90_report):
    """The kernels that stream u_hat [B, 1152, 10, 16] read it with 128-bit loads in every dtype
    (contiguous D = 16 rows, strides divisible by 16): scalar loads would cost bandwidth."""
    _, out = sm90_report
    doc = json.loads((out / "sm_90.json").read_text())
    streaming = {"dynamic_routing_fwd_kernel", "dynamic_routing_bwd_reduce_kernel", "dynamic_routing_bwd_final_kernel"}
    seen = 0
    for entry in doc["kernels"]:
        if entry["kernel"] in streaming and any("1152x10x16" in c for c in entry["cases"]):
            assert entry["sass"]["LDG.128"] > 0, (entry["kernel"], entry["dtype"], entry["sass"])
            seen += 1
    assert seen >= 3 * 5  # forward (2 variants), reduce, final (2 variants) in three dtypes


def test_layer_products_run_on_tensor_cores(sm90_report):
    """The prediction products of the fused layer and of self-attention routing's layer form on
    the paper's layer size: tensor-core instructions (HMMA/HGMMA) in the forward and backward
    passes for float16/bfloat16 and for float32 as TF32 or 3xTF32 ("highest"); IEEE float32 on
    the CUDA cores (no MMA: its products are FMAs); self-attention's final backward pass
    multiplies float32 in IEEE whatever the setting."""
    _, out = sm90_report
    doc = json.loads((out / "sm_90.json").read_text())
    # (forward passes, reduce passes, final passes): the fused layer's passes on tensor cores are
    # its uniform sums (iteration 0), logits and sums kernels (":grad" in the backward) and its
    # bwd_input / bwd_weight kernels; with IEEE products it runs over tiles of predictions
    # (rank-one, no PRECISION argument)
    logits, sums, uniform = "fused_layer_logits_kernel", "fused_layer_sums_kernel", "fused_layer_uniform_sums_kernel"
    # the bfloat16 forward's coupled sums (coefficients and sums in one pass) count as its sums pass
    coupled = "fused_layer_coupled_sums_kernel"
    layers = {
        "fused_layer": (
            ("fused_layer_fwd_kernel", uniform, logits, sums),
            ("fused_layer_bwd_reduce_kernel", f"{logits}:grad", f"{sums}:grad"),
            ("fused_layer_bwd_final_kernel", "fused_layer_bwd_input_kernel", "fused_layer_bwd_weight_kernel"),
        ),
        "self_attention": (
            ("self_attention_routing_fwd_kernel",),
            ("self_attention_routing_bwd_reduce_kernel",),
            ("self_attention_routing_bwd_final_kernel",),
        ),
    }
    passes = {k for group in layers.values() for names in group for k in names}
    seen = set()
    for entry in doc["kernels"]:
        products = entry["constexprs"].get("FROM_U", True)  # self-attention on u_hat has none
        name = (sums if entry["kernel"] == coupled else entry["kernel"]) + (
            ":grad" if entry["constexprs"].get("GRAD") else "")
        if name not in passes or not products or not any("1152x10x16x8" in c for c in entry["cases"]):
            continue
        precision = entry["constexprs"].get("PRECISION", "ieee")
        tensor_cores = entry["dtype"] != "fp32" or precision != "ieee"
        assert (entry["sass"]["MMA"] > 0) == tensor_cores, (name, entry["dtype"], precision, entry["sass"])
        seen.add((name, entry["dtype"], precision))
    # every pass: bfloat16, and float32 at every precision (self-attention's final pass: bfloat16
    # and float32, always in IEEE)
    # both layers run float16 inputs as float32 at 3xTF32 (capstriton/ops/fused_layer.py,
    # float16_as_float32): float16 only as the fused layer's input gradient, which its bwd_input
    # kernel writes (a compilation labelled fp16 by that pointer)
    fused = {("bf16", "ieee")} | {("fp32", p) for p in ("ieee", "tf32", "tf32x3")}
    as_float32 = {"fused_layer_bwd_input_kernel": {("fp16", "tf32x3")}}
    for name, (forward, reduce, final) in layers.items():
        assert {(d, p) for k, d, p in seen if k in forward} == fused, sorted(seen)
        assert {(d, p) for k, d, p in seen if k in reduce} == fused, sorted(seen)
        finals = {(d, p) for k, d, p in seen if k in final}
        ieee = {("bf16", "ieee"), ("fp32", "ieee")}
        assert finals == (fused | as_float32["fused_layer_bwd_input_kernel"] if name == "fused_layer" else ieee)
    # the fused layer: IEEE products in the passes over tiles of predictions, the others on tensor
    # cores in input-capsule space, in both directions
    over_predictions = ("fused_layer_fwd_kernel", "fused_layer_bwd_reduce_kernel", "fused_layer_bwd_final_kernel")
    assert {(k, "fp32", "ieee") for k in over_predictions} <= seen
    chunked = (uniform, logits, sums, f"{logits}:grad", f"{sums}:grad", *layers["fused_layer"][2][1:])
    for kernel in chunked:
        expected = fused - {("fp32", "ieee")} | as_float32.get(kernel, set())
        assert {(d, p) for k, d, p in seen if k == kernel} == expected, sorted(seen)


def test_logits_sum_over_components_stays_in_thread(sm90_report):
    """The fused layer's logits pass orders chunks of 8 capsules or more component-major, so that
    the sum over each capsule's D_in components stays in one thread of the MMA accumulator: no
    shuffles in the logits kernel of the paper's layer (D_in 8) and of the 4D-input case (chunks of
    8 capsules of 4 components), forward and backward, in every dtype and precision on tensor
    cores (ordered capsule-major the paper's layer took 32 forward and 64 backward); nor in the
    bfloat16 forward's coupled sums, which form the logits the same way."""
    _, out = sm90_report
    doc = json.loads((out / "sm_90.json").read_text())
    layers = ("layer 1152x10x16x8 ", "layer 37x10x16x4 ")
    coupled = [e for e in doc["kernels"] if e["kernel"] == "fused_layer_coupled_sums_kernel"
               and any(c.startswith(x) for c in e["cases"] for x in layers)]
    assert coupled and all(e["sass"]["SHFL"] == 0 for e in coupled), [e["sass"] for e in coupled]
    seen = set()
    for entry in doc["kernels"]:
        layer = next((x for x in layers if any(c.startswith(x) for c in entry["cases"])), None)
        if entry["kernel"] != "fused_layer_logits_kernel" or layer is None:
            continue
        consts = entry["constexprs"]
        assert consts["BLOCK_IC"] >= 8 and consts["BLOCK_KIN"] > 1, (layer, consts)
        assert entry["sass"]["SHFL"] == 0, (layer, entry["dtype"], consts, entry["sass"])
        seen.add((layer, entry["dtype"], consts["PRECISION"], consts["GRAD"]))
    precisions = {layers[0]: {("bf16", "ieee"), ("fp32", "tf32"), ("fp32", "tf32x3")}}  # float16: as float32
    precisions[layers[1]] = {("bf16", "ieee"), ("fp32", "tf32x3")}
    expected = {(x, d, p, g) for x, ps in precisions.items() for d, p in ps for g in (False, True)}
    assert seen == expected, sorted(seen)


def _run_in_bench(code: str):
    """What ``code`` prints as JSON, run in ``bench/`` in a process without the interpreter (under
    which the ops launch kernels directly instead of recording them)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO / "bench", timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_config_overrides_reach_the_recorded_launches():
    """--config: the launches recorded for a candidate use its parameters (no compilation; in a
    process without the interpreter, under which the ops launch kernels directly)."""
    code = (
        "import json, kernel_report as k\n"
        "case = [c for c in k.shape_sets()['digitcaps'] if c.label == 'routing 1152x10x16 B=64 R=3 float32']\n"
        "print(json.dumps([{l.kernel: l.kwargs.get('BLOCK_I') for l in k.record_launches(case, c)}\n"
        "                  for c in ({}, {'tile': 4096, 'tile_bwd': 512})]))\n"
    )
    default, forced = _run_in_bench(code)
    assert default["dynamic_routing_fwd_kernel"] == 4 and default["dynamic_routing_bwd_final_kernel"] == 8
    assert forced["dynamic_routing_fwd_kernel"] == 16 and forced["dynamic_routing_bwd_final_kernel"] == 2
    # each op takes its own knobs of a mixed --config (break-testing: the fused layer's got the
    # routing's tile_bwd, a TypeError)
    code = (
        "import json, kernel_report as k\n"
        "cases = [c for c in k.shape_sets()['digitcaps'] if c.label in ('routing 1152x10x16 B=64 R=3 float32',\n"
        "         'layer 1152x10x16x8 B=1024 R=3 bfloat16')]\n"
        "print(json.dumps({l.kernel: l.kwargs.get('BLOCK_I', l.kwargs.get('BLOCK_B'))\n"
        "                  for l in k.record_launches(cases, {'tile_bwd': 512, 'fwd_examples': 32})}))\n"
    )
    mixed = _run_in_bench(code)
    assert mixed["dynamic_routing_bwd_final_kernel"] == 2 and mixed["fused_layer_logits_kernel"] == 32


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "tiles=4096"], "KEY must be one of"),  # not a launch parameter of any op
        (["--specs", "squash", "--config", "tile=4"], "KEY must be one of [] (the launch knobs of --specs squash)"),
        (["--specs", "routing", "--config", "tile=0"], "tile must be >= 1, got '0'"),
        (["--specs", "routing", "--config", "num_warps=3"], "num_warps must be a power of two from 1 to 32"),
        (["--specs", "routing", "--config", "tile=²"], "tile must be an int, got '²'"),
    ],
)
def test_config_is_checked_against_the_chosen_specs(argv, message, capsys):
    with pytest.raises(SystemExit):
        kernel_report.main(argv)
    assert message in capsys.readouterr().err


def test_as_compiled_keeps_only_the_options_torch_compile_passes_on():
    """--as-compiled: the same compilation without maxnreg and enable_fp_fusion (which the final
    backward passes and every launch set), with the warps and stages kept."""
    code = (
        "import json, kernel_report as k\n"
        "case = [c for c in k.shape_sets()['odd'] if c.label.startswith('layer 7x1x5x1')]\n"
        "kernels, backend = k._kernels(), k.backend_cls()\n"
        "comps = [k.compilation_of(l, kernels, backend) for l in k.record_launches(case)]\n"
        "print(json.dumps([[c['options'], k.as_compiled(c)['options']] for c in comps]))\n"
    )
    pairs = _run_in_bench(code)
    assert pairs and any("maxnreg" in launched for launched, _ in pairs)
    for launched, compiled in pairs:
        assert launched["enable_fp_fusion"] is True
        assert "maxnreg" not in compiled and "enable_fp_fusion" not in compiled
        assert compiled == {k: launched[k] for k in ("num_warps", "num_stages") if k in launched}
        assert "num_warps" in compiled


def test_occupancy_arithmetic():
    # 255 registers round up to 8192 per warp: 8 warps fit, i.e. two blocks of 4 warps
    occ = kernel_report.occupancy("sm_90", registers=255, num_warps=4, shared_bytes=0)
    assert (occ["warps_per_sm"], occ["blocks_per_sm"], occ["limiter"]) == (8, 2, "registers")
    occ = kernel_report.occupancy("sm_90", registers=32, num_warps=4, shared_bytes=0)
    assert (occ["warps_per_sm"], occ["occupancy"], occ["limiter"]) == (64, 1.0, "warps")
    # 100 KB of shared memory a block (+1 KB reserved): two blocks on sm_90 (228 KB), one on sm_80
    occ90 = kernel_report.occupancy("sm_90", registers=32, num_warps=4, shared_bytes=100 * 1024)
    occ80 = kernel_report.occupancy("sm_80", registers=32, num_warps=4, shared_bytes=100 * 1024)
    assert (occ90["blocks_per_sm"], occ80["blocks_per_sm"]) == (2, 1)
    assert occ80["limiter"] == "shared"


def test_sass_counts_widths_and_predicates():
    sass = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/               @P0 LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/              @!P1 LDG.E.64 R8, desc[UR4][R6.64] ;
        /*0030*/                   LDG.E R10, desc[UR4][R6.64] ;
        /*0040*/                   LDG.E.U16 R11, desc[UR4][R6.64] ;
        /*0050*/                   FFMA R0, R1, R2, R3 ;
        /*0060*/                   MUFU.EX2 R0, R0 ;
        /*0070*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ ;
        /*0080*/               @P2 STG.E.128 desc[UR4][R2.64], R4 ;
        /*0090*/                   STL [R1], R0 ;
        /*00a0*/                   LDL R0, [R1] ;
    """
    c = kernel_report.sass_counts(sass)
    assert c["total"] == 11
    assert (c["LDG.128"], c["LDG.64"], c["LDG.32"], c["LDG.16"]) == (1, 1, 1, 1)
    assert (c["FFMA"], c["MUFU"], c["MMA"], c["STG.128"], c["LDL"], c["STL"]) == (1, 1, 1, 1, 1, 1)


def test_blocks_column_names_every_kernels_blocks():
    """The table's blocks column: routing's I/J/D, and every BLOCK constexpr of the other kernels
    (break-testing: the fused layer's passes showed "JNone DNone", so their rows and spills could
    not be told apart)."""
    assert kernel_report._blocks({"constexprs": {"BLOCK_I": 8, "BLOCK_J": 16, "BLOCK_D": 16}}) == "I8 J16 D16"
    fused = {"BLOCK_B": 64, "BLOCK_IC": 8, "BLOCK_KIN": 8, "BLOCK_DK": 16, "HALF": True}
    assert kernel_report._blocks({"constexprs": fused}) == "B64 IC8 KIN8 DK16"
    assert kernel_report._blocks({"constexprs": {"BLOCK": 1024}}) == "1024"

