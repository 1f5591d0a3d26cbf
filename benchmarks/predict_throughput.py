"""`ham-hf predict` throughput on real images, per backend, as the command runs it.

    .venv/bin/python benchmarks/predict_throughput.py --data-dir "$HAM10000_DIR" \
        [--model DIR] [--n 1000] [--backends auto,onnx-int8,onnx,torch] [--batch-size 32]

For each backend: build the `Classifier` once (timed apart: "load_s"), then `predict_files` on the
first `--n` HAM10000 files, decoding included, exactly the loop `ham-hf predict` runs; "per_s" is
images per second of that loop. A backend the model cannot serve is reported with its reason.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from common import arguments, emit, images, model_folder


def main() -> None:
    """Measure and log predict throughput per backend."""
    p = arguments(__doc__)
    p.add_argument("--model", default=None, help="default: the shared ResNet-50 with a 7-class head")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--backends", default="auto,onnx-int8,onnx")
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ham_hf.serve.classifier import Classifier, predict_files

    folder, files = model_folder(a.model), [Path(f) for f in images(a.data_dir, a.n)]
    results: dict = {"n": len(files), "batch_size": a.batch_size}
    for backend in a.backends.split(","):
        start = time.perf_counter()
        try:
            classifier = Classifier(folder, backend=backend)
        except Exception as exc:  # report a backend this model cannot serve, measure the others
            results[backend] = {"error": str(exc)}
            continue
        load_s = time.perf_counter() - start
        predict_files(classifier, files[: a.batch_size], a.batch_size, progress=False)  # warm-up
        start = time.perf_counter()
        rows, skipped = predict_files(classifier, files, a.batch_size, progress=False)
        seconds = time.perf_counter() - start
        results[backend] = {"served": classifier.backend, "load_s": round(load_s, 2), "seconds": round(seconds, 2),
                            "per_s": round(len(rows) / seconds, 1), "skipped": len(skipped)}
        logging.getLogger("bench").info("%s: %s", backend, results[backend])
    emit(results, a.json)


if __name__ == "__main__":
    main()
