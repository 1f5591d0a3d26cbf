"""Cold start of the demo: from launching app.py to its first answer, without and with the ONNX cache.

    .venv/bin/python benchmarks/cold_start.py --data-dir "$HAM10000_DIR" [--model DIR] [--runs 2]

`make demo` on an installed .venv runs `python app.py`; this starts it the same way on a free
loopback port with an empty HAM_HF_CACHE ("no_cache": the ONNX export, and int8 build where served,
happen at start-up), then again with the cache that run left ("cache"). Each figure is seconds from
launch to the page answering ("page_s") and to the first `/predict` answer through gradio_client
("first_answer_s"), the median over `--runs` launches.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time

from common import answered, arguments, emit, free_port, images, model_folder, start_app, wait_up


def launch_to_answer(folder: str, image: str, cache: str) -> dict[str, float]:
    """Seconds from launching the app to the page, and to its first prediction."""
    from gradio_client import Client, handle_file

    port, start = free_port(), time.perf_counter()
    server = start_app(folder, port, {"HAM_HF_CACHE": cache})
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_up(url)
        page = time.perf_counter() - start
        response = Client(url, verbose=False).predict(handle_file(image), False, api_name="/predict")
        if not answered(response):
            raise RuntimeError(f"unexpected answer {response}")
        return {"page_s": page, "first_answer_s": time.perf_counter() - start}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    """Launch the app with an empty cache, then with the cache it left, and log the times."""
    p = arguments(__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--runs", type=int, default=2)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    folder, image = model_folder(a.model), images(a.data_dir, 1)[0]
    runs: dict[str, list[dict]] = {"no_cache": [], "cache": []}
    for _ in range(a.runs):
        with tempfile.TemporaryDirectory() as cache:
            runs["no_cache"].append(launch_to_answer(folder, image, cache))
            runs["cache"].append(launch_to_answer(folder, image, cache))
    result = {name: {k: round(statistics.median(r[k] for r in rs), 1) for k in rs[0]} for name, rs in runs.items()}
    emit({"runs": a.runs, **result}, a.json)


if __name__ == "__main__":
    main()
