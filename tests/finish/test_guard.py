"""The guard's fit with a kind probe: real negatives and other sources' dermoscopy, judged source by source."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ham_hf.cli import main
from ham_hf.errors import DataError, ModelError
from ham_hf.finish import guard as guard_fit
from ham_hf.finish.guard import read_folder
from ham_hf.serve import guard as guard_lib
from ham_hf.serve.classifier import Classifier

from conftest import CLASS_COLOURS, tiny_jpeg


def _negatives(root):
    """A folder like ood-dev: generated photos, charts and scans by category, from two sources."""
    rows = ["file,category,source"]
    images = dict(guard_fit.generated_images(seed=3))
    groups = {"everyday": [k for k in images if k.startswith(("noise", "gradient"))],
              "document": [k for k in images if k.startswith("chart")],
              "skin_clinical": ["solid-230-180-160", "solid-200-120-100", "solid-120-80-60"],
              "medical": ["solid-128-128-128", "solid-0-0-0", "solid-255-255-255"]}
    (root / "images").mkdir(parents=True)
    for category, names in groups.items():
        for i, name in enumerate(names):
            images[name].save(root / "images" / f"{category}_{name}.png")
            rows.append(f"images/{category}_{name}.png,{category},{category}-{'a' if i % 2 else 'b'}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def _positives(root):
    """A folder like dermoscopy-external: lesion-like images from two 'sources' (named by the file prefix)."""
    rows = ["file,dx"]
    for i, (code, colour) in enumerate(list(CLASS_COLOURS.items()) * 2):
        name = f"{'srca' if i % 2 else 'srcb'}_{i}.jpg"
        tiny_jpeg(root / "images" / name, colour, seed=100 + i)
        rows.append(f"images/{name},{code}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def test_the_guard_learns_from_real_folders_and_is_judged_source_by_source(calibrated_tiny_model, ham_dir_ro,
                                                                           tmp_path):
    model = tmp_path / "model"
    shutil.copytree(calibrated_tiny_model, model)
    weights = (model / "model.safetensors").read_bytes()
    negatives, positives = _negatives(tmp_path / "neg"), _positives(tmp_path / "pos")
    assert main(["calibrate", "--model", str(model), "--data", str(ham_dir_ro), "--guard_only", "true",
                 "--guard_negatives", str(negatives), "--guard_positives", str(positives)]) == 0
    assert (model / "model.safetensors").read_bytes() == weights  # the guard alone was refitted
    guard = guard_lib.Guard.load(model / guard_lib.GUARD_FILE)
    assert guard.probe is not None and {"photo", "document", "skin photo", "medical", "other"} <= set(guard.probe.kinds)
    before = json.loads((calibrated_tiny_model / "results.json").read_text())["guard"]
    results = json.loads((model / "results.json").read_text())["guard"]
    by_source = results["by_source"]  # every source but the home one and the generated images, held out once
    categories = ("everyday", "document", "skin_clinical", "medical")
    assert set(by_source) == {f"{c}-{x}" for c in categories for x in "ab"} | {"srca", "srcb"}
    assert by_source["srca"]["kind"] == "dermoscopic" and by_source["srca"]["n"] == 7
    for key in ("loso_far_flagged_worst", "loso_skin_photo_flagged_mean", "loso_external_kept_worst",
                "validation_kept"):
        assert 0 <= results[key] <= 1, key
    assert "probe_kinds" not in before  # the guard section is replaced whole: a refit's figures, nothing older
    card = (model / "README.md").read_text()  # the card says how the guard holds on each held-out source
    assert "Judged by source" in card
    assert f"worst source {100 * results['loso_external_kept_worst']:.1f}%" in card
    assert f"| srca | dermoscopic | 7 | {100 * by_source['srca']['share']:.1f}% kept |" in card
    # The verdict carries the kind through the product's predictions.
    clf = Classifier(str(model), backend="torch")
    flagged = [p for p in clf.predict([str(p) for p in (negatives / "images").glob("*.png")]) if not p.in_distribution]
    assert flagged and all(p.ood_kind in (*guard_lib.KINDS[1:], "greyscale") for p in flagged)
    # A saved guard reads back exactly.
    again = guard_lib.Guard.load(model / guard_lib.GUARD_FILE)
    np.testing.assert_array_equal(again.probe.weight, guard.probe.weight)
    assert again.probe.min_dermoscopic == guard.probe.min_dermoscopic and again.probe.kinds == guard.probe.kinds


def test_the_guard_s_folders_are_checked_with_messages_that_name_the_fix(calibrated_tiny_model, ham_dir_ro, tmp_path,
                                                                         caplog):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no metadata.csv"):
        read_folder(tmp_path / "empty", "category")
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "metadata.csv").write_text("file,category\n")
    with pytest.raises(DataError, match="lists no images"):
        read_folder(tmp_path / "listed", "category")
    (tmp_path / "listed" / "metadata.csv").write_text("file,category\nimages/gone.png,everyday\n")
    with pytest.raises(DataError, match=r"row 2: 'images/gone.png' is not there; add the file or delete its row"):
        read_folder(tmp_path / "listed", "category")
    assert main(["calibrate", "--model", "x", "--data", "y", "--guard_only", "true", "--int8_only", "true"]) == 2
    # Negatives from one source leave nothing to judge by: one message, and the model folder untouched.
    one = _negatives(tmp_path / "one")
    table = one / "metadata.csv"
    table.write_text("\n".join(line.rsplit(",", 1)[0] + ",camera-b" for line in table.read_text().splitlines()[1:])
                     .join(["file,category,source\n", "\n"]))
    model = tmp_path / "model"
    shutil.copytree(calibrated_tiny_model, model)
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    assert main(["calibrate", "--model", str(model), "--data", str(ham_dir_ro), "--guard_only", "true",
                 "--guard_negatives", str(one), "--guard_positives", str(_positives(tmp_path / "pos"))]) == 2
    assert "come from one source (camera-b)" in caplog.text, caplog.text
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before


def test_sources_come_from_the_metadata():
    from pathlib import Path

    from ham_hf.finish.guard import source_of

    assert source_of({"source": "clinic-7"}, Path("x.jpg")) == "clinic-7"
    assert source_of({"source_dataset": "PH2 (original 768x560 BMP)"}, Path("ph2_1.bmp")) == "PH2"
    wound = {"source_repo": "lab/wounds", "source_path": "data/Medetec_224/test/images/1.png"}
    assert source_of(wound, Path("skin_1.png")) == "lab/wounds/Medetec_224"
    assert source_of({"source_repo": "org/lib", "source_path": "src/data/astronaut.png"}, Path("a.png")) == "org/lib"
    assert source_of({}, Path("derm7pt_abc.jpg")) == "derm7pt"


def test_a_guard_of_the_previous_version_says_to_refit(tmp_path):
    from safetensors.numpy import save_file

    arrays = {k: np.zeros((2, 2), np.float32) for k in ("mean", "components", "centres", "precision", "probe_weight")}
    save_file(arrays, str(tmp_path / "old.safetensors"), metadata={"threshold": "1.0", "version": "2"})
    with pytest.raises(ModelError, match=r"version 2.*refit it with `ham-hf calibrate"):
        guard_lib.Guard.load(tmp_path / "old.safetensors")


def test_greyscale_is_told_apart_by_colour():
    grey = np.stack([np.full((64, 64), 120, np.uint8)] * 3, axis=-1)
    skin = np.zeros((64, 64, 3), np.uint8) + np.array([200, 140, 120], np.uint8)
    assert guard_lib.colour_stats(grey)[1] > guard_lib.GREY_SHARE > guard_lib.colour_stats(skin)[1]


def test_colour_statistics_are_hsv_saturation_of_every_fourth_pixel():
    """Mean HSV saturation and the share under GREY_SATURATION, on a batch and on one image, against colorsys."""
    import colorsys

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    images[1, :20] = images[1, :20, :, :1]  # half grey
    images[2] = 0  # black: saturation 0, not a division by zero
    for image, got in zip(images, guard_lib.colour_stats(images)):
        sat = np.array([colorsys.rgb_to_hsv(*(p / 255.0))[1] for p in image[::4, ::4].reshape(-1, 3)])
        np.testing.assert_allclose(got, [sat.mean(), (sat < guard_lib.GREY_SATURATION).mean()], atol=1e-6)
        np.testing.assert_array_equal(guard_lib.colour_stats(image), got)


def test_the_probe_s_floor_keeps_what_a_fit_without_each_source_would():
    """The floor: the lowest of validation's keep quantile and, per other source of dermoscopy, the
    PROBE_QUANTILE of P(dermoscopic) from a fit without it; sources weigh alike whatever their size."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    texture = lambda centre, n: np.exp(rng.normal(centre, 0.3, (n, 6)))  # noqa: E731 (positive, like the stats)
    colours = lambda n: np.tile([0.4, 0.1], (n, 1))  # noqa: E731
    home, far_derm, near_derm = texture(0.0, 300), texture(-0.8, 15), texture(-0.2, 15)
    photos, charts = texture(np.r_[2.0, 2.0, 2.0, 0, 0, 0], 40), texture(np.r_[0, 0, 0, 2.0, 2.0, 2.0], 10)
    t = np.r_[home, far_derm, near_derm, photos, charts]
    kinds = ["dermoscopic"] * 330 + ["photo"] * 40 + ["document"] * 10
    sources = ["home"] * 300 + ["far"] * 15 + ["near"] * 15 + ["cam"] * 40 + ["docs"] * 10
    val = texture(0.0, 100)
    probe = guard_fit.fit_probe(t, colours(len(t)), kinds, sources, val, colours(100), home="home")
    assert probe.kinds == ("photo", "document")
    z = (guard_lib.Probe.inputs(t, colours(len(t))) - probe.offset) / probe.scale
    positive, src = np.array(kinds) == "dermoscopic", np.array(sources)
    floors = [np.quantile(probe.dermoscopic(val, colours(100)), 1 - guard_lib.KEEP_QUANTILE)]
    for held in ("far", "near"):
        rest = src != held
        w = guard_fit.source_weights(positive[rest], src[rest])
        model = LogisticRegression(C=guard_fit.PROBE_C, max_iter=3000).fit(z[rest], positive[rest], sample_weight=w)
        floors.append(np.quantile(model.predict_proba(z[src == held])[:, 1], guard_fit.PROBE_QUANTILE))
    assert probe.min_dermoscopic == pytest.approx(min(floors), rel=1e-4)
    assert (probe.dermoscopic(photos, colours(40)) < probe.min_dermoscopic).all()
    assert set(probe.kind_of(np.r_[photos[:3], charts[:3]], colours(6))) == {"photo", "document"}
    w = guard_fit.source_weights(np.array([1, 1, 1, 0]), np.array(["a", "a", "b", "c"]))
    assert w.tolist() == pytest.approx([0.5, 0.5, 1.0, 2.0])  # a and b weigh alike; the classes weigh alike
