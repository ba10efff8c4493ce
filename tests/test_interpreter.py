"""The test harness's faster interpreter (``_interpreter.py``, installed by conftest.py): kernels
compute bit for bit what they compute with triton's re-patching at every helper call, each skipped
re-patching would have changed nothing, and what triton refuses or allows outside the kernel
modules' pattern it still refuses or allows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import _interpreter
import pytest
import torch
from _interpreter_probe import layer_and_routing

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="the interpreter's harness (no GPU)"
)
PROBE = Path(__file__).resolve().parent / "_interpreter_probe.py"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _assert_same_bits(got, expected):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(_bits(a), _bits(b)), i


def test_in_this_process_every_skip_changes_nothing():
    assert _interpreter.install()  # what conftest.py did: it is in place
    for dtype in (torch.float32, torch.bfloat16):
        seed = torch.seed()
        torch.manual_seed(seed)
        with _interpreter.repatching():
            before = _interpreter.counts()
            expected = layer_and_routing(dtype)
            assert _interpreter.counts() == before  # triton's own way: every call patched
        torch.manual_seed(seed)
        with _interpreter.verifying():
            got = layer_and_routing(dtype)
        skipped, verified = _interpreter.counts()
        assert skipped - before[0] == verified - before[1] > 100  # every skip verified
        _assert_same_bits(got, expected)
    assert not _interpreter.in_launch()


def test_in_a_fresh_process_as_triton_alone(tmp_path):
    """Triton never undoes a helper's own patching, so in this process earlier tests may have left
    modules patched that a wrongly skipped call would otherwise miss: a fresh process skips from
    its first launch on (verifying each skip), against one that runs triton's own way."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    runs = {}
    for mode in ("skip", "triton"):
        out = tmp_path / f"{mode}.pt"
        proc = subprocess.run([sys.executable, str(PROBE), mode, str(out)], capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[mode] = torch.load(out)
    skip, triton = runs["skip"], runs["triton"]
    skipped, verified = skip["counts"]
    assert skipped == verified > 100
    # a helper that sees no triton.language: refused either way; a jit function run on the host,
    # then a kernel that sees only triton.language.core, three times: runs either way
    assert skip["odd"] == triton["odd"]
    assert triton["odd"][0][0] == "raised" and [o for o, _ in triton["odd"][1:]] == ["ok"] * 4
    assert [v for _, v in triton["odd"][2:]] == [41] * 3
    for got, expected in zip(skip["outs"], triton["outs"], strict=True):
        _assert_same_bits(got, expected)
