"""torch.compile(fullgraph=True) traces the Triton path into one graph (DESIGN.md section 4).

Under TRITON_INTERPRET (set by conftest on CPU machines) wrap_triton hands back the plain kernel,
so the check runs in a subprocess without it, on fake CUDA tensors, and executes nothing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_fake_cuda_trace.py")


@pytest.fixture(scope="module")
def traced():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    return {row["case"]: row for row in map(json.loads, proc.stdout.splitlines())}


@pytest.mark.parametrize(
    ("case", "kernel_launches"),
    # routing (3 iterations): one launch per iteration plus the finalize. The fused layer, float32
    # at "highest" on tensor cores: the sums of iteration 0, then per later iteration the saved
    # state, the coupling and the sums, and the finalize (8); CapsNet adds PrimaryCapsules'
    # squash; in bfloat16 (16D output capsules) the coupling and the sums of a later iteration are
    # one pass, which reads the weight in chunks (laid out once a call: 7). Self-attention
    # routing: the sum S, the sum s, the finalize; Efficient-CapsNet adds the primary capsules'
    # efficient squash
    [
        ("dynamic_routing", 4),
        ("RoutingCapsules", 8),
        ("RoutingCapsules-bfloat16", 7),
        ("CapsNet", 9),
        ("self_attention_routing", 3),
        ("SelfAttentionCapsules", 3),
        ("EfficientCapsNet", 4),
    ],
)
def test_one_graph_with_triton_kernels(traced, case, kernel_launches):
    result = traced[case]
    assert result["graphs"] == 1
    wrappers = [t for t in result["targets"] if "triton_kernel_wrapper" in t]
    assert len(wrappers) == kernel_launches, result["targets"]
    # functional wrappers: the ones whose clone list the mutation check below reads
    assert all("triton_kernel_wrapper_functional" in t for t in wrappers), wrappers
    assert result["inputs_written"] == []
    if case not in ("dynamic_routing", "self_attention_routing"):
        # the fused layer: the predictions are computed inside the kernels, never by a matmul
        assert not [t for t in result["targets"] if "bmm" in t or "matmul" in t], result["targets"]
