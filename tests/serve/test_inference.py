"""ham_hf.inference: equality with the pipeline, TTA, the fast path, every bad input, predict, push, export."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ham_hf.cli import main
from ham_hf.errors import ImageError, ModelError
from ham_hf.labels import CLASS_CODES
from ham_hf.serve.classifier import Classifier, Prediction, resolve_model, tta_views
from ham_hf.transforms import load_rgb

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.jpg"))


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    """Keep exported ONNX graphs inside the test's temporary folder."""
    import os

    os.environ["HAM_HF_CACHE"] = str(tmp_path_factory.mktemp("ham_hf_cache"))


@pytest.fixture(scope="module")
def clf(tiny_model) -> Classifier:
    return Classifier(str(tiny_model))


@pytest.fixture(scope="module")
def clf_torch(tiny_model) -> Classifier:
    return Classifier(str(tiny_model), backend="torch")


def _pipeline_probs(model_dir, images) -> np.ndarray:
    from transformers import pipeline

    out = pipeline("image-classification", model=str(model_dir))(images, top_k=7)
    return np.array([[{d["label"]: d["score"] for d in row}[c] for c in CLASS_CODES] for row in out])


def test_tta_off_equals_the_pipeline(tiny_model, clf, clf_torch):
    images = [Image.open(p).convert("RGB") for p in EXAMPLES]
    expected = _pipeline_probs(tiny_model, images)
    np.testing.assert_allclose(clf_torch.predict_proba([str(p) for p in EXAMPLES]), expected, atol=1e-5)
    assert clf.backend == "onnx"
    np.testing.assert_allclose(clf.predict_proba([str(p) for p in EXAMPLES]), expected, atol=1e-5)


def test_fast_path_matches_pytorch_on_the_real_resnet50(tmp_path, real_images, resnet50_dir):
    """ONNX Runtime (the app's CPU path) and eager PyTorch agree on the real ResNet-50 architecture."""
    weights = resnet50_dir
    from ham_hf.model import load_model

    load_model(str(weights)).save_pretrained(tmp_path / "r50")
    paths = [str(p) for p in real_images.values()]
    fast, eager = Classifier(str(tmp_path / "r50")), Classifier(str(tmp_path / "r50"), backend="torch")
    assert (fast.backend, eager.backend) == ("onnx", "torch")
    np.testing.assert_allclose(fast.predict_proba(paths), eager.predict_proba(paths), atol=1e-3)
    np.testing.assert_allclose(fast.predict_proba(paths[:2], tta=True), eager.predict_proba(paths[:2], tta=True),
                               atol=1e-3)


def test_tta_averages_the_eight_views(clf):
    import torch

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    views = tta_views(x)
    assert views.shape == (16, 3, 4, 4)
    assert len({tuple(v.flatten().tolist()) for v in views[::2]}) == 8  # 8 distinct views of image 0
    probs = clf.predict_proba([str(EXAMPLES[0])], tta=True)
    manual = np.mean([clf.predict_proba([img])[0] for img in _dihedral(load_rgb(str(EXAMPLES[0])))], axis=0)
    assert probs.shape == (1, 7) and probs.sum() == pytest.approx(1.0)
    # Views of the cropped tensor vs views of the whole picture differ only at the crop border.
    assert np.abs(probs[0] - manual).max() < 0.05


def _dihedral(img: Image.Image) -> list[Image.Image]:
    out = []
    for k in range(4):
        r = img.rotate(90 * k, expand=True)
        out += [r, r.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return out


def test_prediction_labels_and_grouping(clf):
    pred = clf.predict([str(EXAMPLES[0])])[0]
    label = pred.label()
    assert set(label) == {"Actinic keratosis / intraepithelial carcinoma (akiec)", "Basal cell carcinoma (bcc)",
                          "Benign keratosis-like lesion (bkl)", "Dermatofibroma (df)", "Melanoma (mel)",
                          "Melanocytic nevus (nv)", "Vascular lesion (vasc)"}
    assert sum(label.values()) == pytest.approx(1.0)
    p = Prediction({"akiec": 0.1, "bcc": 0.1, "bkl": 0.05, "df": 0.05, "mel": 0.4, "nv": 0.25, "vasc": 0.05})
    assert p.top == "mel" and p.malignant_probability == pytest.approx(0.6) and p.group == "malignant"


def test_large_jpeg_is_decoded_at_reduced_size(tmp_path, clf):
    big = tmp_path / "big.jpg"
    Image.open(EXAMPLES[0]).resize((4000, 3000)).save(big, quality=90)
    img = load_rgb(str(big), reduce_to=clf.data_config.resize)
    assert max(img.size) <= 1000 and min(img.size) >= 2 * clf.data_config.resize - 1
    small = Image.open(EXAMPLES[0]).resize((4000, 3000)).resize((800, 600))
    np.testing.assert_allclose(clf.predict_proba([str(big)]), clf.predict_proba([small]), atol=0.05)


# ----------------------------------------------------------------------------- bad input


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_not_an_image(tmp_path, clf):
    f = tmp_path / "notes.jpg"
    f.write_text("this is text, not a JPEG")
    with pytest.raises(ImageError, match="notes.jpg is not an image that can be read"):
        clf.predict([str(f)])


def test_truncated_jpeg(tmp_path, clf):
    data = _jpeg_bytes(Image.open(EXAMPLES[0]).convert("RGB").resize((400, 300)), quality=95)
    f = tmp_path / "cut.jpg"
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="damaged or incomplete"):
        clf.predict([str(f)])


def test_decompression_bomb(tmp_path, clf):
    f = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(f)  # 144 megapixels in a few kilobytes
    assert f.stat().st_size < 100_000
    with pytest.raises(ImageError, match="too large to decode safely"):
        clf.predict([str(f)])


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P", "LA"])
def test_other_colour_modes_are_handled(tmp_path, clf, mode):
    src = Image.open(EXAMPLES[0]).convert("RGB")
    if mode == "I;16":
        arr = (np.asarray(src.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        img, path = Image.fromarray(arr, "I;16"), tmp_path / "img16.png"
    else:
        img, path = src.convert(mode), tmp_path / f"img_{mode}.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
    img.save(path)
    loaded = load_rgb(str(path))
    assert loaded.mode == "RGB" and loaded.size == src.size
    if mode == "I;16":  # 16-bit grey keeps its brightness (not clipped to white)
        assert abs(np.asarray(loaded).mean() - np.asarray(src.convert("L")).mean()) < 2
    probs = clf.predict_proba([str(path)])
    assert probs.shape == (1, 7) and probs.sum() == pytest.approx(1.0)


def test_one_pixel_image(tmp_path, clf):
    f = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (120, 60, 40)).save(f)
    probs = clf.predict_proba([str(f)])
    assert probs.shape == (1, 7) and np.isfinite(probs).all()


def test_exif_rotated_photo_is_turned_upright(tmp_path, clf):
    upright = Image.open(EXAMPLES[4]).convert("RGB")  # 200x150
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    f = tmp_path / "exif.jpg"
    stored.save(f, exif=exif, quality=100)
    assert load_rgb(str(f)).size == upright.size
    np.testing.assert_allclose(clf.predict_proba([str(f)]), clf.predict_proba([upright]), atol=0.02)


def test_pickled_weights_are_refused(tmp_path, tiny_model):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_model / "config.json", folder / "config.json")
    torch.save(load_file(str(tiny_model / "model.safetensors")), folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="only model.safetensors is read"):
        Classifier(str(folder))


def test_a_backbone_is_not_served(tiny_backbone, tmp_path):
    with pytest.raises(ModelError, match="not a HAM10000 classifier"):
        Classifier(str(tiny_backbone))
    with pytest.raises(ModelError, match="no model at .*ham-hf train.*Hub id"):
        Classifier(str(tmp_path / "nothing"))


def test_resolve_model(tmp_path, monkeypatch, tiny_model):
    monkeypatch.delenv("HAM_MODEL", raising=False)
    assert resolve_model("org/name", None) == "org/name"
    monkeypatch.setenv("HAM_MODEL", "env/model")
    assert resolve_model(None, tiny_model) == "env/model"
    monkeypatch.delenv("HAM_MODEL")
    assert resolve_model(None, tiny_model) == str(tiny_model)
    with pytest.raises(ModelError, match="--model.*HAM_MODEL.*ham-hf train"):
        resolve_model(None, tmp_path / "nothing")


# ----------------------------------------------------------------------------- predict, push, export


def test_predict_cli_skips_unreadable_files(tmp_path, tiny_model, caplog):
    caplog.set_level("INFO")
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for p in EXAMPLES[:3]:
        shutil.copy(p, folder / p.name)
    shutil.copy(EXAMPLES[3], folder / "sub" / EXAMPLES[3].name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "preds.csv"
    assert main(["predict", str(folder), str(EXAMPLES[5]), "--model", str(tiny_model), "--output", str(out),
                 "--tta"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5
    assert [k for k in rows[0] if k.startswith("prob_")] == [f"prob_{c}" for c in CLASS_CODES]
    assert all(abs(sum(float(r[f"prob_{c}"]) for c in CLASS_CODES) - 1) < 1e-4 for r in rows)
    assert "broken.jpg" in caplog.text and "skipped 1 unreadable" in caplog.text


def test_push_uploads_the_model_files(tiny_model, monkeypatch, caplog):
    from huggingface_hub import HfApi, ModelCard

    secret = "hf_secret_token_never_logged"
    monkeypatch.setenv("HF_TOKEN", secret)
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.update(repo=repo_id, create=kw) or f"https://hf.co/{repo_id}")

    def commit(self, **kw):
        ops = {op.path_in_repo: op.path_or_fileobj for op in kw["operations"]}
        calls.update(upload=kw, files=set(ops), card=ModelCard(ops["README.md"].decode()))

    monkeypatch.setattr(HfApi, "create_commit", commit)
    before = (tiny_model / "README.md").read_bytes()
    assert main(["push", "--model", str(tiny_model), "--repo-id", "me/ham-tiny", "--private"]) == 0
    assert calls["repo"] == "me/ham-tiny" and calls["create"]["private"] is True
    assert calls["upload"]["repo_id"] == "me/ham-tiny" and calls["upload"]["repo_type"] == "model"
    assert (tiny_model / "README.md").read_bytes() == before  # the widget goes in the pushed card only
    files = calls["files"]
    assert {"config.json", "model.safetensors", "README.md", "results.json", "test_confusion_matrix.png",
            "training_curves.png", "test_metrics.json"} <= files
    assert not any(f.startswith("checkpoint") or f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert "test_predictions.csv" not in files
    examples = {f for f in files if f.startswith("examples/")}
    assert len(examples) == 7
    card = calls["card"]
    assert card.data.pipeline_tag == "image-classification" and card.data.eval_results
    assert [w["src"].rsplit("/", 1)[1] for w in card.data.widget] == sorted(f.split("/")[1] for f in examples)
    prefix = "https://huggingface.co/me/ham-tiny/resolve/main/examples/"
    assert all(w["src"].startswith(prefix) for w in card.data.widget)
    assert secret not in caplog.text


def test_push_refuses_a_folder_without_weights(tmp_path, caplog):
    assert main(["push", "--model", str(tmp_path), "--repo-id", "me/x"]) == 2
    assert "train a model first" in caplog.text


def test_export_cli_writes_onnx(tmp_path, tiny_model):
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(tiny_model), "--output", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    size = json.loads((tiny_model / "config.json").read_text())["pretrained_cfg"]["input_size"][-1]
    logits = session.run(None, {"pixel_values": np.zeros((3, 3, size, size), np.float32)})[0]
    assert logits.shape == (3, 7)


def test_bundle_halves_the_weights_and_keeps_predictions(tmp_path, tiny_model, clf_torch):
    from safetensors.torch import load_file

    out = tmp_path / "bundled"
    assert main(["bundle", "--model", str(tiny_model), "--output", str(out)]) == 0
    tensors = load_file(str(out / "model.safetensors"))
    assert {str(v.dtype) for k, v in tensors.items() if v.ndim > 1} == {"torch.float16"}
    running_vars = [v for k, v in tensors.items() if "running_var" in k]
    assert running_vars and all(str(v.dtype) == "torch.float32" for v in running_vars)
    assert (out / "README.md").is_file() and not list(out.glob("checkpoint-*"))
    paths = [str(p) for p in EXAMPLES]
    np.testing.assert_allclose(Classifier(str(out), backend="torch").predict_proba(paths),
                               clf_torch.predict_proba(paths), atol=5e-3)
    np.testing.assert_allclose(_pipeline_probs(out, [Image.open(p) for p in paths]),
                               clf_torch.predict_proba(paths), atol=5e-3)


# ----------------------------------------------------------------------------- Grad-CAM


def test_grad_cam_map_shape_range_class_and_overlay(tiny_model, ham_dir_ro):
    from ham_hf.serve.explain import explain, grad_cam, model_view

    clf = Classifier(str(tiny_model), backend="torch")
    image = str(next(ham_dir_ro.glob("HAM10000_images_part_1/*.jpg")))
    cam, index = grad_cam(clf, image)
    size = clf.data_config.size
    assert cam.shape == (size, size) and cam.dtype == np.float32
    assert cam.min() >= 0 and cam.max() <= 1 and (cam.max() == 1 or cam.max() == 0)
    assert index == int(np.argmax(clf.predict_proba([image])[0]))  # the predicted class by default
    other = (index + 1) % 7
    assert grad_cam(clf, image, class_index=other)[1] == other
    overlay, explained = explain(clf, image, class_index=other)
    assert explained == other and overlay.size == model_view(clf, image).size == (size, size)
    assert overlay.mode == "RGB"
    # The view is the network's input before normalisation: undo the mean and std, and the pixels come back.
    x = clf.pixels(clf.decode(image)[None])[0].permute(1, 2, 0).numpy()
    dc = clf.data_config
    np.testing.assert_array_equal(np.asarray(model_view(clf, image)),
                                  np.round((x * np.array(dc.std) + np.array(dc.mean)) * 255).astype(np.uint8))


def test_class_activation_map_is_grad_cam_without_a_backward_pass(tiny_model):
    """For global pooling before one linear head, CAM equals Grad-CAM at the last stage; ONNX gives the same map."""
    from ham_hf.serve.explain import class_activation, explain, grad_cam

    image = str(EXAMPLES[4])
    torch_clf = Classifier(str(tiny_model), backend="torch")
    for index in range(len(CLASS_CODES)):
        cam, got = class_activation(torch_clf, image, index)
        reference, _ = grad_cam(torch_clf, image, index)
        assert got == index and cam.shape == reference.shape
        if reference.max() > 0:  # both scaled to [0, 1]; Grad-CAM also subtracts its minimum
            lo = cam.min()
            np.testing.assert_allclose((cam - lo) / (cam.max() - lo), reference, atol=1e-4)
    onnx_clf = Classifier(str(tiny_model), backend="onnx")
    decoded = onnx_clf.decode(image)
    answer_onnx = onnx_clf.classify([decoded], cam=True)[0]
    answer_torch = torch_clf.classify([decoded], cam=True)[0]
    np.testing.assert_allclose(answer_onnx.cam, answer_torch.cam, atol=1e-3)
    assert explain(onnx_clf, image)[1] == CLASS_CODES.index(answer_onnx.top)


def test_classify_batches_mixed_test_time_augmentation_as_single_calls_do(clf_torch):
    """One forward pass for images with and without TTA gives each what its own call would."""
    def probs(prediction):
        return [prediction.probabilities[c] for c in CLASS_CODES]

    decoded = [clf_torch.decode(str(p)) for p in EXAMPLES[:3]]
    together = clf_torch.classify(decoded, [False, True, False])
    for d, flag, got in zip(decoded, (False, True, False), together):
        np.testing.assert_allclose(probs(got), probs(clf_torch.classify([d], flag)[0]), atol=1e-5)
    np.testing.assert_allclose(probs(together[1]), clf_torch.predict_proba([str(EXAMPLES[1])], tta=True)[0],
                               atol=1e-5)


def test_every_folder_the_product_writes_loads_in_timm_with_the_pipeline_s_answer(tmp_path, tiny_model):
    """`timm.create_model("local-dir:...")`, as the Hub offers for library_name timm, loads the folders we write."""
    import timm
    import torch

    bundled = tmp_path / "bundled"
    assert main(["bundle", "--model", str(tiny_model), "--output_dir", str(bundled)]) == 0
    folders = [tiny_model, bundled]
    from ham_hf.defaults import BUNDLED_MODEL

    if (BUNDLED_MODEL / "model.safetensors").is_file():
        folders.append(BUNDLED_MODEL)
    images = [Image.open(p).convert("RGB") for p in EXAMPLES]
    for folder in folders:
        assert json.loads((folder / "config.json").read_text()).get("model_args") is not None, folder
        net = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        assert net.pretrained_cfg["label_names"] == list(CLASS_CODES) and net.num_classes == 7
        transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=net))
        with torch.no_grad():
            top = net(torch.stack([transform(im) for im in images])).argmax(1).tolist()
        assert top == [int(np.argmax(row)) for row in _pipeline_probs(folder, images)], folder


def test_predict_reads_every_type_the_app_takes_documents_paths_and_leaves_no_stale_csv(tmp_path, tiny_model,
                                                                                        capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    src = Image.open(EXAMPLES[0]).convert("RGB")
    src.save(folder / "a.gif")
    src.save(folder / "b.heic")
    src.save(folder / "c.webp")
    out = tmp_path / "preds.csv"
    assert main(["predict", str(folder), "--model", str(tiny_model), "--output", str(out)]) == 0
    assert sorted(Path(r["path"]).name for r in csv.DictReader(out.open())) == ["a.gif", "b.heic", "c.webp"]
    # Every file unreadable: the CSV of the run before must not stay behind as if it were this run's.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"not an image")
    assert main(["predict", str(bad), "--model", str(tiny_model), "--output", str(out)]) == 1
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "PATHS are image files and folders" in capsys.readouterr().out


def test_a_batch_split_across_threads_gives_each_image_its_own_outputs(clf):
    """OnnxGraph runs a batch's images side by side on one-thread runs, in order; fewer than threads run whole."""
    from ham_hf.serve import export
    from ham_hf.serve.classifier import OnnxGraph

    graph = OnnxGraph(export.cached_onnx(clf.model, clf.data_config.size), threads=2)
    calls = []
    part_run = graph._part.run
    graph._part.run = lambda names, feed: calls.append(len(feed["pixel_values"])) or part_run(names, feed)
    x = np.random.default_rng(0).normal(size=(5, 3, clf.data_config.size, clf.data_config.size)).astype(np.float32)
    names = ["logits", "features", "texture"]
    split = graph.run(names, x)
    assert calls == [1] * 5  # one image a run, the threads taking them in turn
    for i in range(len(x)):
        for got, alone in zip(split, graph.whole.run(names, {"pixel_values": x[i:i + 1]})):
            np.testing.assert_allclose(got[i:i + 1], alone, rtol=1e-5, atol=1e-6)
    calls.clear()
    graph.run(names, x[:1])
    assert calls == []  # one image: the session with every thread
    assert OnnxGraph(graph.path, threads=1)._part is None
