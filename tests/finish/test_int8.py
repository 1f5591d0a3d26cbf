"""int8 ONNX Runtime: built from ranges that travel with the model, gated against fp32, falling back cleanly."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

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
                                  and fidelity["balanced_accuracy_fp32"] - fidelity["balanced_accuracy_int8"] <= 0.005
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


def _quantized_convolutions(graph) -> list[bool]:
    """For each convolution (and the head's Gemm) in graph order: does it read int8 (dequantized) weights?"""
    dequantized = {t for n in graph.node if n.op_type == "DequantizeLinear" for t in n.output}
    return [bool(dequantized & set(n.input)) for n in graph.node if n.op_type in ("Conv", "Gemm")]


def _calibrate_int8(folder, ham_dir_ro, *options) -> dict:
    """`ham-hf calibrate --int8_only true` on folder; its int8 record."""
    from ham_hf.cli import main

    assert main(["calibrate", "--model", str(folder), "--data", str(ham_dir_ro), "--int8_only", "true", *options]) == 0
    return _int8(folder)


@pytest.fixture(scope="module")
def tuned_tiny_model(calibrated_tiny_model, ham_dir_ro, tmp_path_factory) -> Path:
    """The calibrated tiny model with a tuned whole-network int8 graph that passed (the guard's part of the gate
    relaxed: a guard fitted on coloured squares is no guide)."""
    from ham_hf.finish import int8 as int8_fit

    folder = _copy(calibrated_tiny_model, tmp_path_factory.mktemp("tuned"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HAM_HF_CACHE", str(folder.parent / "cache"))
        mp.setattr(int8_fit, "INT8_GATE", {**int8_fit.INT8_GATE, "ood_verdict_agreement": 0.0})
        _calibrate_int8(folder, ham_dir_ro, "--int8_tuning_steps", "12")
    return folder


def test_tuned_int8_that_passes_is_the_whole_network_but_the_head(tuned_tiny_model, cache):
    """A tuned graph that passes the gate is kept: every convolution int8, the head float, and auto serves it."""
    import onnx

    record = _int8(tuned_tiny_model)
    assert record["passed"] and record["rejected"] == []
    assert record["recipe"]["float_until_stride"] == 0 and record["recipe"]["tuning"]["steps"] == 12
    assert set(record["files"]) == {export.INT8_RANGES, export.INT8_WEIGHTS}
    clf = Classifier(str(tuned_tiny_model))
    assert clf.backend == "onnx-int8"
    quantized = _quantized_convolutions(onnx.load(str(clf._int8_graph())).graph)
    assert all(quantized[:-1]) and not quantized[-1]
    assert "fine-tuned quantization-aware for 12 steps" in (tuned_tiny_model / "README.md").read_text()


def test_the_texture_statistics_dequantize_each_stage_once_with_the_same_outputs(tuned_tiny_model, ham_dir_ro,
                                                                                   tmp_path, cache, monkeypatch):
    """The int8 graph reads each stage's map once for its texture statistics (one DequantizeLinear, not one per use
    after ONNX Runtime's optimisation), and every output is the same, bit for bit, as without that rewrite."""
    import onnx
    import onnxruntime as ort

    from ham_hf.model import TEXTURE_STAGES

    clf = Classifier(str(tuned_tiny_model))
    served = Path(clf._graph.path)
    assert sum(n.name.endswith("/texture_once") for n in onnx.load(str(served)).graph.node) == TEXTURE_STAGES
    monkeypatch.setattr(export, "texture_reads_once", lambda graph: 0)
    with pytest.MonkeyPatch.context() as mp:  # the served model's own build, with the rewrite left out
        mp.setattr(export, "int8_recipe", lambda stride: "without the rewrite")
        plain = Path(clf._int8_graph())
    assert plain != served

    def session(path, name):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / name)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    sessions = [session(served, "served.onnx"), session(plain, "plain.onnx")]
    images = sorted(ham_dir_ro.glob("HAM10000_images_part_*/*.jpg"))[:8]
    x = clf.pixels(torch.stack([clf.decode(str(f)) for f in images])).numpy()
    names = ["logits", "features", "texture", "feature_map"]
    for once, many in zip(*(s.run(names, {"pixel_values": x}) for s in sessions)):
        assert np.array_equal(once, many)
    dequantize = [sum(n.op_type == "DequantizeLinear" for n in onnx.load(str(tmp_path / name)).graph.node)
                  for name in ("served.onnx", "plain.onnx")]
    assert dequantize[0] <= dequantize[1] - TEXTURE_STAGES, dequantize


def test_a_tuned_graph_that_fails_gives_way_to_the_post_training_one(calibrated_tiny_model, ham_dir_ro, tmp_path,
                                                                     cache, monkeypatch):
    """When the tuned whole-network graph fails the gate, the stem-and-first-stage-float graph is measured and
    kept (here failing too: an impossible gate), the tuned one named in `rejected`; no tuned weights are left."""
    from ham_hf.finish import int8 as int8_fit

    monkeypatch.setattr(int8_fit, "INT8_GATE", {**int8_fit.INT8_GATE, "top1_agreement": 1.01})
    folder = _copy(calibrated_tiny_model, tmp_path)
    record = _calibrate_int8(folder, ham_dir_ro, "--int8_tuning_steps", "12")
    assert not record["passed"] and record["recipe"]["float_until_stride"] == export.FLOAT_UNTIL_STRIDE
    # Rejected: the tuned graph alone, then the same graph with float32 answering its close calls.
    assert [r["recipe"]["tuning"]["steps"] for r in record["rejected"]] == [12, 12]
    assert [r["recipe"]["cascade"] is None for r in record["rejected"]] == [True, False]
    assert 0 <= record["rejected"][1]["sent_to_fp32"] <= 1
    assert not (folder / export.INT8_WEIGHTS).exists() and set(record["files"]) == {export.INT8_RANGES}
    card = (folder / "README.md").read_text()
    assert "Not kept: the whole network in int8 after 12 tuning steps (top-1" in card
    assert "Not kept: the whole network in int8 after 12 tuning steps, with float32 answering the close calls" in card


def test_post_training_int8_leaves_the_stem_first_stage_and_head_float(calibrated_tiny_model, ham_dir_ro, tmp_path,
                                                                        cache):
    """`--int8_tuning_steps 0`: float convolutions up to stride FLOAT_UNTIL_STRIDE and the head; the rest int8."""
    import onnx

    folder = _copy(calibrated_tiny_model, tmp_path)
    record = _calibrate_int8(folder, ham_dir_ro, "--int8_tuning_steps", "0")
    assert record["recipe"]["float_until_stride"] == export.FLOAT_UNTIL_STRIDE and record["recipe"]["tuning"] is None
    assert not (folder / export.INT8_WEIGHTS).exists() and set(record["files"]) == {export.INT8_RANGES}
    assert record["rejected"] == []
    graph = onnx.load(str(Classifier(str(folder), backend="onnx-int8")._int8_graph())).graph
    quantized = _quantized_convolutions(graph)
    assert not quantized[0] and not quantized[-1]  # the stem, and the head (Gemm)
    assert any(quantized) and sum(quantized) < len(quantized) - 1


def test_the_simulation_runs_the_network_as_the_int8_graph_does(calibrated_tiny_model, ham_dir_ro, tmp_path):
    """Fake-quantised PyTorch (what tuning trains) is closer to the int8 graph's logits than float32 is."""
    import torch

    from ham_hf import model as model_lib
    from ham_hf.finish import qat
    from ham_hf.finish.int8 import _float_batches, _onnx_outputs
    from ham_hf.transforms import decode_images

    model = model_lib.load_model(str(calibrated_tiny_model)).float().eval()
    dc = model_lib.data_config(model)
    images = decode_images(sorted(str(p) for p in ham_dir_ro.glob("HAM10000_images_part_*/*.jpg"))[:48], dc)
    batches = _float_batches(images, dc)
    fp32 = export.export_onnx(model, dc.size, tmp_path / "fp32.onnx")
    assert not model.training  # the export leaves the model as it found it
    int8 = export.quantize_int8(fp32, tmp_path / "int8.onnx", tmp_path / "ranges.json", batches, float_until_stride=0)
    z32, z8 = _onnx_outputs(fp32, batches)[0], _onnx_outputs(int8, batches)[0]
    x = torch.from_numpy(np.concatenate(batches))
    with torch.no_grad(), qat.fake_quantized(model.timm_model, qat.activation_quantization(int8),
                                             qat.folded_pairs(model.timm_model, dc.size)):
        simulated = model(pixel_values=x).logits.numpy()
    with torch.no_grad():  # and the network is itself again afterwards
        assert np.abs(model(pixel_values=x).logits.numpy() - z32).max() < 1e-4
    assert np.abs(z8 - z32).max() > 1e-3  # int8 does change the logits of this model
    assert np.abs(simulated - z8).mean() < 0.6 * np.abs(z32 - z8).mean()


def test_the_gate_refuses_a_graph_that_disagrees(calibrated_tiny_model, ham_dir_ro, tmp_path, cache, caplog):
    """Ranges forced far too narrow clip every activation: the gate fails it and float32 is served, with one line."""
    import torch

    from ham_hf import model as model_lib
    from ham_hf.finish.int8 import _float_batches, judge_int8
    from ham_hf.transforms import CachedImages, decode_images

    model = model_lib.load_model(str(calibrated_tiny_model)).float().eval()
    dc = model_lib.data_config(model)
    paths = sorted(ham_dir_ro.glob("HAM10000_images_part_*/*.jpg"))[:64]
    images = decode_images([str(p) for p in paths], dc)
    fp32 = export.export_onnx(model, dc.size, tmp_path / "fp32.onnx")
    ranges = tmp_path / "ranges.json"
    export.quantize_int8(fp32, tmp_path / "good.onnx", ranges, _float_batches(images, dc), float_until_stride=0)
    table = json.loads(ranges.read_text())
    for tensor in table["data"].values():  # a hundredth of every measured range
        for end in ("lowest", "highest"):
            tensor[end]["data"] = [x / 100 for x in tensor[end]["data"]]
    ranges.write_text(json.dumps(table))
    bad = export.quantize_int8(fp32, tmp_path / "bad.onnx", ranges, float_until_stride=0)
    labels = torch.arange(len(images)) % 7
    figures = judge_int8(fp32, bad, dc, CachedImages(images, labels.tolist()), None)
    assert not figures["passed"] and figures["top1_agreement"] < 0.99
    folder = _copy(calibrated_tiny_model, tmp_path)
    results.update(folder, int8={**_int8(folder), **figures})
    with caplog.at_level(logging.INFO, logger="ham_hf.serve.classifier"):
        assert Classifier(str(folder)).backend == "onnx"
    assert caplog.text.count("int8 not used (its fidelity check failed") == 1


@pytest.mark.parametrize("damage", ["another model", "older version", "other tuned weights", "no tuned weights"])
def test_int8_files_not_made_for_this_model_are_refused(tuned_tiny_model, ham_dir_ro, tmp_path, cache, caplog,
                                                        damage):
    """int8 files of other weights or an older ham-hf are never served: float32 answers, and one line says why."""
    from safetensors.torch import load_file, save_file

    folder = _copy(tuned_tiny_model, tmp_path)
    record = {**_int8(folder), "passed": True}
    if damage == "another model":
        record["made_for"] = "0" * 20
    elif damage == "older version":
        record.pop("recipe")
    elif damage == "other tuned weights":
        tuned = load_file(str(folder / export.INT8_WEIGHTS))
        save_file({k: v * 1.01 for k, v in tuned.items()}, str(folder / export.INT8_WEIGHTS))
    else:
        (folder / export.INT8_WEIGHTS).unlink()
    results.update(folder, int8=record)
    why = {"another model": "made for other weights", "older version": "of an older format",
           "other tuned weights": "int8_weights.safetensors is missing or not the file",
           "no tuned weights": "int8_weights.safetensors is missing or not the file"}[damage]
    with caplog.at_level(logging.INFO, logger="ham_hf.serve.classifier"):
        clf = Classifier(str(folder))
    assert clf.backend == "onnx" and caplog.text.count("int8 not used") == 1 and why in caplog.text
    image = [str(next(ham_dir_ro.glob("HAM10000_images_part_1/*.jpg")))]
    np.testing.assert_allclose(clf.predict_proba(image), Classifier(str(folder), backend="onnx").predict_proba(image))
    assert not list(cache.glob("*-int8.onnx"))


def test_a_runtime_without_quantization_tools_serves_float(calibrated_tiny_model, tmp_path, cache, caplog,
                                                           monkeypatch):
    """An ONNX Runtime build without its quantization package: float32 with one line, no crash."""
    import sys

    folder = _copy(calibrated_tiny_model, tmp_path)
    results.update(folder, int8={**_int8(folder), "passed": True})
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    with caplog.at_level(logging.INFO, logger="ham_hf.serve.classifier"):
        assert Classifier(str(folder)).backend == "onnx"
    assert caplog.text.count("int8 not used (this ONNX Runtime has no quantization tools") == 1


def test_calibrate_int8_only_refits_int8_and_nothing_else(calibrated_tiny_model, ham_dir_ro, tmp_path, cache):
    """`ham-hf calibrate --int8_only` rewrites the int8 files; weights, guard and temperature are left alone."""
    from ham_hf import model as model_lib
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
    assert after["int8"]["made_for"] == export.backbone_digest(model_lib.load_model(str(folder)))
    assert after["int8"]["files"] == {name: export.file_digest(folder / name) for name in after["int8"]["files"]}
    assert export.INT8_RANGES in after["int8"]["files"]
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


def test_learned_ranges_reach_the_graph_exactly(calibrated_tiny_model, ham_dir_ro, tmp_path):
    """Tuning's learned (scale, zero point) written as ranges come back from ONNX Runtime's quantizer unchanged."""
    from ham_hf import model as model_lib
    from ham_hf.finish import qat
    from ham_hf.finish.int8 import _float_batches
    from ham_hf.transforms import decode_images

    model = model_lib.load_model(str(calibrated_tiny_model)).float().eval()
    dc = model_lib.data_config(model)
    images = decode_images(sorted(str(p) for p in ham_dir_ro.glob("HAM10000_images_part_*/*.jpg"))[:16], dc)
    fp32 = export.export_onnx(model, dc.size, tmp_path / "fp32.onnx")
    ranges = tmp_path / "ranges.json"
    first = qat.activation_quantization(export.quantize_int8(fp32, tmp_path / "a.onnx", ranges,
                                                             _float_batches(images, dc), float_until_stride=0))
    shared = qat.shared_quantization(tmp_path / "a.onnx")
    assert shared  # the tiny network's max and average poolings
    tuned = {t: (scale * 0.37, zero) for t, (scale, zero) in first.items() if qat.tuned_tensor(t)}
    assert tuned and "pixel_values" not in tuned
    qat.write_ranges(ranges, tuned)
    second = qat.activation_quantization(export.quantize_int8(fp32, tmp_path / "b.onnx", ranges, float_until_stride=0))
    for tensor, (scale, zero) in second.items():
        want = tuned.get(tensor, tuned.get(shared.get(tensor), first[tensor]))
        assert zero == want[1] and scale == pytest.approx(want[0], rel=1e-5), tensor


def test_the_cascade_margin_sends_the_close_calls_to_float():
    """The margin is the smallest that keeps the asked share of float32's decisions: just above the flips it sends."""
    from ham_hf.finish.int8 import cascade_margin, cascaded

    z32 = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]] * 25)  # 100 images
    z8 = z32.copy()
    z8[:3] = [[0.4, 0.5], [0.3, 0.0], [0.0, 0.9]]  # three flips, int8 margins 0.1, 0.3 and 0.9
    assert cascade_margin(z32, z8, keep=1.0) == pytest.approx(0.9) and cascade_margin(z32, z8, keep=1.0) > 0.9
    assert cascade_margin(z32, z8, keep=0.98) == pytest.approx(0.1)  # two flips may stay: the widest two
    assert cascade_margin(z32, z8, keep=0.97) == 0.0 and cascade_margin(z32, z32, keep=1.0) == 0.0
    features = np.arange(200.0).reshape(100, 2)
    (logits, feats), sent = cascaded((z32, features), (z8, -features), cascade_margin(z32, z8, keep=1.0))
    assert (logits.argmax(1) == z32.argmax(1)).all() and sent[:3].all() and sent.sum() == 3
    np.testing.assert_array_equal(feats[sent], features[sent])
    np.testing.assert_array_equal(feats[~sent], -features[~sent])
    assert not cascaded((z32,), (z8,), None)[1].any()


@pytest.fixture(scope="module")
def cascade_tiny_model(calibrated_tiny_model, ham_dir_ro, tmp_path_factory) -> Path:
    """A tiny model whose tuned whole-network graph fails the gate (its ranges narrowed a hundredfold after
    tuning) and whose cascade passes (its margin forced above every image's, the share sent to float32 allowed)."""
    from ham_hf.finish import int8 as int8_fit

    tune = int8_fit.tune_int8

    def narrowed(model, data_config, train, untuned, ranges, work, steps, *args, **kwargs):
        tuned = tune(model, data_config, train, untuned, ranges, work, steps, *args, **kwargs)[0]
        table = json.loads(ranges.read_text())
        for tensor in table["data"].values():
            for end in ("lowest", "highest"):
                tensor[end]["data"] = [x / 100 for x in tensor[end]["data"]]
        ranges.write_text(json.dumps(table))
        return tuned, export.quantize_int8(work / "tuned.onnx", work / "narrow.onnx", ranges, float_until_stride=0)

    folder = _copy(calibrated_tiny_model, tmp_path_factory.mktemp("cascade"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HAM_HF_CACHE", str(folder.parent / "cache"))
        mp.setattr(int8_fit, "tune_int8", narrowed)
        mp.setattr(int8_fit, "cascade_margin", lambda z32, z8: 1e6)
        mp.setattr(int8_fit, "INT8_GATE", {**int8_fit.INT8_GATE, "cascade_max_sent": 1.0})
        _calibrate_int8(folder, ham_dir_ro, "--int8_tuning_steps", "4")
    return folder


def test_a_cascade_that_passes_is_served_with_float_for_the_close_calls(cascade_tiny_model, ham_dir_ro, cache,
                                                                        caplog):
    """The record keeps the cascade (margin, share sent); auto serves int8 with the float32 session beside it,
    and every image under the margin gets float32's answer exactly."""
    record = _int8(cascade_tiny_model)
    assert record["passed"] and record["recipe"]["float_until_stride"] == 0
    assert record["recipe"]["cascade"]["margin"] == 1e6 and record["sent_to_fp32"] == 1.0
    assert record["top1_agreement"] == 1.0 and [r["recipe"]["cascade"] for r in record["rejected"]] == [None]
    assert not record["rejected"][0].get("sent_to_fp32") and record["rejected"][0]["top1_agreement"] < 0.99
    assert "Float32 answers the close calls (int8's top logit ahead" in (cascade_tiny_model / "README.md").read_text()
    images = sorted(str(p) for p in ham_dir_ro.glob("HAM10000_images_part_*/*.jpg"))[:16]
    with caplog.at_level(logging.INFO, logger="ham_hf.serve.classifier"):
        clf = Classifier(str(cascade_tiny_model))
    assert clf.backend == "onnx-int8" and "float32 otherwise (100.0% of validation)" in caplog.text
    fp32 = Classifier(str(cascade_tiny_model), backend="onnx")
    np.testing.assert_allclose(clf.predict_proba(images), fp32.predict_proba(images), atol=1e-6)


def test_the_cascade_sends_exactly_the_images_under_its_margin(cascade_tiny_model, ham_dir_ro, tmp_path, cache):
    """With the margin between the images' int8 margins, those under it get float32's outputs, the rest int8's."""
    from ham_hf.metrics import top_margin

    folder = _copy(cascade_tiny_model, tmp_path)
    record = _int8(folder)
    images = sorted(str(p) for p in ham_dir_ro.glob("HAM10000_images_part_*/*.jpg"))[:16]

    def served(margin: float) -> Classifier:
        results.update(folder, int8={**record, "recipe": {**record["recipe"], "cascade": {
            **record["recipe"]["cascade"], "margin": margin}}})
        return Classifier(str(folder))

    unmixed = served(0.0)
    x = unmixed.preprocess(torch.stack([unmixed.decode(p) for p in images]), train=False)
    int8_only, fp32 = unmixed.forward(x), Classifier(str(folder), backend="onnx").forward(x)
    margins = top_margin(int8_only.logits)
    middle = float(np.median(margins))
    mixed = served(middle).forward(x)
    sent = margins < middle
    assert 0 < sent.sum() < len(sent)
    for got, a, b in zip(mixed[:3], fp32[:3], int8_only[:3]):
        np.testing.assert_allclose(got[sent], a[sent], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got[~sent], b[~sent])


@pytest.mark.parametrize("made, served", [(2, "onnx-int8"), (export.INT8_FORMAT + 1, "onnx")])
def test_int8_records_of_the_previous_format_are_read_and_of_a_newer_one_refused(tuned_tiny_model, tmp_path, cache,
                                                                                   caplog, made, served):
    """Format 2 (before the cascade) is built as 3 is, so it is served; a newer format may mean more than this
    ham-hf knows (a cascade it would skip), so it is refused with one line."""
    folder = _copy(tuned_tiny_model, tmp_path)
    record = _int8(folder)
    results.update(folder, int8={**record, "recipe": {**record["recipe"], "format": made}})
    with caplog.at_level(logging.INFO, logger="ham_hf.serve.classifier"):
        assert Classifier(str(folder)).backend == served
    assert caplog.text.count("of a newer format") == (served == "onnx")
