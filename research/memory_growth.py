"""What grows in the app's memory per request? tracemalloc inside a running app, before and after N calls.

    .venv/bin/python research/memory_growth.py --data-dir "$HAM10000_DIR" --model models/ham10000-resnet50 \
        [--requests 800] [--sessions N]

Launches the app in this process (as `app.launch` serves it; `--sessions` overrides Gradio's
`state_session_capacity`), sends 200 warm-up predictions through Gradio's HTTP API (8 at a time,
each image inline, as `benchmarks/app_load.py` does), then `--requests` more, and prints the
allocations that grew most in between, with where they were made.
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import sys
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

import app  # noqa: E402


def main() -> None:
    """Measure and print the largest growth."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--requests", type=int, default=800)
    p.add_argument("--sessions", type=int, default=None, help="Gradio's state_session_capacity (default: the app's)")
    a = p.parse_args()
    files = sorted(Path(a.data_dir).glob("HAM10000_images_part_1/*.jpg"))[:400]
    demo = app.create_demo(a.model)
    options = {} if a.sessions is None else {"state_session_capacity": a.sessions}
    app.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True, **options)
    url = demo.local_url

    def one(i: int) -> None:
        data = "data:image/jpeg;base64," + base64.b64encode(files[i % len(files)].read_bytes()).decode()
        image = {"path": None, "url": data, "meta": {"_type": "gradio.FileData"}}
        with httpx.Client(timeout=60) as http:
            event = http.post(f"{url}gradio_api/call/predict", json={"data": [image, False, False]}).json()
            http.get(f"{url}gradio_api/call/predict/{event['event_id']}")

    def run(n: int) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(n)))

    run(200)
    gc.collect()
    tracemalloc.start(8)
    before = tracemalloc.take_snapshot()
    run(a.requests)
    gc.collect()
    for stat in tracemalloc.take_snapshot().compare_to(before, "traceback")[:6]:
        print(f"{stat.size_diff / 1e6:+.1f} MB in {stat.count_diff:+d} blocks "
              f"({stat.size_diff / a.requests / 1e3:.1f} kB a request), made at:")
        print("\n".join("    " + line for line in stat.traceback.format()[-6:]))
    demo.close()


if __name__ == "__main__":
    main()
