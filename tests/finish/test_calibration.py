"""Trustworthy answers: temperature scaling folded into the head, bootstrap CIs, the out-of-distribution guard."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from ham_hf import head, metrics
from ham_hf import model as model_lib
from ham_hf.cli import main
from ham_hf.errors import DataError, ModelError
from ham_hf.finish import calibration
from ham_hf.finish import guard as guard_fit
from ham_hf.labels import CLASS_CODES
from ham_hf.serve import guard as guard_lib


def _overconfident(n=3000, k=7, seed=0):
    """Logits of a decent classifier, then multiplied by 4: right ranking, far too confident."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += 1.5
    return 4 * logits, labels


@pytest.mark.parametrize("objective", ["brier", "nll"])
def test_temperature_lowers_ece_and_keeps_the_argmax(objective):
    logits, labels = _overconfident()
    t = calibration.fit_temperature(logits, labels, objective)
    before, after = metrics.softmax(logits), metrics.softmax(logits / t)
    assert 2.5 < t < 6
    assert metrics.compute(after, labels)["ece"] < 0.5 * metrics.compute(before, labels)["ece"]
    assert metrics.compute(after, labels)["brier"] < metrics.compute(before, labels)["brier"]
    assert (before.argmax(1) == after.argmax(1)).all()


def test_folded_temperature_is_what_every_loader_sees(tiny_model, tmp_path, ham_dir_ro):
    from PIL import Image
    from transformers import pipeline

    from ham_hf.serve.classifier import Classifier
    from ham_hf.serve.export import save_weights_like

    folder = tmp_path / "folded"
    shutil.copytree(tiny_model, folder)
    image = str(next(ham_dir_ro.glob("HAM10000_images_part_1/*.jpg")))
    raw = Classifier(str(tiny_model), backend="torch")
    logits = raw.forward(raw.preprocess(raw.decode(image)[None], train=False)).logits
    model = model_lib.load_model(str(tiny_model))
    head.scale_head(model, 1 / 2.5)
    save_weights_like(model, tiny_model / "model.safetensors", folder / "model.safetensors")
    expected = metrics.softmax(logits / 2.5)[0]
    folded = Classifier(str(folder), backend="torch").predict_proba([image])[0]
    assert folded == pytest.approx(expected, abs=1e-5)
    out = pipeline("image-classification", model=str(folder))(Image.open(image), top_k=7)
    assert {o["label"]: o["score"] for o in out} == pytest.approx(dict(zip(CLASS_CODES, expected)), abs=1e-5)


def test_bootstrap_intervals_contain_the_estimate_and_are_seeded():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(7), 30)
    probs = rng.dirichlet(np.ones(7), len(labels))
    probs[np.arange(len(labels)), labels] += 0.25
    probs /= probs.sum(1, keepdims=True)
    lesions = [f"L{i // 2}" for i in range(len(labels))]
    a = metrics.compute(probs, labels, groups=lesions, n_bootstrap=200, seed=3)
    b = metrics.compute(probs, labels, groups=lesions, n_bootstrap=200, seed=3)
    c = metrics.compute(probs, labels, groups=lesions, n_bootstrap=200, seed=4)
    assert a["ci"] == b["ci"] and a["ci"] != c["ci"]
    for key in ("balanced_accuracy", "accuracy", "macro_f1", "roc_auc_macro", "malignant_roc_auc",
                "mel_sensitivity_at_specificity_80", "mel_sensitivity_at_specificity_90"):
        low, high = a["ci"][key]
        assert low <= a[key] <= high, key
    assert a["ci_resamples"] == 200


def test_reports_break_the_figures_down_by_how_the_diagnosis_was_confirmed(tmp_path):
    from ham_hf.finish import report
    from ham_hf.hub import card

    rng = np.random.default_rng(0)
    labels = np.array([5] * 6 + [4, 4, 2, 2] + list(range(7)))
    predicted = np.array([5] * 6 + [4, 5, 2, 2] + list(range(7)))  # one histo melanoma called a nevus
    probs = np.eye(7)[predicted] * 0.9 + rng.random((len(labels), 7)) * 0.01
    dx = ["follow_up"] * 6 + ["histo"] * 4 + ["consensus"] * 7
    result = report.write_split_reports(tmp_path, "test", probs, labels, [f"i{k}" for k in range(len(labels))],
                                        metadata={"dx_type": dx})
    assert result["by_dx_type"] == {
        "consensus": {"n": 7, "accuracy": 1.0, "balanced_accuracy": 1.0},
        "follow_up": {"n": 6, "accuracy": 1.0, "balanced_accuracy": 1.0},
        "histo": {"n": 4, "accuracy": 0.75, "balanced_accuracy": 0.75},  # mel 1/2, bkl 2/2
    }
    assert json.loads((tmp_path / "test_metrics.json").read_text())["by_dx_type"] == result["by_dx_type"]
    assert list(result["by_dx_type"]) == ["consensus", "follow_up", "histo"]  # largest first
    assert "| histo | 0.750 / 0.750 (4) |" in card.dx_type_table({"test": result})


def test_operating_points_match_their_definitions():
    labels = np.array([4] * 10 + [5] * 90)  # 10 melanomas among 100
    probs = np.full((100, 7), 0.01)
    probs[:, 4] = np.r_[np.linspace(0.5, 0.95, 10), np.linspace(0.0, 0.6, 90)]
    probs /= probs.sum(1, keepdims=True)
    r = metrics.compute(probs, labels)
    mel = probs[:, 4]
    assert r["mel_sensitivity_at_decision"] == pytest.approx((probs[labels == 4].argmax(1) == 4).mean())
    for spec in (80, 90):
        threshold = np.quantile(mel[labels == 5], spec / 100)
        assert r[f"mel_sensitivity_at_specificity_{spec}"] == pytest.approx((mel[labels == 4] > threshold).mean())
    from sklearn.metrics import roc_auc_score

    assert r["malignant_roc_auc"] == pytest.approx(roc_auc_score(labels == 4, probs[:, [0, 1, 4]].sum(1)))


def test_trained_model_is_calibrated_and_guarded(calibrated_tiny_model):
    record = json.loads((calibrated_tiny_model / "results.json").read_text())
    assert record["head"]["temperature"] > 0
    assert set(record["calibration"]) == {"validation", "test"} and "brier_after" in record["calibration"]["test"]
    assert (calibrated_tiny_model / guard_lib.GUARD_FILE).is_file()
    assert (calibrated_tiny_model / "validation_reliability.png").is_file()
    assert (calibrated_tiny_model / "validation_reliability_uncalibrated.png").is_file()
    test = json.loads((calibrated_tiny_model / "test_metrics.json").read_text())
    assert test["ci_resamples"] == metrics.N_BOOTSTRAP and "balanced_accuracy" in test["ci"]
    card = (calibrated_tiny_model / "README.md").read_text()
    assert "## Out-of-distribution guard" in card and "AUROC" in card and "## Calibration" in card
    assert sum(g["n"] for g in test["by_dx_type"].values()) == sum(map(sum, test["confusion_matrix"]))
    assert "By how the diagnosis was confirmed" in card
    guard = guard_lib.Guard.load(calibrated_tiny_model / guard_lib.GUARD_FILE)
    assert guard.feature_size == model_lib.head(model_lib.load_model(str(calibrated_tiny_model))).in_features


def test_predict_cli_writes_the_guard_columns(calibrated_tiny_model, ham_dir_ro, tmp_path):
    out = tmp_path / "p.csv"
    assert main(["predict", str(ham_dir_ro / "HAM10000_images_part_1"), "--model", str(calibrated_tiny_model),
                 "--output", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert rows and all(float(r["ood_score"]) >= 0 and r["in_distribution"] in ("True", "False") for r in rows)


def test_guard_refuses_features_of_another_size(calibrated_tiny_model):
    guard = guard_lib.Guard.load(calibrated_tiny_model / guard_lib.GUARD_FILE)
    with pytest.raises(ModelError, match="belongs to another model.*ham-hf calibrate"):
        guard.score(np.zeros((2, guard.feature_size + 1)))


def test_classifier_refuses_a_guard_of_another_model(calibrated_tiny_model, tmp_path):
    from ham_hf.serve.classifier import Classifier

    folder = tmp_path / "mixed"
    shutil.copytree(calibrated_tiny_model, folder)
    guard = guard_lib.Guard.load(folder / guard_lib.GUARD_FILE)
    width = guard.feature_size * 2
    wide = guard_lib.Guard(np.zeros(width, np.float32), np.zeros((2, width), np.float32), guard.centres[:, :2],
                           np.eye(2, dtype=np.float32), threshold=1.0)
    wide.save(folder / guard_lib.GUARD_FILE)
    with pytest.raises(ModelError, match="reads .* features but the model gives"):
        Classifier(str(folder), backend="torch")
    (folder / guard_lib.GUARD_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="not a usable OOD guard file"):
        Classifier(str(folder), backend="torch")


def test_calibrate_refuses_a_split_with_a_missing_class():
    labels = np.array([0, 1, 2, 3, 4, 5] * 3)
    with pytest.raises(DataError, match="no image of vasc"):
        calibration.check_calibration_split(labels)


def test_calibrate_refuses_a_backbone_and_leaves_nothing_half_written(tiny_backbone, tiny_model, ham_dir_ro, tmp_path,
                                                                        caplog, monkeypatch):
    assert main(["calibrate", "--model", str(tiny_backbone), "--data", str(ham_dir_ro)]) == 2
    assert "is not a HAM10000 classifier" in caplog.text
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    def boom(*args, **kwargs):
        raise DataError("simulated failure half-way")

    monkeypatch.setattr(guard_fit, "fit_mahalanobis", boom)
    assert main(["calibrate", "--model", str(folder), "--data", str(ham_dir_ro)]) == 2
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_calibrate_cli_adds_guard_and_temperature(tiny_model, ham_dir_ro, tmp_path):
    out = tmp_path / "calibrated"
    assert main(["calibrate", "--model", str(tiny_model), "--data", str(ham_dir_ro), "--output", str(out)]) == 0
    assert (out / guard_lib.GUARD_FILE).is_file() and (out / "config.json").is_file()
    assert json.loads((out / "results.json").read_text())["head"]["temperature"] > 0
    assert not (tiny_model / guard_lib.GUARD_FILE).exists()  # --output leaves the source alone


def test_recalibrating_keeps_the_head_and_records_the_whole_temperature(tiny_model, ham_dir_ro, tmp_path):
    once, twice = tmp_path / "once", tmp_path / "twice"
    assert main(["calibrate", "--model", str(tiny_model), "--data", str(ham_dir_ro), "--output", str(once)]) == 0
    assert main(["calibrate", "--model", str(once), "--data", str(ham_dir_ro), "--output", str(twice)]) == 0
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (once, twice))
    t1, t2 = r1["head"]["temperature"], r2["head"]["temperature"]
    assert abs(np.log(t1)) > np.log(calibration.TEMPERATURE_TOLERANCE)  # the first one folded a T
    assert t2 == pytest.approx(t1)  # the head's whole T, not a ~1 refit on top
    ece = [r["calibration"]["validation"]["ece_before"] for r in (r1, r2)]
    assert ece[1] == pytest.approx(ece[0], abs=0.01)  # "before" = raw
    assert (twice / "model.safetensors").read_bytes() == (once / "model.safetensors").read_bytes()
    assert "head_changed" not in r2 and "head_changed" not in r2["head"]


@pytest.mark.slow
def test_bundled_guard_flags_generated_images_and_keeps_real_lesions(bundled_model, real_ham_dir):
    """The promised rates on real data: >= 97% of validation lesions kept, generated non-lesion images flagged."""
    from ham_hf.serve.classifier import Classifier

    if not guard_lib.guard_path(bundled_model).is_file():
        pytest.skip("the bundled model has no guard")
    ids = [r["image_id"] for r in csv.DictReader((bundled_model / "split.csv").open()) if r["split"] == "validation"]
    rng = np.random.default_rng(0)
    paths = [str(next(real_ham_dir.glob(f"HAM10000_images_part_*/{i}.jpg"))) for i in rng.choice(ids, 160, False)]
    clf = Classifier(str(bundled_model), backend="torch")
    kept = [p.in_distribution for i in range(0, len(paths), 32) for p in clf.predict(paths[i:i + 32])]
    assert np.mean(kept) >= 0.97
    generated = [im for _, im in guard_fit.generated_images()]
    flagged = [not p.in_distribution for p in clf.predict(generated)]
    assert np.mean(flagged) >= 0.9, flagged
