"""Load test: concurrent clients against the app and a stock app (loopback only, bounded).

    .venv/bin/python benchmarks/app_load.py --data-dir "$HAM10000_DIR" --model models/ham10000-resnet50 \
        [--clients 100,60] [--requests 10] [--stock-clients 60] [--clicks 30] [--client http|gradio]

Starts `app.py` (as `make demo` runs it) and `benchmarks/stock_app.py` (the same model through
`pipeline("image-classification")` in a `gr.Interface` with Gradio's defaults) in subprocesses on
127.0.0.1. For each number in `--clients`, that many threads each send `--requests` predictions of
different real images to the app (`/predict`), and `--stock-clients` do the same to the stock app.
Reports errors, answers/s and p50 / p95 latency as a client sees it (queueing included). Then one
client times `--clicks` Classify clicks (`/classify`: probabilities and the heat map) against as many
bare predictions (`/predict`) on the same images, one at a time.

`--client http` (the default) calls Gradio's HTTP API (`/gradio_api/call/NAME`, the image inline as a
data URL) with httpx; `--client gradio` uses gradio_client (an upload, then the queue). The client
threads share the machine's cores with the servers, and gradio_client costs about 100 ms of CPU a
call, more than the app's whole answer, so on 2 cores it mostly measures itself.
"""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from common import REPO, answered, arguments, emit, free_port, images, model_folder, start_app, summary, wait_up


def http_predict(url: str, api: str = "predict"):
    """A predict function through Gradio's HTTP API: (image path, *args) -> the outputs."""
    import base64
    import json

    import httpx

    client = httpx.Client(timeout=120)

    def call(path: str, *args):
        data = "data:image/jpeg;base64," + base64.b64encode(open(path, "rb").read()).decode()
        image = {"path": None, "url": data, "orig_name": "image.jpg", "meta": {"_type": "gradio.FileData"}}
        event = client.post(f"{url}gradio_api/call/{api}", json={"data": [image, *args]}).raise_for_status()
        stream = client.get(f"{url}gradio_api/call/{api}/{event.json()['event_id']}").raise_for_status().text
        kind, _, payload = stream.strip().rpartition("event: ")[2].partition("\ndata: ")
        if kind != "complete":
            raise RuntimeError(f"{kind}: {payload[:200]}")
        return json.loads(payload)

    return call


def gradio_predict(url: str, api: str = "predict"):
    """A predict function through gradio_client: (image path, *args) -> the outputs."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    return lambda path, *args: client.predict(handle_file(path), *args, api_name=f"/{api}")


CLIENTS = {"http": http_predict, "gradio": gradio_predict}


def load(url: str, files: list[str], clients: int, requests: int, args: tuple, check, kind: str) -> dict:
    """`clients` threads, each sending `requests` predictions; errors, answers/s and latency."""

    def client_run(k: int) -> tuple[list[float], int]:
        predict = CLIENTS[kind](url)
        lat, errors = [], 0
        for i in range(requests):
            start = time.perf_counter()
            try:
                errors += not check(predict(files[(k * requests + i) % len(files)], *args))
            except Exception as exc:  # every failure counts, whatever its kind
                logging.getLogger("bench").warning("prediction failed: %r", exc)
                errors += 1
            lat.append(time.perf_counter() - start)
        return lat, errors

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(client_run, range(clients)))
    wall = time.perf_counter() - start
    latencies = [x for lat, _ in runs for x in lat]
    return {"clients": clients, "client": kind, "predictions": len(latencies), "errors": sum(e for _, e in runs),
            "answers_per_s": round(len(latencies) / wall, 1), **summary(latencies)}


def click_cost(url: str, files: list[str], kind: str) -> dict:
    """Mean seconds of a Classify click (with its heat map) and of a bare prediction, one at a time."""
    calls = {name: CLIENTS[kind](url, name) for name in ("predict", "classify")}
    times = {name: [] for name in calls}
    for path in files:
        for name, call in calls.items():
            start = time.perf_counter()
            call(path, False, False)
            times[name].append(time.perf_counter() - start)
    mean = {k: statistics.mean(v) for k, v in times.items()}
    return {"classify_ms": round(1000 * mean["classify"], 1), "predict_ms": round(1000 * mean["predict"], 1),
            "ratio": round(mean["classify"] / mean["predict"], 2)}


def stock_answered(response) -> bool:
    """Whether a stock app's answer is a Label with class confidences."""
    label = response[0] if isinstance(response, list) else response
    return bool(label.get("confidences"))


def main() -> None:
    """Run the loads and the click timing, and log the figures."""
    p = arguments(__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--clients", default="100,60", help="comma list of client counts against the app")
    p.add_argument("--requests", type=int, default=10, help="per client")
    p.add_argument("--stock-clients", type=int, default=60, help="clients against the stock app (0: skip it)")
    p.add_argument("--clicks", type=int, default=30)
    p.add_argument("--client", default="http", choices=sorted(CLIENTS))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    folder, counts = model_folder(a.model), [int(c) for c in a.clients.split(",") if c]
    files = images(a.data_dir, max(counts + [a.stock_clients]) * a.requests)
    result = {"requests_per_client": a.requests}
    port = free_port()
    server = start_app(folder, port)
    try:
        wait_up(f"http://127.0.0.1:{port}/")
        for n in counts:
            result[f"app_{n}_clients"] = load(f"http://127.0.0.1:{port}/", files, n, a.requests, (False, False),
                                              answered, a.client)
        result["click"] = click_cost(f"http://127.0.0.1:{port}/", files[: a.clicks], a.client)
    finally:
        server.terminate()
        server.wait(timeout=30)
    if a.stock_clients:
        port = free_port()
        stock = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "stock_app.py"), "--model", folder,
                                  "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
        try:
            wait_up(f"http://127.0.0.1:{port}/")
            result[f"stock_{a.stock_clients}_clients"] = load(f"http://127.0.0.1:{port}/", files, a.stock_clients,
                                                              a.requests, (), stock_answered, a.client)
        finally:
            stock.terminate()
            stock.wait(timeout=30)
        ours = result.get(f"app_{a.stock_clients}_clients")
        if ours:
            result["throughput_vs_stock"] = round(ours["answers_per_s"] /
                                                  result[f"stock_{a.stock_clients}_clients"]["answers_per_s"], 2)
    emit(result, a.json)


if __name__ == "__main__":
    main()
