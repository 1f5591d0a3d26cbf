"""Load test: concurrent gradio_client clients against a local app (loopback only, bounded).

    .venv/bin/python benchmarks/app_load.py --data-dir ../shared/data/ham10000 [--model DIR] \
        [--clients 20] [--requests 10]

Starts `app.py` in a subprocess on 127.0.0.1, then `--clients` threads each send `--requests`
predictions (different real images) through `gradio_client`. Reports errors, answers the guard flagged, p50 / p95
latency as a client sees it (queueing included).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from common import answered, arguments, emit, free_port, images, model_folder, start_app, summary, wait_up


def main() -> None:
    """Run the load and log errors and latency."""
    p = arguments(__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--requests", type=int, default=10, help="per client")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from gradio_client import Client, handle_file

    port, folder = free_port(), model_folder(a.model)
    url = f"http://127.0.0.1:{port}/"
    server = start_app(folder, port)
    try:
        wait_up(url)
        files = images(a.data_dir, a.clients * a.requests)

        def client_run(k: int) -> tuple[list[float], int, int]:
            client = Client(url, verbose=False)
            lat, errors, flagged = [], 0, 0
            for i in range(a.requests):
                start = time.perf_counter()
                try:
                    response = client.predict(handle_file(files[k * a.requests + i]), False, api_name="/predict")
                    errors += not answered(response)
                    flagged += response[2].get("in_distribution") is False
                except Exception as exc:  # every failure counts, whatever its kind
                    logging.getLogger("bench").warning("prediction failed: %r", exc)
                    errors += 1
                lat.append(time.perf_counter() - start)
            return lat, errors, flagged

        start = time.perf_counter()
        with ThreadPoolExecutor(a.clients) as pool:
            runs = list(pool.map(client_run, range(a.clients)))
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies = [x for lat, _, _ in runs for x in lat]
    result = {"clients": a.clients, "predictions": len(latencies), "errors": sum(e for _, e, _ in runs),
              "flagged_not_a_lesion": sum(f for _, _, f in runs),
              "throughput_per_s": round(len(latencies) / wall, 1), **summary(latencies)}
    emit(result, a.json)


if __name__ == "__main__":
    main()
