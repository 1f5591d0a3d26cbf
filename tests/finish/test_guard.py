"""The guard's fit with a kind probe: real negatives and other sources' dermoscopy, half fitted, half reported."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ham_hf.cli import main
from ham_hf.errors import DataError
from ham_hf.finish.guard import read_folder
from ham_hf.serve import ood
from ham_hf.serve.classifier import Classifier

from conftest import CLASS_COLOURS, tiny_jpeg


def _negatives(root):
    """A folder like ood-dev: generated photos, charts and scans by category."""
    rows = ["file,category"]
    images = dict(ood.generated_images(seed=3))
    groups = {"everyday": [k for k in images if k.startswith(("noise", "gradient"))],
              "document": [k for k in images if k.startswith("chart")],
              "skin_clinical": ["solid-230-180-160", "solid-200-120-100", "solid-120-80-60"],
              "medical": ["solid-128-128-128", "solid-0-0-0", "solid-255-255-255"]}
    (root / "images").mkdir(parents=True)
    for category, names in groups.items():
        for name in names:
            images[name].save(root / "images" / f"{category}_{name}.png")
            rows.append(f"images/{category}_{name}.png,{category}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def _positives(root):
    """A folder like dermoscopy-external: lesion-like images from two 'sources'."""
    rows = ["file,dx"]
    for i, (code, colour) in enumerate(list(CLASS_COLOURS.items()) * 2):
        name = f"{'srca' if i % 2 else 'srcb'}_{i}.jpg"
        tiny_jpeg(root / "images" / name, colour, seed=100 + i)
        rows.append(f"images/{name},{code}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def test_the_guard_learns_kinds_from_real_folders_and_reports_on_the_held_out_half(calibrated_tiny_model, ham_dir_ro,
                                                                                   tmp_path):
    model = tmp_path / "model"
    shutil.copytree(calibrated_tiny_model, model)
    weights = (model / "model.safetensors").read_bytes()
    negatives, positives = _negatives(tmp_path / "neg"), _positives(tmp_path / "pos")
    assert main(["calibrate", "--model", str(model), "--data", str(ham_dir_ro), "--guard_only", "true",
                 "--guard_negatives", str(negatives), "--guard_positives", str(positives)]) == 0
    assert (model / "model.safetensors").read_bytes() == weights  # the guard alone was refitted
    guard = ood.Guard.load(model / ood.GUARD_FILE)
    assert guard.probe is not None and guard.probe.kinds[0] == "dermoscopic"
    assert {"photo", "document", "skin photo", "medical", "other"} <= set(guard.probe.kinds)
    results = json.loads((model / "all_results.json").read_text())
    for key in ("ood_heldout_far_flagged", "ood_heldout_skin_photo_flagged", "ood_heldout_external_kept",
                "ood_validation_kept"):
        assert 0 <= results[key] <= 1, key
    card = (model / "README.md").read_text()  # the card says what the probe does on the halves it did not see
    assert "A kind probe" in card
    assert f"dermoscopy from other sources kept: {100 * results['ood_heldout_external_kept']:.1f}%" in card
    # The verdict carries the kind through the product's predictions.
    clf = Classifier(str(model), backend="torch")
    flagged = [p for p in clf.predict([str(p) for p in (negatives / "images").glob("*.png")]) if not p.in_distribution]
    assert flagged and all(p.ood_kind in (*ood.KINDS[1:], "greyscale") for p in flagged)
    # A saved guard reads back exactly.
    again = ood.Guard.load(model / ood.GUARD_FILE)
    np.testing.assert_array_equal(again.probe.weight, guard.probe.weight)
    assert again.probe.min_dermoscopic == guard.probe.min_dermoscopic


def test_the_guard_s_folders_are_checked_with_messages_that_name_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no metadata.csv"):
        read_folder(tmp_path / "empty", "category")
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "metadata.csv").write_text("file,category\nimages/gone.png,everyday\n")
    with pytest.raises(DataError, match="no images listed"):
        read_folder(tmp_path / "listed", "category")
    assert main(["calibrate", "--model", "x", "--data", "y", "--guard_only", "true", "--int8_only", "true"]) == 2


def test_greyscale_is_told_apart_by_colour():
    grey = np.stack([np.full((64, 64), 120, np.uint8)] * 3, axis=-1)
    skin = np.zeros((64, 64, 3), np.uint8) + np.array([200, 140, 120], np.uint8)
    assert ood.colour_stats(grey)[1] > ood.GREY_SHARE > ood.colour_stats(skin)[1]


def test_the_probe_s_floor_leaves_a_margin_below_every_image_it_was_fitted_to_keep():
    """The floor is PROBE_MARGIN times the lowest of validation's 1% quantile and the fitted external images."""
    rng = np.random.default_rng(0)
    centre = np.zeros(8)
    train = rng.normal(centre, 1.0, (200, 8))
    guard = ood.Guard.fit(train, np.arange(200) % 2, rng.normal(centre, 1.0, (50, 8)), dims=4)
    colours = lambda n: np.tile([0.4, 0.1], (n, 1))  # noqa: E731
    negatives = rng.normal(centre + 3, 1.0, (60, 8))
    external = rng.normal(centre + 1.5, 1.0, (20, 8))  # between the two, as other dermatoscopes are
    val = rng.normal(centre, 1.0, (50, 8))
    fit = dict(pos_f=np.r_[train, external], pos_c=colours(220), neg_f=negatives, neg_c=colours(60),
               neg_kinds=["photo"] * 60, val_f=val, val_c=colours(50), positives_fit=external,
               positives_fit_colours=colours(20))
    bare = ood.Probe.fit(guard, **fit, margin=1.0)
    probe = ood.Probe.fit(guard, **fit)
    assert probe.min_dermoscopic == pytest.approx(ood.PROBE_MARGIN * bare.min_dermoscopic)
    lowest = min(np.quantile(bare.probabilities(guard, val, colours(50))[:, 0], 1 - ood.KEEP_QUANTILE),
                 bare.probabilities(guard, external, colours(20))[:, 0].min())
    assert bare.min_dermoscopic == pytest.approx(lowest)
    assert probe.accepts(guard, external, colours(20)).all()
