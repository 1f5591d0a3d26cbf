"""The walkthrough notebook runs top to bottom (small configuration, offline) and is stored without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "ham10000_walkthrough.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert any("parameters" in c.metadata.get("tags", []) for c in code)
    source = "\n".join(c.source for c in code)
    assert "PUSH_TO_HUB = False" in source  # publishing stays opt-in


@pytest.mark.slow
def test_notebook_executes_top_to_bottom(real_ham_dir, resnet50_dir, tmp_path, monkeypatch):
    """With the offline backbone (else the notebook would fetch timm/resnet50.a1_in1k)."""
    from nbclient import NotebookClient

    monkeypatch.setenv("HAM_NOTEBOOK_BACKBONE", str(resnet50_dir))
    monkeypatch.setenv("HAM10000_DIR", str(real_ham_dir.resolve()))
    monkeypatch.setenv("HAM_NOTEBOOK_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("HAM_NOTEBOOK_IMAGE_SIZE", "64")
    monkeypatch.setenv("HAM_NOTEBOOK_MAX_TRAIN", "96")
    monkeypatch.setenv("HAM_NOTEBOOK_MAX_EVAL", "64")
    monkeypatch.setenv("HAM_NOTEBOOK_EPOCHS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HAM_HF_CACHE", str(tmp_path / "cache"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert "lesions** in both training and the held-out splits" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 8  # plots, sample grid, curves, confusion matrix, predictions, Grad-CAM
    assert (tmp_path / "work" / "model" / "model.safetensors").is_file()
