"""What the server keeps of uploads: image files only, deleted when old, all within a budget."""

from __future__ import annotations

import asyncio
import json
import os
import time

from PIL import Image

from ham_hf.serve.uploads import UploadGuard, is_image_file


def _upload_app(paths):
    """A stand-in for the upload route: it 'stores' the given files and answers their paths."""

    async def app(scope, receive, send):
        body = json.dumps([str(p) for p in paths]).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return app


def _post(guard) -> tuple[int, bytes]:
    """POST to the guarded upload route; return (status, body)."""
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    asyncio.run(guard({"type": "http", "method": "POST", "path": "/gradio_api/upload"}, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_only_image_files_are_kept(tmp_path):
    good, text, svg = tmp_path / "a.png", tmp_path / "notes.jpg", tmp_path / "x.svg"
    Image.new("RGB", (20, 20)).save(good)
    text.write_text("not an image")
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    assert is_image_file(good) and not is_image_file(text) and not is_image_file(svg)
    status, body = _post(UploadGuard(_upload_app([good, text])))
    assert status == 415 and b"Only image files" in body
    assert not good.exists() and not text.exists()  # the whole upload is refused and deleted
    kept = tmp_path / "b.png"
    Image.new("RGB", (20, 20)).save(kept)
    guard = UploadGuard(_upload_app([kept]))
    status, body = _post(guard)
    assert status == 200 and json.loads(body) == [str(kept)] and kept.exists() and guard.kept_bytes > 0


def test_the_upload_folder_stays_within_its_budget_and_old_uploads_go(tmp_path):
    guard = UploadGuard(lambda *a: None, max_age_s=60, max_total_mb=1)
    files = []
    for i in range(12):  # 12 uploads of about 200 kB against a 1 MB budget
        f = tmp_path / f"{i}.bmp"
        Image.new("RGB", (260, 260), (i, 0, 0)).save(f)
        files.append(f)
        guard.keep([f])
        on_disk = sum(p.stat().st_size for p in files if p.exists())
        assert on_disk <= 2**20, on_disk
    assert files[-1].exists() and not files[0].exists()  # the oldest went first
    old = UploadGuard(lambda *a: None, max_age_s=0.05, max_total_mb=100)
    f = tmp_path / "old.png"
    Image.new("RGB", (10, 10)).save(f)
    old.keep([f])
    time.sleep(0.1)
    old.prune()
    assert not f.exists() and old.kept_bytes == 0
    assert os.listdir(tmp_path)  # only what the budget keeps is left
