"""The Colab quickstart runs top to bottom (quick settings, tiny model)."""

import json
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

    # Stage 2 keeps the vision tower stage 1 trained (demo_stage2_config freezes it) and
    # trains the decoder.
    import jax
    import numpy as np

    from jfe_jax.train.checkpoint import restore_params

    stage1, _ = restore_params(str(tmp_path / "demo" / "stage1"))
    stage2, _ = restore_params(str(tmp_path / "demo" / "stage2"))
    for before, after in zip(jax.tree.leaves(stage1["vision"]), jax.tree.leaves(stage2["vision"])):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    text_pairs = zip(jax.tree.leaves(stage1["text"]), jax.tree.leaves(stage2["text"]))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in text_pairs)

    # A second run on the finished workdir redoes nothing.
    from jfe_jax.demo import run_demo

    with open(tmp_path / "demo" / "demo_summary.json") as f:
        first = json.load(f)
    again = run_demo(str(tmp_path / "demo"), steps=4, progress=False)
    assert again["demo_summary"]["reused"] == ["data", "stage1", "stage2", "eval"]
    # The rerun keeps the stages' times and the first run's total.
    assert again["demo_summary"]["seconds"] == first["seconds"]
    assert again["demo_summary"]["total_seconds"] == first["total_seconds"]
    assert again["demo_summary"]["run_seconds"] < 30
