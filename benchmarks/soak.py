"""Soak: steady load against a local `app.py` for minutes, the server's memory (RSS) sampled throughout.

    .venv/bin/python benchmarks/soak.py --data-dir "$HAM10000_DIR" --model models/ham10000-resnet50 \
        [--clients 20] [--minutes 10] [--warmup-minutes 1] [--every 10]

Starts `app.py` as `make demo` runs it, then `--clients` threads each send predictions of different
real HAM10000 images through Gradio's HTTP API (the image inline, as in `app_load.py`) without pause.
The server's RSS is read every `--every` seconds. Reports answers, errors, RSS at the end of the warm-up,
its largest and last value after it, and the growth after warm-up (the goal: under 100 MB).
"""

from __future__ import annotations

import logging
import threading
import time

import psutil
from app_load import http_predict

from common import answered, arguments, emit, free_port, images, model_folder, start_app, wait_up


def main() -> None:
    """Run the soak and log the figures."""
    p = arguments(__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--warmup-minutes", type=float, default=1)
    p.add_argument("--every", type=float, default=10, help="seconds between RSS samples")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    files = images(a.data_dir, 2000)
    port = free_port()
    server = start_app(model_folder(a.model), port)
    counts = {"answers": 0, "errors": 0}
    lock, stop = threading.Lock(), threading.Event()

    def client(k: int) -> None:
        predict, i = http_predict(f"http://127.0.0.1:{port}/"), k
        while not stop.is_set():
            try:
                ok = answered(predict(files[i % len(files)], False, False))
            except Exception as exc:  # every failure counts, whatever its kind
                logging.getLogger("bench").warning("prediction failed: %r", exc)
                ok = False
            with lock:
                counts["answers" if ok else "errors"] += 1
            i += a.clients

    try:
        wait_up(f"http://127.0.0.1:{port}/")
        process = psutil.Process(server.pid)
        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(a.clients)]
        for t in threads:
            t.start()
        start, samples = time.monotonic(), []
        while (elapsed := time.monotonic() - start) < 60 * a.minutes:
            samples.append((round(elapsed), round(process.memory_info().rss / 2**20), counts["answers"]))
            time.sleep(a.every)
        stop.set()
        for t in threads:
            t.join(timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=30)
    after = [rss for t, rss, _ in samples if t >= 60 * a.warmup_minutes]
    warm = after[0]
    emit({"clients": a.clients, "minutes": a.minutes, **counts,
          "answers_per_s": round(counts["answers"] / (60 * a.minutes), 1), "rss_mb_after_warmup": warm,
          "rss_mb_max": max(after), "rss_mb_last": after[-1], "growth_mb": max(after) - warm,
          "samples_s_mb_answers": samples}, a.json)


if __name__ == "__main__":
    main()
