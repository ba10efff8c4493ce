"""bench/kernel_report.py with the oldest supported triton (the GPU machines' 3.6): the fused
layer's kernels compile for sm_90 without spills. A module of its own, so that a parallel run
(pytest-xdist, ``--dist loadfile``: a module's tests on one worker) compiles it beside the newest
triton's report (tests/test_kernel_report.py) rather than after it."""

from __future__ import annotations

import json

from _helpers import OLDEST_TRITON, oldest_triton_env
from test_kernel_report import COMMITTED, KERNELS, run_report


def test_fused_layer_kernels_compile_without_spills_with_the_oldest_supported_triton(tmp_path):
    """The GPU machines run the oldest supported triton (3.6, with torch 2.11), and compilers
    differ: 3.6 failed on a version of the backward's final kernel that 3.7 compiled, and
    allocates registers differently. The fused layer's kernels (``--specs layer``: every launch of
    its cases, both shape sets, more than half of the report's compilations) are the ones that push the compiler
    (tensor-core products, inline assembly, the whole register file); the full report with 3.6 is
    the committed ``bench/results/kernel_report/triton-3.6`` (README: regenerating it)."""
    reuse = COMMITTED / "triton-3.6" / "sm_90.json"  # (compilations unchanged since: not compiled again)
    proc = run_report(tmp_path, oldest_triton_env(), "--specs", "layer", "--reuse", str(reuse))
    # every launch compiled, and --fail-on-spill: no spill that SPILL_EXCEPTIONS does not document
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((tmp_path / "sm_90.json").read_text())
    assert doc["versions"]["triton"] == OLDEST_TRITON and doc["specs"] == ["layer"]
    fused = {k for k in KERNELS if k.startswith("fused_layer_")}
    assert fused and fused <= {e["kernel"] for e in doc["kernels"]}
