"""What the server reads and keeps of uploads: its own image files, bounded inline images, within a budget."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time

import pytest
from PIL import Image

from ham_hf.errors import ImageError
from ham_hf.serve.uploads import (
    FOLDER_PREFIX,
    MAX_BODY_BYTES,
    REFUSED_SOURCE,
    UploadGuard,
    Uploads,
    clear_left_overs,
    is_image_file,
)


def _upload_app(paths):
    """A stand-in for the upload route: it 'stores' the given files and answers their paths."""

    async def app(scope, receive, send):
        body = json.dumps([str(p) for p in paths]).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return app


def _post(guard, path="/gradio_api/upload", body=b"") -> tuple[int, bytes]:
    """POST to the guarded route; return (status, body)."""
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    asyncio.run(guard({"type": "http", "method": "POST", "path": path}, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_only_image_files_are_kept(tmp_path):
    good, text, svg = tmp_path / "a.png", tmp_path / "notes.jpg", tmp_path / "x.svg"
    Image.new("RGB", (20, 20)).save(good)
    text.write_text("not an image")
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    assert is_image_file(good) and not is_image_file(text) and not is_image_file(svg)
    status, body = _post(UploadGuard(_upload_app([good, text]), record=Uploads()))
    assert status == 415 and b"Only image files" in body
    assert not good.exists() and not text.exists()  # the whole upload is refused and deleted
    kept = tmp_path / "b.png"
    Image.new("RGB", (20, 20)).save(kept)
    record = Uploads()
    status, body = _post(UploadGuard(_upload_app([kept]), record=record))
    assert status == 200 and json.loads(body) == [str(kept)] and kept.exists() and record.kept_bytes > 0
    assert record.readable(kept) == kept.resolve()


def test_the_upload_folder_stays_within_its_budget_and_old_uploads_go(tmp_path):
    record = Uploads(max_age_s=60, max_total_mb=1)
    files = []
    for i in range(12):  # 12 uploads of about 200 kB against a 1 MB budget
        f = tmp_path / f"{i}.bmp"
        Image.new("RGB", (260, 260), (i, 0, 0)).save(f)
        files.append(f)
        record.keep([f])
        on_disk = sum(p.stat().st_size for p in files if p.exists())
        assert on_disk <= 2**20, on_disk
    assert files[-1].exists() and not files[0].exists()  # the oldest went first
    old = Uploads(max_age_s=0.05, max_total_mb=100)
    f = tmp_path / "old.png"
    Image.new("RGB", (10, 10)).save(f)
    old.keep([f])
    time.sleep(0.1)
    old.prune()
    assert not f.exists() and old.kept_bytes == 0 and old.readable(f) is None


def test_a_file_stored_twice_counts_once_and_stays(tmp_path):
    """Gradio stores the same bytes at the same path: the second upload must not count again or be deleted."""
    record = Uploads(max_age_s=60, max_total_mb=1)
    f = tmp_path / "same.bmp"
    Image.new("RGB", (300, 300)).save(f)  # about 270 kB
    for _ in range(10):
        record.keep([f])
    assert record.kept_bytes == f.stat().st_size and f.exists()


def test_a_file_being_read_is_not_deleted_under_its_request(tmp_path):
    record = Uploads(max_age_s=60, max_total_mb=0.3)
    first, second = tmp_path / "first.bmp", tmp_path / "second.bmp"
    Image.new("RGB", (300, 300)).save(first)
    Image.new("RGB", (300, 300), (9, 9, 9)).save(second)
    record.keep([first])
    with record.reading({"path": str(first)}) as source:
        record.keep([second])  # over the budget: the oldest would go, but it is being read
        assert source == str(first.resolve()) and first.exists()
    record.prune()
    assert not first.exists() and second.exists()


def test_only_stored_files_and_bounded_inline_images_are_readable(tmp_path):
    record = Uploads()
    folder = tmp_path / "uploads"
    folder.mkdir()
    stored, outside = folder / "a.png", tmp_path / "server.png"
    Image.new("RGB", (8, 8)).save(stored)
    Image.new("RGB", (8, 8)).save(outside)
    record.keep([stored])
    (folder / "link.png").symlink_to(outside)
    small = "data:image/png;base64," + base64.b64encode(stored.read_bytes()).decode()
    with record.reading({"path": str(folder / ".." / "uploads" / "a.png")}) as source:
        assert source == str(stored.resolve())
    with record.reading({"path": None, "url": small}) as source:
        assert source == stored.read_bytes()
    over = "data:image/png;base64," + "A" * (MAX_BODY_BYTES - 2**16 + 8)
    bad = [{"path": str(outside)}, {"path": str(folder / "link.png")}, {"path": str(folder / "missing.png")},
           {"path": str(folder / ".." / "server.png")}, {"path": "https://example.com/a.png"},
           {"path": "/etc/passwd", "url": small}, {"path": None, "url": over},
           {"path": None, "url": "data:image/png;base64,not*base64"}, str(stored), {"path": None}, {"path": 5}]
    for payload in bad:
        with pytest.raises(ImageError) as caught:
            with record.reading(payload):
                pass
        assert str(caught.value) == REFUSED_SOURCE, payload


def test_api_calls_naming_other_files_are_refused_before_the_app(tmp_path):
    record = Uploads()
    stored = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(stored)
    record.keep([stored])
    reached = []

    async def app(scope, receive, send):
        reached.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = UploadGuard(app, record=record)
    good = json.dumps({"data": [{"path": str(stored), "meta": {"_type": "gradio.FileData"}}, False]}).encode()
    assert _post(guard, "/gradio_api/call/predict", good) == (200, b"ok") and reached == [good]
    for body in (json.dumps({"data": [{"path": "/etc/hostname"}, False]}).encode(),
                 json.dumps({"data": [{"path": None, "url": "data:image/png;base64,AAAA" + "A" * MAX_BODY_BYTES}]})
                 .encode()):
        status, text = _post(guard, "/gradio_api/queue/join", body)
        assert status in (403, 413) and text.decode() == REFUSED_SOURCE
    assert len(reached) == 1  # nothing refused reached Gradio


def test_start_up_clears_only_stopped_processes_folders(tmp_path):
    import fcntl

    stopped, running, other = tmp_path / f"{FOLDER_PREFIX}111", tmp_path / f"{FOLDER_PREFIX}222", tmp_path / "x"
    for folder in (stopped, running, other):
        (folder / "h").mkdir(parents=True)
        (folder / "h" / "a.png").write_bytes(b"x")
        folder.with_suffix(".lock").touch()
    held = os.open(running.with_suffix(".lock"), os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert clear_left_overs(tmp_path) == [stopped]
    finally:
        os.close(held)
    assert not stopped.exists() and running.exists() and other.exists()
