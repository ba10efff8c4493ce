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


#: The modules that run a long subprocess (every kernel compiled for sm_90 with the newest and the
#: oldest triton; the interpreter tests with the oldest): first, so that a parallel run
#: (.ci/run: pytest-xdist, modules in collection order) starts them beside the rest instead of
#: after it.
_LONG_MODULES = ("test_kernel_report.py", "test_kernel_report_oldest_triton.py", "test_oldest_triton.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return _LONG_MODULES.index(name) if name in _LONG_MODULES else len(_LONG_MODULES)

    items.sort(key=rank)  # stable: the order within each group is kept
