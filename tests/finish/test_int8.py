"""int8 ONNX Runtime: built from ranges that travel with the model, gated against fp32, falling back cleanly."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from ham_hf import results
from ham_hf.serve import export
from ham_hf.serve.classifier import Classifier

pytest.importorskip("onnxruntime.quantization")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private ONNX cache folder."""
    monkeypatch.setenv("HAM_HF_CACHE", str(tmp_path / "cache"))
    return export.cache_dir()


def _int8(folder) -> dict:
    """The int8 section of a model folder's results record (the gate the classifier reads)."""
    return results.load(folder).get("int8", {})


def _copy(model, tmp_path, name="m"):
    folder = tmp_path / name
    shutil.copytree(model, folder)
    return folder


def test_calibration_writes_ranges_and_a_fidelity_record(calibrated_tiny_model):
    fidelity = _int8(calibrated_tiny_model)
    for key in ("top1_agreement", "balanced_accuracy_fp32", "balanced_accuracy_int8", "max_probability_difference",
                "mean_probability_difference", "ood_verdict_agreement", "passed", "gate"):
        assert key in fidelity, key
    assert fidelity["passed"] == (fidelity["top1_agreement"] >= 0.99
                                  and fidelity["balanced_accuracy_fp32"] - fidelity["balanced_accuracy_int8"] <= 0.01
                                  and fidelity["ood_verdict_agreement"] >= 0.99)
    assert json.loads((calibrated_tiny_model / export.INT8_RANGES).read_text())["data"]


def test_int8_is_built_from_the_shipped_ranges_and_agrees_with_fp32(calibrated_tiny_model, ham_dir_ro, cache):
    images = sorted(str(p) for p in ham_dir_ro.glob("HAM10000_images_part_*/*.jpg"))[:24]
    int8 = Classifier(str(calibrated_tiny_model), backend="onnx-int8")
    fp32 = Classifier(str(calibrated_tiny_model), backend="onnx")
    assert int8.backend == "onnx-int8" and fp32.backend == "onnx"
    p8, p32 = int8.predict_proba(images), fp32.predict_proba(images)
    assert np.abs(p8 - p32).max() < 0.1 and (p8.argmax(1) == p32.argmax(1)).mean() >= 0.9
    assert len(list(cache.glob("*-int8.onnx"))) == 1


def test_auto_follows_the_fidelity_gate(calibrated_tiny_model, tmp_path, cache, caplog):
    folder = _copy(calibrated_tiny_model, tmp_path)
    record = _int8(folder)
    for passed, expected in ((True, "onnx-int8"), (False, "onnx")):
        results.update(folder, int8={**record, "passed": passed})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ham_hf.serve.classifier"):
            assert Classifier(str(folder)).backend == expected
        if not passed:
            assert "int8 not used (its fidelity check failed" in caplog.text


@pytest.mark.parametrize("damage", ["missing ranges", "corrupt ranges", "corrupt cached file"])
def test_int8_trouble_falls_back_to_fp32_with_one_line(calibrated_tiny_model, ham_dir_ro, tmp_path, cache, caplog,
                                                        damage):
    folder = _copy(calibrated_tiny_model, tmp_path)
    results.update(folder, int8={**_int8(folder), "passed": True})
    if damage == "missing ranges":
        (folder / export.INT8_RANGES).unlink()
    elif damage == "corrupt ranges":
        (folder / export.INT8_RANGES).write_text("{not json")
    else:
        assert Classifier(str(folder)).backend == "onnx-int8"
        for path in cache.glob("*-int8.onnx"):
            path.write_bytes(b"garbage")
    with caplog.at_level(logging.INFO, logger="ham_hf.serve.classifier"):
        clf = Classifier(str(folder))
    assert clf.backend == "onnx" and caplog.text.count("int8 not used") == 1
    assert clf.predict_proba([str(next(ham_dir_ro.glob("HAM10000_images_part_1/*.jpg")))]).shape == (1, 7)


def test_int8_cache_follows_the_weights(calibrated_tiny_model, tmp_path, cache):
    import torch

    from ham_hf import model as model_lib

    a = model_lib.load_model(str(calibrated_tiny_model))
    first = export.cached_int8(a, 40, calibrated_tiny_model / export.INT8_RANGES)
    assert export.cached_int8(a, 40, calibrated_tiny_model / export.INT8_RANGES) == first  # reused
    with torch.no_grad():
        model_lib.head(a).bias.add_(1.0)
    second = export.cached_int8(a, 40, calibrated_tiny_model / export.INT8_RANGES)
    assert second != first and second.is_file()


def test_unknown_backend_is_refused(calibrated_tiny_model):
    from ham_hf.errors import ModelError

    with pytest.raises(ModelError, match="unknown backend 'gpu'; choose one of auto, onnx-int8, onnx, torch"):
        Classifier(str(calibrated_tiny_model), backend="gpu")


@pytest.mark.slow
def test_bundled_int8_reproduces_its_recorded_fidelity_on_real_images(bundled_model, real_ham_dir, tmp_path, cache):
    """On real validation images, int8 and fp32 agree as the model's own record says (and the gate decides)."""
    import csv

    record = _int8(bundled_model)
    if not record:
        pytest.skip("the bundled model has no int8 record")
    ids = [r["image_id"] for r in csv.DictReader((bundled_model / "split.csv").open()) if r["split"] == "validation"]
    rng = np.random.default_rng(0)
    paths = [str(next(real_ham_dir.glob(f"HAM10000_images_part_*/{i}.jpg"))) for i in rng.choice(ids, 200, False)]
    p8 = Classifier(str(bundled_model), backend="onnx-int8").predict_proba(paths)
    p32 = Classifier(str(bundled_model), backend="onnx").predict_proba(paths)
    agreement = (p8.argmax(1) == p32.argmax(1)).mean()
    assert abs(agreement - record["top1_agreement"]) < 0.03, (agreement, record["top1_agreement"])
    assert Classifier(str(bundled_model)).backend == ("onnx-int8" if record["passed"] else "onnx")


def test_int8_leaves_the_stem_first_stage_and_head_float(calibrated_tiny_model, cache):
    """The quantized graph keeps float convolutions up to stride FLOAT_UNTIL_STRIDE and the head; the rest is int8."""
    import onnx

    from ham_hf import model as model_lib

    model = model_lib.load_model(str(calibrated_tiny_model))
    graph = onnx.load(str(export.cached_int8(model, 40, calibrated_tiny_model / export.INT8_RANGES))).graph
    dequantized = {t for n in graph.node if n.op_type == "DequantizeLinear" for t in n.output}
    convs = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    quantized = [bool(dequantized & set(n.input)) for n in convs]
    assert not quantized[0] and not quantized[-1]  # the stem, and the head (Gemm)
    assert any(quantized) and sum(quantized) < len(convs) - 1


def test_calibrate_int8_only_refits_int8_and_nothing_else(calibrated_tiny_model, ham_dir_ro, tmp_path, cache):
    """`ham-hf calibrate --int8_only` rewrites the int8 files; weights, guard and temperature are left alone."""
    from ham_hf.cli import main
    from ham_hf.serve import guard as guard_lib

    folder = _copy(calibrated_tiny_model, tmp_path)
    stale = json.loads((folder / export.INT8_RANGES).read_text())
    for tensor in stale["data"].values():  # ranges of another model: they must be measured again, not reused
        tensor["highest"]["data"] = [x * 10 + 1 for x in tensor["highest"]["data"]]
    (folder / export.INT8_RANGES).write_text(json.dumps(stale))
    results.update(folder, int8=None)
    kept = {name: (folder / name).read_bytes() for name in ("model.safetensors", guard_lib.GUARD_FILE)}
    before = results.load(folder)
    assert main(["calibrate", "--model", str(folder), "--data", str(ham_dir_ro), "--int8_only", "true"]) == 0
    assert all((folder / name).read_bytes() == data for name, data in kept.items())
    assert json.loads((folder / export.INT8_RANGES).read_text()) == json.loads(
        (calibrated_tiny_model / export.INT8_RANGES).read_text())
    after = results.load(folder)
    assert after["head"] == before["head"] and after["splits"] == before["splits"]
    assert after["int8"]["n_validation"] > 0 and "top1_agreement" in after["int8"]
    card = (folder / "README.md").read_text()
    assert "## int8 on the CPU" in card and "95% confidence intervals" in card
    assert f"top-1 agreement {after['int8']['top1_agreement']:.4f}" in card
    assert f"T = {after['head']['temperature']:.3f}" in card


def test_calibration_without_onnx_runtime_skips_int8_with_one_line(tiny_model, ham_dir_ro, tmp_path, caplog,
                                                                   monkeypatch):
    """A machine without onnxruntime (the lent GPU's) still calibrates and guards; int8 is left for later."""
    import importlib.util

    from ham_hf.cli import main
    from ham_hf.serve import guard as guard_lib

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "onnxruntime" else real_find_spec(name, *a, **k))
    out = tmp_path / "calibrated"
    assert main(["calibrate", "--model", str(tiny_model), "--data", str(ham_dir_ro), "--output", str(out)]) == 0
    assert (out / guard_lib.GUARD_FILE).is_file() and not (out / export.INT8_RANGES).exists()
    assert "onnxruntime not installed here; run `ham-hf calibrate --int8_only true`" in caplog.text
    assert "int8" not in results.load(out)


def test_training_can_leave_int8_to_calibrate(ham_dir_ro, tiny_backbone, tmp_path, cache):
    """`--calibrate_int8 false` (the GPU sweep's): calibrated and guarded, int8 measured later by `--int8_only`."""
    from ham_hf.cli import main
    from ham_hf.serve import guard as guard_lib

    from conftest import train_argv

    out = tmp_path / "run"
    assert main(train_argv(ham_dir_ro, tiny_backbone, out, "--calibrate_int8", "false", "--num_train_epochs", "1")) == 0
    record = results.load(out)
    assert record["head"]["temperature"] > 0 and (out / guard_lib.GUARD_FILE).is_file()
    assert not (out / export.INT8_RANGES).exists() and "int8" not in record
    assert main(["calibrate", "--model", str(out), "--data", str(ham_dir_ro), "--int8_only", "true"]) == 0
    assert (out / export.INT8_RANGES).is_file() and "top1_agreement" in results.load(out)["int8"]
