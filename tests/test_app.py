"""The Gradio app, driven as users drive it: through gradio_client and through a real browser."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from ham_hf.labels import CLASS_CODES, display_name
from ham_hf.serve.classifier import Classifier

import app

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """The app on a free local port, around the tiny model; yields its URL."""
    import os

    os.environ.setdefault("HAM_HF_CACHE", str(tmp_path_factory.mktemp("ham_hf_cache")))
    demo = app.create_demo(classifier=Classifier(str(tiny_model)))
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True,
                max_file_size=f"{app.MAX_UPLOAD_MB}mb")
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served, verbose=False)


def test_predict_through_gradio_client_on_a_real_image(client, real_images):
    from gradio_client import handle_file

    label, description, guard = client.predict(handle_file(str(real_images["mel"])), False, api_name="/predict")
    assert guard == {"in_distribution": None, "ood_score": None, "ood_threshold": None}  # this model has no guard
    confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert set(confidences) == {display_name(c) for c in CLASS_CODES}
    assert sum(confidences.values()) == pytest.approx(1.0, abs=1e-4)
    assert label["label"] == max(confidences, key=confidences.get)
    assert "Most likely" in description and "not a medical device" in description
    heat = client.predict(handle_file(str(real_images["mel"])), api_name="/explain")
    assert Image.open(heat).size[0] > 0


def test_tta_toggle_through_the_api(client, tiny_model):
    from gradio_client import handle_file

    clf = Classifier(str(tiny_model), backend="torch")
    expected = {flag: clf.predict([str(app.EXAMPLES[0])], tta=flag)[0].label() for flag in (False, True)}
    assert expected[False] != expected[True]  # the views differ, so the toggle must show
    for flag in (False, True):
        label, _, _ = client.predict(handle_file(str(app.EXAMPLES[0])), flag, api_name="/predict")
        got = {c["label"]: c["confidence"] for c in label["confidences"]}
        assert got == pytest.approx(expected[flag], abs=1e-4), flag


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    good = app.EXAMPLES[0].read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good[: len(good) // 3])
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(bomb)
    return {"not an image": text, "damaged or incomplete": cut, "too large to decode safely": bomb}


def test_bad_uploads_get_readable_errors_and_the_app_keeps_serving(client, tmp_path):
    from gradio_client import handle_file

    for message, path in _bad_files(tmp_path).items():
        with pytest.raises(Exception, match=message):
            client.predict(handle_file(str(path)), False, api_name="/predict")
        label, _, _ = client.predict(handle_file(str(app.EXAMPLES[1])), False, api_name="/predict")
        assert len(label["confidences"]) == 7


def test_odd_but_valid_images_are_served(client, tmp_path):
    from gradio_client import handle_file

    src = Image.open(app.EXAMPLES[2]).convert("RGB")
    cases = {"grey.png": src.convert("L"), "alpha.png": src.convert("RGBA"), "cmyk.jpg": src.convert("CMYK"),
             "dot.png": src.resize((1, 1))}
    for name, img in cases.items():
        img.save(tmp_path / name)
        label, _, _ = client.predict(handle_file(str(tmp_path / name)), False, api_name="/predict")
        assert sum(c["confidence"] for c in label["confidences"]) == pytest.approx(1.0, abs=1e-4), name


def test_missing_upload_is_a_readable_error(tiny_model):
    import gradio as gr

    demo = app.create_demo(classifier=Classifier(str(tiny_model), backend="torch"))
    predict = next(fn for fn in demo.fns.values() if fn.api_name == "predict").fn
    with pytest.raises(gr.Error, match="Upload an image first"):
        predict(None, False)


def test_guarded_model_answers_non_lesions_with_a_message_and_the_verdict(bundled_model, real_images, tmp_path):
    """The bundled model's guard: a blue square gets the message (probabilities only on request), a lesion passes."""
    demo = app.create_demo(classifier=Classifier(str(bundled_model), backend="torch"))
    predict = next(fn for fn in demo.fns.values() if fn.api_name == "predict").fn
    blue = tmp_path / "blue.png"
    Image.new("RGB", (300, 300), (30, 60, 220)).save(blue)
    label, text, verdict = predict(str(blue), False, False)
    assert label is None and "does not look like a dermatoscopic image" in text
    assert verdict["in_distribution"] is False and verdict["ood_score"] > verdict["ood_threshold"]
    label, text, verdict = predict(str(blue), False, True)  # asked for explicitly
    assert len(label) == 7 and "Most likely" in text and verdict["in_distribution"] is False
    label, text, verdict = predict(str(real_images["nv"]), False, False)
    assert len(label) == 7 and verdict["in_distribution"] is True and "Most likely" in text


def test_start_without_a_model_explains_what_to_do(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("HAM_MODEL", raising=False)
    monkeypatch.setattr(app, "DEFAULT_MODEL", tmp_path / "no-model")
    assert app.main([]) == 2
    assert "No model to serve" in caplog.text and "ham-hf train" in caplog.text


def test_space_front_matter():
    import yaml

    from ham_hf.hub.deploy import SPACE_TEMPLATE

    meta = yaml.safe_load(SPACE_TEMPLATE.read_text().split("---")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert {"title", "emoji", "sdk_version", "license", "datasets"} <= set(meta)
    # The app serves the bundled folder: no Hub model to link (`ham-hf deploy --model ID` adds it).
    assert "models" not in meta


def _browser(p):
    """Debian's Chromium, headless, quiet."""
    return p.chromium.launch(
        executable_path=CHROMIUM,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run"],
    )


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_real_browser_non_lesion_upload_reads_the_message(bundled_model, tmp_path):
    """The bundled model's guard, in a browser: a plain blue square gets the message, not a diagnosis."""
    from playwright.sync_api import expect, sync_playwright

    demo = app.create_demo(classifier=Classifier(str(bundled_model), backend="torch"))
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    square = tmp_path / "blue-square.png"
    Image.new("RGB", (400, 400), (30, 60, 220)).save(square)
    try:
        with sync_playwright() as p:
            browser = _browser(p)
            try:
                page = browser.new_page()
                page.goto(demo.local_url)
                page.locator("#image input[type=file]").set_input_files(str(square))
                page.locator("#classify").click()
                expect(page.locator("#description")).to_contain_text("does not look like a dermatoscopic image",
                                                                     timeout=60_000)
                expect(page.locator("#description")).not_to_contain_text("Most likely")
            finally:
                browser.close()
    finally:
        demo.close()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_real_browser_upload_and_read_probabilities(served, real_images, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    image = tmp_path / "lesion.jpg"
    shutil.copy(real_images["nv"], image)
    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page()
            page.goto(served)
            expect(page.locator("#notice")).to_contain_text("not a medical device")
            page.locator("#image input[type=file]").set_input_files(str(image))
            page.locator("#classify").click()
            result = page.locator("#probabilities")
            expect(result).to_contain_text("%", timeout=30_000)
            text = result.inner_text()
            shown = [display_name(c) for c in CLASS_CODES if display_name(c) in text]
            assert len(shown) == 7, text
            expect(page.locator("#description")).to_contain_text("Most likely", timeout=30_000)
        finally:
            browser.close()
