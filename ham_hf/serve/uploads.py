"""What a public server reads and keeps of what clients send: its own uploads and bounded inline images only.

Three parts, one process-wide record (`uploads()`):
- `claim_folder()`: this process's own upload folder (Gradio's GRADIO_TEMP_DIR), under a lock held for
  the process's life; at start-up it deletes the folders of earlier processes of the app whose lock
  is free (they stopped), and only those.
- `Uploads`: the files the upload route stored (and the app's own examples). A request may read such a
  file, found again after resolving links and `..`, or an inline `data:` image within the upload cap;
  anything else gets one message (`REFUSED_SOURCE`), whether the path exists or not. Kept uploads are
  deleted once `max_age_s` old, and the oldest first while they hold more than `max_total_mb`; a path
  stored twice counts once, and a file being read is not deleted under its request.
- `UploadGuard`: ASGI middleware. On the upload route every stored file must be an image (header only,
  no pixel decoded), else the whole upload is deleted and refused with 415. On the API's JSON routes
  the body is capped and every file reference in it checked before Gradio acts on it, so a path outside
  the uploads is never fetched, copied or opened, and a refusal leaves no traceback in the log.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from contextlib import contextmanager
from pathlib import Path

import ham_hf.images  # noqa: F401 (registers the HEIC opener with Pillow)
from ham_hf.errors import ImageError

logger = logging.getLogger(__name__)

REFUSED = b"Only image files can be uploaded (JPEG, PNG, HEIC, WebP, TIFF, BMP or GIF)."
MAX_UPLOAD_MB = 10
# One message for every source that is not this app's upload nor a bounded inline image: it must not
# tell an existing server path from a missing one.
REFUSED_SOURCE = ("The image must be a file uploaded to this app (uploads are kept for minutes) or an inline "
                  f"image (a data: URL) of at most {MAX_UPLOAD_MB} MB; upload it again.")
FOLDER_PREFIX = "ham-hf-"
# The API's JSON bodies: an inline image of MAX_UPLOAD_MB in base64 (4/3 larger) and room for the rest.
MAX_BODY_BYTES = MAX_UPLOAD_MB * 2**20 * 4 // 3 + 2**16
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


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


# ----------------------------------------------------------------------------- this process's folder


def _lock(path: Path) -> int | None:
    """An exclusive lock on `path` (its descriptor), or None when another process holds it or locks are missing."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no folder is ever taken for a stopped process's
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def clear_left_overs(base: Path) -> list[Path]:
    """Delete the upload folders under `base` of app processes that stopped (their lock is free); return them."""
    gone = []
    for lock in sorted(base.glob(f"{FOLDER_PREFIX}*.lock")):
        fd = _lock(lock)
        if fd is None:  # a running process holds it (or this platform cannot tell): leave it
            continue
        folder = lock.with_suffix("")
        shutil.rmtree(folder, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(fd)
        gone.append(folder)
    if gone:
        logger.info("deleted the uploads of %d stopped app process(es) in %s", len(gone), base)
    return gone


@functools.cache
def claim_folder() -> Path:
    """This process's upload folder, made Gradio's (GRADIO_TEMP_DIR), after clearing what stopped processes left.

    It lies under the operator's GRADIO_TEMP_DIR, else Gradio's default (the system temp folder's
    `gradio`), as `ham-hf-<pid>`; nothing else there is touched.
    """
    base = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()
    base.mkdir(parents=True, exist_ok=True)
    clear_left_overs(base)
    folder = base / f"{FOLDER_PREFIX}{os.getpid()}"
    _lock(folder.with_suffix(".lock"))  # held (never closed) until the process ends
    shutil.rmtree(folder, ignore_errors=True)  # an earlier process with this pid (a restarted container)
    folder.mkdir()
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    return folder


# ----------------------------------------------------------------------------- what a request may read


class Uploads:
    """The files this app's upload route stored (and its examples): what a request may read, kept within a budget."""

    def __init__(self, max_age_s: float = 300, max_total_mb: float = 500):
        self.max_age_s, self.max_bytes = max_age_s, max_total_mb * 2**20
        self._kept: OrderedDict[Path, tuple[float, int]] = OrderedDict()  # resolved path -> (stored, bytes)
        self._fixed: set[Path] = set()  # the app's examples: readable, never deleted here
        self._reading: Counter[Path] = Counter()  # files a request is reading now
        self._bytes = 0
        self._lock = threading.Lock()

    def limit(self, max_age_s: float, max_total_mb: float) -> None:
        """Set how long uploads are kept and how much they may hold together."""
        self.max_age_s, self.max_bytes = max_age_s, max_total_mb * 2**20

    def keep(self, paths) -> None:
        """Record files the upload route stored (a path stored again counts once, as new), then prune."""
        now = time.time()
        with self._lock:
            for p in map(_resolved, paths):
                size = p.stat().st_size if p.is_file() else 0
                self._bytes -= self._kept.pop(p, (0, 0))[1]
                self._kept[p] = (now, size)
                self._bytes += size
        self.prune()

    def allow(self, paths) -> None:
        """Let requests read these files too (the app's examples, as Gradio cached them)."""
        with self._lock:
            self._fixed.update(map(_resolved, paths))

    def prune(self) -> None:
        """Delete uploads older than max_age_s, then the oldest while all of them hold more than the budget.

        A file a request is reading is passed over, and its bytes leave the budget until the read ends
        (one decode), so that newer uploads are not deleted in its place.
        """
        cutoff = time.time() - self.max_age_s
        with self._lock:
            held = sum(self._kept[p][1] for p in self._reading if p in self._kept)
            for path, (stored, size) in list(self._kept.items()):
                if stored >= cutoff and self._bytes - held <= self.max_bytes:
                    break  # oldest first: the rest are newer and within the budget
                if self._reading[path]:
                    continue
                del self._kept[path]
                self._bytes -= size
                path.unlink(missing_ok=True)

    @property
    def kept_bytes(self) -> int:
        """Bytes the tracked uploads hold on disk now."""
        return self._bytes

    def readable(self, path) -> Path | None:
        """The stored file a client's path names (links and `..` resolved), or None when it is not one."""
        try:
            p = _resolved(path)
        except (OSError, TypeError, ValueError):
            return None
        with self._lock:
            known = p in self._kept or p in self._fixed
        return p if known and p.is_file() else None

    def check(self, payload) -> None:
        """Raise ImageError(REFUSED_SOURCE) unless a file reference (a FileData dict) is one a request may read."""
        if not isinstance(payload, dict):
            raise ImageError(REFUSED_SOURCE)
        url, path = payload.get("url"), payload.get("path")
        if isinstance(url, str) and url.startswith("data:"):
            if path is not None:  # inline data names no file as well
                raise ImageError(REFUSED_SOURCE)
            _inline_data(url)
        elif path is None or self.readable(path) is None:
            raise ImageError(REFUSED_SOURCE)

    @contextmanager
    def reading(self, payload):
        """The image a client sent, as bytes (inline) or a path (an upload kept from deletion meanwhile)."""
        if payload is None:
            raise ImageError("Upload an image first.")
        self.check(payload)
        url = payload.get("url")
        if isinstance(url, str) and url.startswith("data:"):
            yield base64.b64decode(_inline_data(url))
            return
        path = self.readable(payload["path"])
        if path is None:  # deleted since the check
            raise ImageError(REFUSED_SOURCE)
        with self._lock:
            self._reading[path] += 1
        try:
            yield str(path)
        finally:
            with self._lock:
                self._reading[path] -= 1
                if not self._reading[path]:
                    del self._reading[path]


def _resolved(path) -> Path:
    """An absolute path with links and `..` resolved."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise ValueError("not a path")
    return Path(path).resolve()


def _inline_data(url: str) -> str:
    """The base64 part of a `data:` URL whose bytes fit the upload cap; ImageError(REFUSED_SOURCE) otherwise."""
    head, _, data = url.partition(",")
    if ";base64" not in head or len(data) > 4 * -(-MAX_UPLOAD_MB * 2**20 // 3) or len(data) % 4 \
            or not _BASE64.fullmatch(data):
        raise ImageError(REFUSED_SOURCE)
    return data


@functools.cache
def uploads() -> Uploads:
    """This process's record of its uploads (one folder a process, so one record)."""
    return Uploads()


# ----------------------------------------------------------------------------- the middleware


def _file_references(value):
    """Every dict in a JSON value that names a file (a `path` or a `url` key), depth first."""
    if isinstance(value, dict):
        if "path" in value or "url" in value:
            yield value
        else:
            for v in value.values():
                yield from _file_references(v)
    elif isinstance(value, list):
        for v in value:
            yield from _file_references(v)


class UploadGuard:
    """ASGI middleware: image uploads only, within the budget; API calls that name no file but those."""

    def __init__(self, app, max_age_s: float = 300, max_total_mb: float = 500, route: str = "/upload",
                 record: Uploads | None = None):
        self.app, self.route = app, route
        self.record = record or uploads()
        self.record.limit(max_age_s, max_total_mb)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or "/gradio_api/" not in scope["path"]:
            return await self.app(scope, receive, send)
        if scope["path"].endswith(self.route):
            return await self._upload(scope, receive, send)
        return await self._call(scope, receive, send)

    async def _upload(self, scope, receive, send):
        """The upload route: keep image files only (and make room for them)."""
        self.record.prune()
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
                return await _reply(send, 415, REFUSED)
            self.record.keep(paths)
        await send(start)
        await send({"type": "http.response.body", "body": payload})

    async def _call(self, scope, receive, send):
        """An API call: a bounded body whose file references are all readable, else one refusal."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                logger.info("refused an API call of over %d bytes", MAX_BODY_BYTES)
                return await _reply(send, 413, REFUSED_SOURCE.encode())
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            for reference in _file_references(json.loads(body)):
                self.record.check(reference)
        except ImageError:
            logger.info("refused an API call that names a file it did not upload")  # one line, no traceback
            return await _reply(send, 403, REFUSED_SOURCE.encode())
        except ValueError:
            pass  # not JSON: Gradio answers it as it does
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _reply(send, status: int, text: bytes) -> None:
    """Send a plain-text response."""
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(text))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": text})
