"""Helpers shared by the serving benchmarks."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def model_folder(model: str | None) -> str:
    """The model to measure: the one given, or the ImageNet ResNet-50 of RESNET50_DIR with a fresh 7-class head."""
    if model:
        return model
    from ham_hf.model import load_model

    folder = Path(tempfile.gettempdir()) / "ham-bench-resnet50-7"
    if not (folder / "model.safetensors").is_file():
        if not os.environ.get("RESNET50_DIR"):
            raise SystemExit("pass --model DIR, or set RESNET50_DIR to a timm folder of ImageNet ResNet-50 weights")
        load_model(os.environ["RESNET50_DIR"]).save_pretrained(folder)
    return str(folder)


def images(data_dir: str, n: int) -> list[str]:
    """The first n HAM10000 image paths (both part folders)."""
    return [str(p) for p in sorted(Path(data_dir).glob("HAM10000_images_part_*/*.jpg"))[:n]]


def arguments(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser with the options every benchmark shares: --data-dir (HAM10000) and --json."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="the HAM10000 folder (Kaggle layout)")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p


def summary(seconds: list[float]) -> dict[str, float]:
    """p50 / p95 / mean in milliseconds."""
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "mean_ms": round(float(ms.mean()), 1), "n": int(ms.size)}


def emit(figures: dict, json_path: str | None) -> None:
    """Log the figures with the CPU they ran on as one JSON line, and write them to json_path when given."""
    from ham_hf.precision import cpu_name

    figures = {**figures, "cpu": cpu_name()}  # machines differ: every figure names its CPU
    logging.getLogger("bench").info("%s", json.dumps(figures))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(figures, fh, indent=2)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, timeout: float = 180) -> None:
    """Wait until the app answers."""
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"app at {url} did not start in {timeout}s")


def start_app(model: str, port: int, env: dict | None = None) -> subprocess.Popen:
    """Start app.py on the loopback interface, offline, as `make demo` runs it."""
    return subprocess.Popen([sys.executable, str(REPO / "app.py"), "--model", model, "--port", str(port)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                                 **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def answered(response) -> bool:
    """Whether an app `/predict` response is a proper answer: 7 probabilities, or the guard's flag."""
    label, _, verdict = response
    if not (label or {}).get("confidences"):
        return verdict.get("in_distribution") is False  # a flagged image: the message, no diagnosis
    return len(label["confidences"]) == 7
