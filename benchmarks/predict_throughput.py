"""`ham-hf predict` throughput on real images, per backend, as the command runs it.

    .venv/bin/python benchmarks/predict_throughput.py --data-dir "$HAM10000_DIR" \
        [--model DIR] [--n 1000] [--backends auto,onnx-int8,onnx,torch] [--batch-size 32]

For each backend: build the `Classifier` once (timed apart: "load_s"), then `predict_files` on the
first `--n` HAM10000 files, decoding included, exactly the loop `ham-hf predict` runs; "per_s" is
images per second of that loop. A backend the model cannot serve is reported with its reason.
With `--compare-split`, a backend whose batches are split across threads (int8 ONNX) also runs the
same loop `--rounds` times each way, turn about: split as served ("split") and on one session with
every thread ("whole"); images per second of each round.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from common import arguments, emit, images, model_folder


def split_against_whole(classifier, files, batch_size: int, rounds: int) -> dict:
    """Images per second of the predict loop with batches split across threads and on one session, turn about."""
    from ham_hf.serve.classifier import predict_files

    graph, part = classifier._graph, classifier._graph._part
    per_s: dict[str, list[float]] = {"split": [], "whole": []}
    try:
        for _ in range(rounds):  # in turn, so drifts in the machine's speed hit both alike
            for name in per_s:
                graph._part = part if name == "split" else None
                start = time.perf_counter()
                rows, _ = predict_files(classifier, files, batch_size, progress=False)
                per_s[name].append(round(len(rows) / (time.perf_counter() - start), 1))
    finally:
        graph._part = part
    return per_s


def main() -> None:
    """Measure and log predict throughput per backend."""
    p = arguments(__doc__)
    p.add_argument("--model", default=None, help="default: the shared ResNet-50 with a 7-class head")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--backends", default="auto,onnx-int8,onnx")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--compare-split", action="store_true", help="also time the loop with and without the split")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each, with --compare-split")
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
        if a.compare_split and getattr(classifier, "_graph", None) and classifier._graph._part is not None:
            results[backend]["split_against_whole"] = split_against_whole(classifier, files, a.batch_size, a.rounds)
        logging.getLogger("bench").info("%s: %s", backend, results[backend])
    emit(results, a.json)


if __name__ == "__main__":
    main()
