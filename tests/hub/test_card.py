"""The results record and the card rendered from it: one set of figures, said once, replaced when stale."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from ham_hf import results
from ham_hf.cli import main
from ham_hf.errors import ModelError
from ham_hf.finish import report
from ham_hf.hub import card
from ham_hf.labels import CLASS_CODES


@pytest.fixture
def model(calibrated_tiny_model, tmp_path):
    """A copy of the calibrated tiny model (safe to change)."""
    folder = tmp_path / "model"
    shutil.copytree(calibrated_tiny_model, folder)
    return folder


def _per_class_rows(text: str, split: str) -> list[str]:
    """The per-class table of one split in a card."""
    section = text.split(f"Per class, {split} (`{split}_per_class.csv`):\n\n")[1]
    return [line for line in section.split("\n\n")[0].splitlines() if line.startswith("| ") and line[2:5] != "cla"]


def test_the_card_the_record_and_the_split_files_agree(model):
    from huggingface_hub import ModelCard

    record = json.loads((model / "results.json").read_text())
    text = (model / "README.md").read_text()
    for split in ("validation", "test"):
        figures = record["splits"][split]
        assert figures == json.loads((model / f"{split}_metrics.json").read_text())
        with (model / f"{split}_per_class.csv").open() as fh:  # the CSV and the card's table: the same figures
            rows = {r["class"]: r for r in csv.DictReader(fh)}
        for line, code in zip(_per_class_rows(text, split), CLASS_CODES):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[0] == code
            assert [float(c) for c in cells[1:4]] == pytest.approx(
                [float(rows[code][k]) for k in ("precision", "recall", "f1")], abs=6e-4)
            assert int(cells[4]) == int(rows[code]["support"])
        low, high = figures["ci"]["balanced_accuracy"]
        assert f"{figures['balanced_accuracy']:.3f} [{low:.3f}, {high:.3f}]" in text
    index = {r.metric_type: r.metric_value for r in ModelCard.load(model / "README.md").data.eval_results}
    for key, _ in card.CARD_METRICS:
        assert index[key] == round(record["splits"]["test"][key], 4)
    assert f"T = {record['head']['temperature']:.3f}" in text
    assert text.rstrip().endswith("```") and text.index("## Citation") > text.index("## Out-of-distribution guard")


def test_a_second_render_gives_the_same_card(model):
    first = (model / "README.md").read_bytes()
    card.render(model)
    assert (model / "README.md").read_bytes() == first
    assert main(["card", "--model", str(model)]) == 0
    assert (model / "README.md").read_bytes() == first


def test_an_evaluation_replaces_the_figures_it_makes_stale(model, ham_dir_ro):
    record = results.load(model)
    stale = {**record["splits"]["test"], "balanced_accuracy": 0.1234}
    results.update(model, splits={"test": stale})
    card.render(model)
    assert "0.123 [" in (model / "README.md").read_text()
    # Scoring the model's own test split again: its figures in the record, the files and the card are replaced.
    assert main(["evaluate", "--model", str(model), "--data", str(ham_dir_ro), "--split", "test"]) == 0
    again = results.load(model)["splits"]["test"]
    assert again["balanced_accuracy"] == pytest.approx(record["splits"]["test"]["balanced_accuracy"], abs=0.02)
    assert again == json.loads((model / "test_metrics.json").read_text())
    text = (model / "README.md").read_text()
    assert "0.123 [" not in text and "evaluations" not in results.load(model)
    # Other data is an entry of its own; scored again, it replaces itself and nothing else.
    for _ in range(2):
        assert main(["evaluate", "--model", str(model), "--data", str(ham_dir_ro), "--split", "all",
                     "--source_name", "another clinic"]) == 0
    entries = results.load(model)["evaluations"]
    assert list(entries) == ["another clinic"] and entries["another clinic"]["split"] == "all"
    text = (model / "README.md").read_text()
    assert text.count("**another clinic**") == 1 and "## Other data" in text
    assert results.load(model)["splits"]["test"] == again


def test_a_group_of_one_image_is_said_to_be_too_small(tmp_path):
    labels = np.array([4, 5] * 20 + [0])
    probs = np.eye(7)[labels] * 0.8 + 0.2 / 7
    metadata = {"sex": ["female"] * 40 + ["male"], "age": [30.0] * 20 + [70.0] * 20 + [None],
                "localization": ["back"] * 41}
    lesions = [f"l{i}" for i in range(41)]
    groups = report.subgroup_figures(probs, labels, lesions, metadata, n_bootstrap=50)
    male = groups["sex"]["male"]
    assert male["n"] == 1 and male["balanced_accuracy"] is None and set(male["too_small"]) == {
        "balanced_accuracy", "mel_sensitivity", "malignant_roc_auc"}
    female = groups["sex"]["female"]  # 40 images, 20 melanomas, 20 malignant and 20 benign: every figure read
    assert female["balanced_accuracy"] == 1.0 and female["mel_sensitivity"] == 1.0 and female["too_small"] == []
    assert female["ci"]["malignant_roc_auc"] == [1.0, 1.0]
    assert list(groups["age"]) == ["under 40", "60 and over", "unknown"]
    assert groups["age"]["under 40"]["too_small"] == ["balanced_accuracy", "mel_sensitivity", "malignant_roc_auc"]
    text = card.subgroup_section({"subgroups": groups})
    assert "| male | 1 (1) | 0 | too small | too small | too small |" in text
    assert "no figure by skin tone" in text


def test_the_test_split_is_broken_down_by_patient_group(calibrated_tiny_model):
    test = results.load(calibrated_tiny_model)["splits"]["test"]
    groups = test["subgroups"]
    n = sum(map(sum, test["confusion_matrix"]))
    for kind in ("sex", "age", "site"):
        assert sum(g["n"] for g in groups[kind].values()) == n, kind
    assert "## Patient subgroups" in (calibrated_tiny_model / "README.md").read_text()


def test_a_folder_without_results_renders_a_card_that_says_so(tiny_backbone, tmp_path):
    folder = tmp_path / "bare"
    shutil.copytree(tiny_backbone, folder)
    card.render(folder)
    text = (folder / "README.md").read_text()
    assert "_Not measured yet: train with `ham-hf train`" in text and "model-index" not in text


def test_a_record_of_another_version_is_refused_with_the_step_to_rerun(model, caplog):
    record = json.loads((model / "results.json").read_text())
    (model / "results.json").write_text(json.dumps({**record, "version": 0}))
    with pytest.raises(ModelError, match="rerun `ham-hf calibrate"):
        results.load(model)
    assert main(["card", "--model", str(model)]) == 2 and "rerun `ham-hf calibrate" in caplog.text
    (model / "results.json").write_text(json.dumps({**record, "version": results.VERSION + 1}))
    with pytest.raises(ModelError, match="upgrade ham-hf"):
        results.load(model)


def test_an_earlier_folder_s_flat_results_are_read_and_converted(model):
    record = results.load(model)
    (model / "results.json").unlink()
    flat = {"temperature": record["head"]["temperature"], "device": "NVIDIA H200", "train_runtime": 12.0,
            "eval_ece_uncalibrated": 0.3, "eval_ece_calibrated": 0.05, "eval_brier_uncalibrated": 0.4,
            "eval_brier_calibrated": 0.3, **{f"ood_{k}": v for k, v in record["guard"].items()}}
    (model / "all_results.json").write_text(json.dumps(flat))
    (model / "int8_fidelity.json").write_text(json.dumps(record["int8"]))
    old = results.load(model)
    assert old["head"] == {"temperature": flat["temperature"]} and old["guard"] == record["guard"]
    assert old["splits"]["test"] == record["splits"]["test"] and old["int8"] == record["int8"]
    assert old["calibration"]["validation"] == {"ece_before": 0.3, "ece_after": 0.05, "brier_before": 0.4,
                                                "brier_after": 0.3}
    assert main(["card", "--model", str(model)]) == 0  # converted once: the record replaces the flat files
    assert not (model / "all_results.json").exists() and not (model / "int8_fidelity.json").exists()
    assert results.load(model)["training"]["device"] == "NVIDIA H200"
