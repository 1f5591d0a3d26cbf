"""What a public server keeps of its uploads: image files only, for minutes, within a disk budget.

`UploadGuard` is ASGI middleware for the server's upload route (Gradio's `/gradio_api/upload`): every
file an upload stored is opened as an image header (no pixel decoded); if one is not an image the
whole upload is deleted and refused with 415. Kept uploads are deleted once they are `max_age_s`
old, and the oldest go first whenever they would hold more than `max_total_mb` together, so one
client cannot fill the disk and no upload outlives the time it takes to answer it by much.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from pathlib import Path

import ham_hf.images  # noqa: F401 (registers the HEIC opener with Pillow)

logger = logging.getLogger(__name__)

REFUSED = b"Only image files can be uploaded (JPEG, PNG, HEIC, WebP, TIFF, BMP or GIF)."


def is_image_file(path: str | Path) -> bool:
    """Whether a file is in an image format Pillow reads (its header only; too large is judged when decoded)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.open(path).close()
        return True
    except Image.DecompressionBombError:
        return True  # an image, refused with its reason when it is decoded
    except (UnidentifiedImageError, OSError, ValueError):
        return False


class UploadGuard:
    """ASGI middleware: image uploads only, each deleted after `max_age_s`, all within `max_total_mb`."""

    def __init__(self, app, max_age_s: float = 300, max_total_mb: float = 500, route: str = "/upload"):
        self.app, self.max_age_s, self.max_bytes, self.route = app, max_age_s, max_total_mb * 2**20, route
        self._kept: deque[tuple[float, Path, int]] = deque()  # (time stored, path, bytes), oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].endswith(self.route):
            return await self.app(scope, receive, send)
        self.prune()
        start, body = {}, []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        payload = b"".join(body)
        if start.get("status") == 200:
            paths = [Path(p) for p in json.loads(payload or b"[]")]
            if not all(is_image_file(p) for p in paths):
                for p in paths:
                    p.unlink(missing_ok=True)
                logger.info("refused an upload that is not an image (%d file(s) deleted)", len(paths))
                return await self._reply(send, 415, REFUSED)
            self.keep(paths)
        await send(start)
        await send({"type": "http.response.body", "body": payload})

    @staticmethod
    async def _reply(send, status: int, text: bytes) -> None:
        """Send a plain-text response."""
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(text))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": text})

    def keep(self, paths: list[Path]) -> None:
        """Track stored uploads (and make room for them within the budget)."""
        now = time.time()
        with self._lock:
            for p in paths:
                size = p.stat().st_size if p.is_file() else 0
                self._kept.append((now, p, size))
                self._bytes += size
        self.prune()

    def prune(self) -> None:
        """Delete uploads older than max_age_s, then the oldest while all of them hold more than the budget."""
        cutoff = time.time() - self.max_age_s
        with self._lock:
            while self._kept and (self._kept[0][0] < cutoff or self._bytes > self.max_bytes):
                _, path, size = self._kept.popleft()
                self._bytes -= size
                path.unlink(missing_ok=True)

    @property
    def kept_bytes(self) -> int:
        """Bytes the tracked uploads hold on disk now."""
        return self._bytes
