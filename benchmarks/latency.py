"""Per-image CPU latency of the app's predict path beside the stock pipeline, same model and images.

    .venv/bin/python benchmarks/latency.py --data-dir "$HAM10000_DIR" [--model DIR] [--n 100]

Each call classifies one image file from disk (decode + preprocess + forward + softmax):
- "app (onnx fp32)" / "app (onnx int8)": `Classifier.predict` with ONNX Runtime on the CPU, the
  path the Gradio app runs (int8 by default where the model's fidelity check passed: "app_backend");
- "app (torch)": the same with the PyTorch backend (inference mode, channels_last);
- "pipeline": `pipeline("image-classification", model=...)` on the same file;
- "app tta 8 views": the 8 dihedral views of one image in one batch.
The largest probability difference between the paths is reported as well. For a model with a guard:
what judging costs an image, and what the texture statistics cost the served graph (the same graph
without them, one image at a time, in the same run).

app.py sets OMP_WAIT_POLICY=PASSIVE for its process (PyTorch's spinning OpenMP threads slow ONNX
Runtime down); run with `OMP_WAIT_POLICY=PASSIVE` for the app's setting, without it for the default.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from common import arguments, emit, images, model_folder, summary


def timed(fn, items, warmup: int = 5) -> list[float]:
    """Time fn on each item after a warm-up; return seconds per call."""
    for item in items[:warmup]:
        fn(item)
    out = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        out.append(time.perf_counter() - start)
    return out


def texture_cost(clf, decoded: list) -> dict:
    """The served graph's forward pass, one image at a time, against the same graph without its texture branch."""
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx.utils import extract_model

    session = clf._graph.whole  # one image at a time: the session a lone request runs on
    path = clf._graph.path
    inputs = [{"pixel_values": clf.preprocess(d[None], train=False).numpy()} for d in decoded]
    with tempfile.TemporaryDirectory() as tmp:
        bare = os.path.join(tmp, "bare.onnx")
        names = [o.name for o in onnx.load(path, load_external_data=False).graph.output if o.name != "texture"]
        extract_model(path, bare, ["pixel_values"], names)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        without = ort.InferenceSession(bare, options, providers=["CPUExecutionProvider"])
        full = summary(timed(lambda x: session.run(None, x), inputs))
        bare_times = summary(timed(lambda x: without.run(None, x), inputs))
    return {"with_p50_ms": full["p50_ms"], "without_p50_ms": bare_times["p50_ms"],
            "added_p50_ms": round(full["p50_ms"] - bare_times["p50_ms"], 2)}


def main() -> None:
    """Measure and log the three paths side by side."""
    p = arguments(__doc__)
    p.add_argument("--model", default=None, help="default: the shared ResNet-50 with a 7-class head")
    p.add_argument("--n", type=int, default=100)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers import pipeline

    from ham_hf.labels import CLASS_CODES
    from ham_hf.serve.classifier import Classifier

    folder, files = model_folder(a.model), images(a.data_dir, a.n)
    fast, fp32, eager = Classifier(folder), Classifier(folder, backend="onnx"), Classifier(folder, backend="torch")
    stock = pipeline("image-classification", model=folder)
    results = {
        "device": f"CPU ({torch.get_num_threads()} threads)", "image_size": fast.data_config.size,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "app_backend": fast.backend,
        "app (onnx fp32)": summary(timed(lambda f: fp32.predict([f]), files)),
        "app (torch)": summary(timed(lambda f: eager.predict([f]), files)),
        "pipeline": summary(timed(lambda f: stock(f, top_k=7), files)),
        "app tta 8 views (onnx fp32)": summary(timed(lambda f: fp32.predict([f], tta=True),
                                                     files[: max(10, a.n // 4)])),
    }
    try:  # int8 whether or not the model's gate passed: the figure beside fp32
        int8 = Classifier(folder, backend="onnx-int8")
        if int8.backend == "onnx-int8":
            results["app (onnx int8)"] = summary(timed(lambda f: int8.predict([f]), files))
            results["app tta 8 views (onnx int8)"] = summary(timed(lambda f: int8.predict([f], tta=True),
                                                                   files[: max(10, a.n // 4)]))
    except Exception as exc:  # a model without int8 ranges
        logging.info("no int8 figures: %s", exc)
    if fast.guard is not None:  # what the guard adds to one prediction: colour statistics, score, probe
        from ham_hf.serve.guard import colour_stats

        decoded = [fast.decode(f) for f in files]
        outs = [fast.forward(fast.preprocess(d[None], train=False)) for d in decoded]
        results["guard per image"] = summary(timed(
            lambda i: fast.guard.judge(outs[i].features, colour_stats(decoded[i].numpy())[None],
                                       texture=outs[i].texture), range(len(files))))
        if fast.backend.startswith("onnx"):
            results["texture in the graph"] = texture_cost(fast, decoded)
    sample = files[:16]
    ref = np.array([[{d["label"]: d["score"] for d in r}[c] for c in CLASS_CODES] for r in stock(sample, top_k=7)])
    results["max_prob_diff_vs_pipeline"] = float(np.abs(fp32.predict_proba(sample) - ref).max())
    emit(results, a.json)


if __name__ == "__main__":
    main()
