"""The Colab quickstart runs top to bottom (quick settings, tiny model)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("JFE_WORKDIR", str(tmp_path / "demo"))
    monkeypatch.setenv("JFE_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3").execute()
    outputs = "".join(
        o.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
    )
    assert "average headline recall" in outputs
    assert "unit norm: True" in outputs
    assert "positives:" in outputs
    assert os.path.isfile(tmp_path / "demo" / "eval" / "results.json")

    # A second run on the finished workdir redoes nothing.
    from jfe_jax.demo import run_demo

    again = run_demo(str(tmp_path / "demo"), steps=4, progress=False)
    assert set(again["demo_summary"]["seconds"].values()) == {"skipped"}
    assert again["demo_summary"]["total_seconds"] < 30
