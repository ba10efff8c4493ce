"""The interpreter kernel tests again, with the oldest supported triton (.ci/oldest-triton.txt)
first on the path: each triton's interpreter has its own bugs (3.9's mistyped a scalar condition
in a block mask, which 3.6 to 3.8 accepted), so passing with the newest proves nothing about the
oldest. Compilation with it for sm_90 is checked in test_kernel_report.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
from _helpers import HAS_CUDA, OLDEST_TRITON, REPO, oldest_triton_env

# and the harness's interpreter fix (conftest.py installs it in that run too) against 3.6's own way
KERNEL_TESTS = ["tests/ops", "tests/test_interpreter.py"]


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter run is for machines without a GPU")
def test_interpreter_kernel_tests_pass_with_the_oldest_supported_triton():
    env = oldest_triton_env()
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        # the slow cases (the paper's 1152 input capsules) and the further shapes of each grid
        # (every kernel and compile-time path is in the cases kept) run with the current triton
        # only; two worker processes (pytest-xdist): in a parallel run of the suite this, its
        # longest test, tends to run last, alone
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "-m", "not slow and not shape_grid",
         *KERNEL_TESTS],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    # the header conftest.py prints: the run really imported that triton
    assert f"triton {OLDEST_TRITON} " in proc.stdout, proc.stdout[:2000]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
