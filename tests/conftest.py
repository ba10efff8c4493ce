"""Test configuration shared by every test module.

Without a CUDA device the Triton kernels run on CPU tensors through Triton's interpreter, which
must be switched on before triton is first imported: that is why this happens here, at
collection, before any test module imports capstriton's ops.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # the interpreter without its redundant re-patching of triton.language at every helper call
    # (a large share of its time; _interpreter.py says why the kernels compute the same)
    import _interpreter

    _interpreter.install()


def pytest_report_header(config):
    import numpy
    import triton

    where = os.path.dirname(triton.__file__)
    return (
        f"capstriton versions: torch {torch.__version__} | triton {triton.__version__} ({where}) | "
        f"numpy {numpy.__version__} | TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}"
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
