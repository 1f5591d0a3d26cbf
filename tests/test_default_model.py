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
