"""The bundled default model (models/ham10000-resnet50): loads anywhere and beats chance on real images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ham_hf.defaults import BUNDLED_MODEL as DEFAULT
from ham_hf.defaults import DEFAULT_RECIPE
from ham_hf.labels import CLASS_CODES

pytestmark = pytest.mark.skipif(not (DEFAULT / "model.safetensors").is_file(), reason="no bundled default model")


def test_app_serves_the_bundled_model_by_default(monkeypatch):
    from ham_hf.serve.classifier import resolve_model

    import app

    monkeypatch.delenv("HAM_MODEL", raising=False)
    assert Path(resolve_model(None, app.DEFAULT_MODEL)) == DEFAULT


def test_bundled_model_was_trained_with_the_default_recipe():
    """One source of truth: the bundled folder's recorded recipe is configs/default-model.json, option for option."""
    from ham_hf import data, train
    from ham_hf.cli import parse
    from ham_hf.transforms import AugmentArguments

    recorded = json.loads((DEFAULT / "recipe.json").read_text())
    assert recorded == json.loads(DEFAULT_RECIPE.read_text())
    # Every key is a `ham-hf train` option, and the file parses as its configuration.
    parsed = parse([str(DEFAULT_RECIPE)], train.ModelArguments, train.DataArguments, train.RecipeArguments,
                   AugmentArguments, data.SplitArguments, train.HamTrainingArguments)
    values = {k: v for obj in parsed for k, v in vars(obj).items()}
    assert all(values[key] == value for key, value in recorded.items())
    card = (DEFAULT / "README.md").read_text()
    assert "configs/default-model.json" in card and "../shared" not in card and "resnet50.keras_in1k" in card


def test_bundled_model_card_and_size():
    from huggingface_hub import ModelCard

    card = ModelCard.load(DEFAULT / "README.md")
    assert card.data.pipeline_tag == "image-classification" and card.data.eval_results
    assert (DEFAULT / "model.safetensors").stat().st_size < 60 * 1024 * 1024
    assert json.loads((DEFAULT / "config.json").read_text())["label_names"] == list(CLASS_CODES)


def test_bundled_model_beats_chance_on_held_out_real_images(real_ham_dir):
    """10 test-split images per class through the stock pipeline: balanced accuracy far above 1/7."""
    from sklearn.metrics import balanced_accuracy_score
    from transformers import pipeline

    per_class: dict[str, list[str]] = {c: [] for c in CLASS_CODES}
    with (DEFAULT / "split.csv").open() as fh:
        for row in csv.DictReader(fh):
            if row["split"] == "test" and len(per_class[row["dx"]]) < 10:
                per_class[row["dx"]].append(row["image_id"])
    truth = [c for c, ids in per_class.items() for _ in ids]
    paths = [str(next(real_ham_dir.glob(f"HAM10000_images_part_*/{i}.jpg"))) for ids in per_class.values() for i in ids]
    classifier = pipeline("image-classification", model=str(DEFAULT))
    predicted = [out[0]["label"] for out in classifier(paths, top_k=1)]
    score = balanced_accuracy_score(truth, predicted)
    assert score > 0.4, f"balanced accuracy {score:.2f} on {len(paths)} held-out images (chance 0.14)"
    assert np.mean([p == t for p, t in zip(predicted, truth)]) > 0.3


def test_bundled_model_records_a_tau_that_meets_its_calibration_condition():
    """The bundled head's logit adjustment was chosen by the project's rule, and its card says which."""
    from ham_hf.finish.calibration import TAU_GRID

    results = json.loads((DEFAULT / "all_results.json").read_text())
    assert results["logit_adjustment_tau"] in TAU_GRID
    assert results["eval_ece_calibrated"] <= results["logit_adjustment_max_ece"]
    assert f"**tau = {results['logit_adjustment_tau']:g}**" in (DEFAULT / "README.md").read_text()


def _held_out(folder: Path, column: str) -> list[tuple[Path, str]]:
    """The half of a development folder the bundled guard was not fitted on (ham_hf.serve.ood.halves)."""
    from ham_hf.finish.guard import read_folder, source_of
    from ham_hf.serve.ood import halves

    paths, values = read_folder(folder, column)
    groups = values if column == "category" else [source_of(p) for p in paths]
    return [(p, v) for p, v, fit in zip(paths, values, halves(groups)) if not fit]


@pytest.fixture(scope="module")
def guarded():
    from ham_hf.serve.classifier import Classifier

    return Classifier(str(DEFAULT))


def test_the_guard_flags_package_photos_charts_and_greyscale_and_says_what_they_are(guarded):
    """What a public Space receives: a photo, a chart and a greyscale scan, each flagged with its kind."""
    from PIL import Image

    from ham_hf.serve.ood import generated_images, non_dermoscopic_images

    samples = dict(non_dermoscopic_images())
    photo, grey = samples["skimage-astronaut"], samples["skimage-camera"].convert("RGB")
    chart = dict(generated_images())["chart-bar"]
    flat = Image.new("RGB", (300, 300), (200, 150, 130))  # all one colour, skin-toned
    for name, image in {"photo": photo, "chart": chart, "greyscale": grey, "one colour": flat}.items():
        p = guarded.predict([image])[0]
        assert p.in_distribution is False and p.ood_kind is not None, name
    assert guarded.predict([grey])[0].ood_kind == "greyscale"


def test_the_guard_keeps_real_lesions_at_the_promised_rates(guarded, real_ham_dir, external_dir):
    """HAM10000 validation (a seeded 200) >= 97% kept; dermoscopy from other sources (held-out half) >= 95%."""
    from ham_hf import data

    validation = data.read_split_file(DEFAULT / "split.csv", "validation")
    rng = np.random.default_rng(0)
    ids = rng.choice(sorted(validation), 200, replace=False)
    files = [next(real_ham_dir.glob(f"HAM10000_images_part_*/{i}.jpg")) for i in ids]
    kept = np.mean([p.in_distribution for p in guarded.predict([str(f) for f in files])])
    assert kept >= 0.97, kept
    external = [str(p) for p, _ in _held_out(external_dir, "dx")]
    kept = np.mean([p.in_distribution for p in guarded.predict(external)])
    assert kept >= 0.95, kept


def test_the_guard_flags_held_out_real_uploads(guarded, ood_dev_dir):
    """ood-dev's held-out half: far-OOD >= 95% flagged, ordinary skin photos >= 60%, each said to be a skin photo."""
    held = _held_out(ood_dev_dir, "category")
    predictions = guarded.predict([str(p) for p, _ in held])
    far = [not p.in_distribution for p, (_, c) in zip(predictions, held) if c != "skin_clinical"]
    skin = [p for p, (_, c) in zip(predictions, held) if c == "skin_clinical"]
    assert np.mean(far) >= 0.95, np.mean(far)
    assert np.mean([not p.in_distribution for p in skin]) >= 0.60
    assert np.mean([p.ood_kind == "skin photo" for p in skin if not p.in_distribution]) >= 0.8
