"""notebooks/performance_comparison.ipynb executes top to bottom on a CPU (with a tiny sweep)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "performance_comparison.ipynb"


def test_performance_notebook_executes(monkeypatch):
    # The kernel inherits this environment: a tiny sweep, real (not interpreted) Triton.
    monkeypatch.setenv("CAPSTRITON_NB_SWEEP", "tiny")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    text = "".join(out.get("text", "") for out in outputs)
    assert "committed result set(s)" in text
    # the counted layer memory of each committed configuration, as markdown tables
    markdown = "".join("".join(out.get("data", {}).get("text/markdown", "")) for out in outputs)
    assert "digitcaps_1152x10x16x8" in markdown and "| forward+backward | fused |" in markdown
    # The tiny sweep ran and printed its summary.
    assert "Targets (from the bench specs" in text
