"""The Gradio app, driven as users drive it: through gradio_client and through a real browser."""

from __future__ import annotations

import json
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
    app.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served, verbose=False)


def test_predict_through_gradio_client_on_a_real_image(client, real_images):
    from gradio_client import handle_file

    label, description, guard = client.predict(handle_file(str(real_images["mel"])), False, api_name="/predict")
    assert guard == {"in_distribution": None, "kind": None, "ood_score": None, "ood_threshold": None,
                     "reason": "This model has no out-of-distribution check: it answers for any image."}  # no guard
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
    # A file that is no image at all is refused at upload (415, "Only image files ..."), before it is kept.
    return {"415|Only image files": text, "damaged or incomplete": cut, "too large to decode safely": bomb}


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


def _uploaded(path: Path) -> dict:
    """The payload of a file as if the upload route had stored it (recorded as this app's upload)."""
    from ham_hf.serve.uploads import uploads

    uploads().keep([path])
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}}


def test_guarded_model_answers_non_lesions_with_a_message_and_the_verdict(bundled_model, real_images, tmp_path):
    """The bundled model's guard: a blue square gets the message (probabilities only on request), a lesion passes."""
    demo = app.create_demo(classifier=Classifier(str(bundled_model), backend="torch"))
    predict = next(fn for fn in demo.fns.values() if fn.api_name == "predict").fn
    blue, lesion = tmp_path / "blue.png", tmp_path / "nv.jpg"
    Image.new("RGB", (300, 300), (30, 60, 220)).save(blue)
    shutil.copy(real_images["nv"], lesion)
    label, text, verdict = predict(_uploaded(blue), False, False)
    assert label is None and "Upload a dermatoscopic image" in text and "Most likely" not in text
    assert verdict["in_distribution"] is False and verdict["ood_score"] > verdict["ood_threshold"]
    label, text, verdict = predict(_uploaded(blue), False, True)  # asked for explicitly
    assert len(label["confidences"]) == 7 and "Most likely" in text and verdict["in_distribution"] is False
    label, text, verdict = predict(_uploaded(lesion), False, False)
    assert len(label["confidences"]) == 7 and verdict["in_distribution"] is True and "Most likely" in text


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


def _flagged_in_browser(classifier, image: Path, *texts: str) -> None:
    """Upload `image` in a real browser and read the flagged message: `texts`, and no diagnosis."""
    from playwright.sync_api import expect, sync_playwright

    demo = app.create_demo(classifier=classifier)
    app.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    try:
        with sync_playwright() as p:
            browser = _browser(p)
            try:
                page = browser.new_page()
                page.goto(demo.local_url)
                page.locator("#image input[type=file]").set_input_files(str(image))
                page.locator("#classify").click()
                for text in texts:
                    expect(page.locator("#description")).to_contain_text(text, timeout=60_000)
                expect(page.locator("#description")).not_to_contain_text("Most likely")
                expect(page.locator("#probabilities")).not_to_contain_text("%")
            finally:
                browser.close()
    finally:
        demo.close()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_real_browser_non_lesion_upload_reads_the_message(bundled_model, tmp_path):
    """The bundled model's guard, in a browser: a plain blue square gets the message, not a diagnosis."""

    square = tmp_path / "blue-square.png"
    Image.new("RGB", (400, 400), (30, 60, 220)).save(square)
    _flagged_in_browser(Classifier(str(bundled_model), backend="torch"), square, "Upload a dermatoscopic image")


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


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_real_browser_an_example_is_classified(served):
    """An example clicked on the page is one the app may read (Gradio's cached copy), so it is classified."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page()
            page.goto(served)
            page.get_by_text(display_name(app.EXAMPLES[0].name.split("_")[0]), exact=True).first.click()
            page.locator("#classify").click()
            expect(page.locator("#probabilities")).to_contain_text("%", timeout=30_000)
            expect(page.locator("#description")).to_contain_text("Most likely", timeout=30_000)
        finally:
            browser.close()


def test_shares_read_as_a_person_reads_them():
    assert [app.share(p) for p in (0.0, 0.004, 0.01, 0.5, 0.99, 0.996, 1.0)] == \
        ["<1%", "<1%", "1%", "50%", "99%", ">99%", ">99%"]


def test_privacy_defaults_telemetry_off_no_run_history_no_server_path(served):
    import httpx

    config = httpx.get(f"{served}config", timeout=30).json()
    assert config.get("analytics_enabled") is False and config.get("run_history") is False
    assert str(Path(app.__file__).resolve().parent) not in json.dumps(config)  # no absolute server path


def test_concurrent_requests_share_forward_passes(tiny_model, real_images):
    """Many users at once: every request answered, in fewer forward passes than requests."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    clf = Classifier(str(tiny_model), backend="torch")
    passes, classify = [], clf.classify
    clf.classify = lambda *args, **kwargs: passes.append(1) or classify(*args, **kwargs)  # counts forward passes
    demo = app.create_demo(classifier=clf)
    app.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    try:
        clients = [Client(demo.local_url, verbose=False) for _ in range(8)]
        files = [str(p) for p in real_images.values()] + [str(p) for p in app.EXAMPLES]

        def ask(k):
            return [clients[k].predict(handle_file(files[(k + i) % len(files)]), False, api_name="/predict")
                    for i in range(4)]

        with ThreadPoolExecutor(8) as pool:
            answers = [a for batch in pool.map(ask, range(8)) for a in batch]
        assert len(answers) == 32 and all(len(label["confidences"]) == 7 for label, _, _ in answers)
        assert len(passes) < 32
        # What Gradio's queue does besides (its private state: gradio is pinned below 7): waiting clients
        # hear their place on a timer, not after every job, and the queue's summary of its events is not
        # rebuilt after each of these 32.
        queue = demo._queue
        assert not queue.live_updates and queue.update_intervals == app.STATUS_EVERY_S
        assert queue.events_recorded >= 32 and queue.event_count_at_last_cache == 0
    finally:
        demo.close()


def test_uploads_are_images_only_and_stay_within_the_budget(tiny_model, tmp_path, monkeypatch):
    """Through the real upload route: a text file is refused, and 12 uploads of ~0.8 MB keep under a 2 MB budget."""
    import httpx

    monkeypatch.setattr(app, "UPLOAD_BUDGET_MB", 2)
    demo = app.create_demo(classifier=Classifier(str(tiny_model), backend="torch"))
    app.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    try:
        url = f"{demo.local_url}gradio_api/upload"
        refused = httpx.post(url, files={"files": ("notes.jpg", b"not an image", "image/jpeg")}, timeout=30)
        assert refused.status_code == 415 and "Only image files" in refused.text
        stored = []
        for i in range(12):
            f = tmp_path / f"{i}.bmp"
            Image.new("RGB", (520, 520), (i * 20, 80, 60)).save(f)
            stored += httpx.post(url, files={"files": (f.name, f.read_bytes(), "image/bmp")}, timeout=30).json()
            on_disk = sum(Path(p).stat().st_size for p in stored if Path(p).exists())
            assert on_disk <= 2 * 2**20, on_disk
        assert Path(stored[-1]).exists() and not Path(stored[0]).exists()
    finally:
        demo.close()


def test_heic_uploads_are_classified(client, tmp_path):
    from gradio_client import handle_file

    photo = tmp_path / "iphone.heic"
    Image.open(app.EXAMPLES[3]).convert("RGB").save(photo)
    label, _, _ = client.predict(handle_file(str(photo)), False, api_name="/predict")
    assert len(label["confidences"]) == 7


def test_expected_user_errors_are_one_log_line(client, tmp_path, caplog):
    from gradio_client import handle_file

    cut = tmp_path / "cut.jpg"
    cut.write_bytes(app.EXAMPLES[0].read_bytes()[: len(app.EXAMPLES[0].read_bytes()) // 3])
    with caplog.at_level("INFO"):
        with pytest.raises(Exception, match="damaged or incomplete"):
            client.predict(handle_file(str(cut)), False, api_name="/predict")
    lines = [r for r in caplog.records if "damaged or incomplete" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None and "Traceback" not in caplog.text



@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_real_browser_a_new_upload_clears_the_old_answer(served, real_images, tmp_path):
    """After a diagnosis, a new upload that cannot be read leaves no old diagnosis under it."""
    from playwright.sync_api import expect, sync_playwright

    good, cut = tmp_path / "lesion.jpg", tmp_path / "cut.jpg"
    shutil.copy(real_images["mel"], good)
    cut.write_bytes(good.read_bytes()[:2000])
    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page()
            page.goto(served)
            page.locator("#image input[type=file]").set_input_files(str(good))
            page.locator("#classify").click()
            expect(page.locator("#description")).to_contain_text("Most likely", timeout=30_000)
            page.locator("#image input[type=file]").set_input_files(str(cut))
            page.locator("#classify").click()
            expect(page.locator("#description")).not_to_contain_text("Most likely", timeout=30_000)
            expect(page.locator("#probabilities")).not_to_contain_text("%")
        finally:
            browser.close()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_real_browser_an_ordinary_skin_photo_reads_what_it_is(bundled_model, ood_dev_dir):
    """The commonest wrong upload: a phone / clinic photo of skin. The page says what it is and what to upload."""

    from ham_hf.finish.guard import read_folder

    paths, categories, _ = read_folder(ood_dev_dir, "category")
    clf = Classifier(str(bundled_model))
    photo = next(p for p, c in zip(paths, categories)
                 if c == "skin_clinical" and clf.predict([str(p)])[0].ood_kind == "skin photo")
    _flagged_in_browser(clf, photo, "ordinary photo of skin", "Upload a dermatoscopic image")


def _call(url: str, api: str, data: list) -> tuple[str, object]:
    """One call over Gradio's HTTP API, as any client makes it: ("complete", outputs) or ("refused", message)."""
    import httpx

    with httpx.Client(timeout=60) as http:
        posted = http.post(f"{url}gradio_api/call/{api}", json={"data": data})
        if posted.status_code != 200:
            return "refused", posted.text
        stream = http.get(f"{url}gradio_api/call/{api}/{posted.json()['event_id']}").text
    kind, _, payload = stream.strip().rpartition("event: ")[2].partition("\ndata: ")
    return ("complete", json.loads(payload)) if kind == "complete" else ("refused", (json.loads(payload) or {})
                                                                          .get("error"))


def test_the_api_reads_only_what_the_client_sent(served, tmp_path, caplog):
    """Over the real HTTP API: server files, links, `..`, URLs and oversized inline data get one refusal."""
    import base64
    import os

    import httpx

    from ham_hf.serve.uploads import REFUSED_SOURCE

    meta = {"_type": "gradio.FileData"}
    example = app.EXAMPLES[0]
    sent = httpx.post(f"{served}gradio_api/upload", timeout=30,
                      files={"files": ("lesion.jpg", example.read_bytes(), "image/jpeg")}).json()[0]
    again = httpx.post(f"{served}gradio_api/upload", timeout=30,
                       files={"files": ("lesion.jpg", example.read_bytes(), "image/jpeg")}).json()[0]
    link = Path(sent).parent / "link.jpg"
    os.symlink(example, link)
    text = tmp_path / "server.txt"
    text.write_text("secret")
    huge = tmp_path / "huge.png"
    Image.frombytes("RGB", (2100, 2100), os.urandom(2100 * 2100 * 3)).save(huge)  # about 12.6 MB
    inline = "data:image/{};base64,{}".format
    refused = {"a server image": {"path": str(example), "meta": meta}, "without meta": {"path": str(example)},
               "a server non-image": {"path": str(text)}, "a missing path": {"path": str(tmp_path / "no.jpg")},
               "a link out of the uploads": {"path": str(link), "meta": meta},
               "`..` in an upload path": {"path": f"{Path(sent).parent}/../../{example.name}", "meta": meta},
               "a URL": {"path": "https://example.com/a.jpg", "url": "https://example.com/a.jpg", "meta": meta},
               "inline over the cap": {"path": None, "url": inline("png", base64.b64encode(huge.read_bytes())
                                                                     .decode()), "meta": meta}}
    with caplog.at_level("INFO"):
        for name, payload in refused.items():
            for api, args in (("predict", [False, False]), ("explain", []), ("classify", [False, False])):
                assert _call(served, api, [payload, *args]) == ("refused", REFUSED_SOURCE), (name, api)
    assert "Traceback" not in caplog.text
    small = {"path": None, "url": inline("jpeg", base64.b64encode(example.read_bytes()).decode()), "meta": meta}
    for payload in ({"path": sent, "meta": meta}, {"path": again, "meta": meta}, small):  # the same file twice
        kind, (label, _, _) = _call(served, "predict", [payload, False, False])
        assert kind == "complete" and len(label["confidences"]) == 7
    kind, outputs = _call(served, "explain", [small])
    assert kind == "complete" and outputs[0]["path"]


def test_start_up_deletes_what_a_stopped_app_left(tiny_model, tmp_path):
    """A killed app's uploads are gone once the next one starts (its own folder only)."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import free_port, wait_up

    base, other = tmp_path / "gradio", tmp_path / "gradio" / "someone-else"
    other.mkdir(parents=True)
    env = {"GRADIO_TEMP_DIR": str(base), "HAM_HF_CACHE": str(tmp_path / "cache")}

    def start():
        port = free_port()
        process = subprocess.Popen([sys.executable, str(Path(app.__file__)), "--model", str(tiny_model), "--backend",
                                    "torch", "--port", str(port)], env={**os.environ, **env},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_up(f"http://127.0.0.1:{port}/", timeout=120)
        return process, f"http://127.0.0.1:{port}/"

    first, url = start()
    try:
        stored = Path(httpx.post(f"{url}gradio_api/upload", timeout=30, files={
            "files": ("a.jpg", app.EXAMPLES[0].read_bytes(), "image/jpeg")}).json()[0])
    finally:
        first.send_signal(signal.SIGKILL)  # no clean shutdown
        first.wait(timeout=30)
    assert stored.is_file() and stored.is_relative_to(base)
    second, _ = start()
    try:
        assert not stored.exists() and not (base / f"ham-hf-{first.pid}").exists()
        assert (base / f"ham-hf-{second.pid}").is_dir() and other.is_dir()
    finally:
        second.terminate()
        second.wait(timeout=30)
