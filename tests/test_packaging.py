"""What a user installing the package gets: the kernels as capstriton.kernels, the training CLI's
package capstriton.train, the typing marker, the license the metadata declares, and lower bounds
that CI really tests."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from _helpers import OLDEST_TRITON, REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("capstriton-*.whl")
    return zipfile.ZipFile(path)


def _metadata(wheel: zipfile.ZipFile) -> str:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return wheel.read(name).decode()


def test_wheel_ships_kernels_typing_marker_and_license(wheel):
    names = set(wheel.namelist())
    assert "capstriton/py.typed" in names
    assert {"capstriton/kernels/__init__.py", "capstriton/kernels/squash.py"} <= names
    assert {"capstriton/train/__init__.py", "capstriton/train/__main__.py", "capstriton/train/runner.py"} <= names
    (license_name,) = [n for n in names if n.endswith("/LICENSE")]
    assert wheel.read(license_name).decode().startswith("MIT License")
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert "License: MIT" in _metadata(wheel).splitlines()


def test_triton_lower_bound_is_the_oldest_tested(wheel):
    major_minor = ".".join(OLDEST_TRITON.split(".")[:2])
    requires = [line for line in _metadata(wheel).splitlines() if line.startswith("Requires-Dist: triton")]
    assert requires and requires[0].startswith(f"Requires-Dist: triton>={major_minor}"), requires
