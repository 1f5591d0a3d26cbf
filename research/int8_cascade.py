"""Can the all-int8 graph answer every image whose decision is clear, and fp32 only the close calls?

    .venv/bin/python research/int8_cascade.py --model models/ham10000-resnet50 --data data/ham10000 \
        --external "$DEV/dermoscopy-external" --negatives "$DEV/ood-dev,$DEV/skin-photos" [--graph PATH]

The all-int8 graph (every convolution int8, ranges from 300 seeded training images, as `ham-hf
calibrate` builds it before tuning; or `--graph`, an int8 graph already built) flips about 3% of the
fp32 model's decisions, and a flip needs a small margin. A cascade answers with int8 when its margin
(top logit minus second) is at least delta, and with fp32 otherwise; the guard likewise falls back when
its Mahalanobis score or its probe's logit is near its threshold. For each delta: the share sent to
fp32 and the cascade's agreement with fp32 (top-1 on validation and external, balanced accuracy, the
guard's verdicts on every image). Delta is also chosen on 1,000 other training images (the smallest
with no flip at or above it there), so the figures on validation and external judge it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ham_hf import data  # noqa: E402
from ham_hf.finish.int8 import _float_batches, _guard_images, _onnx_outputs  # noqa: E402
from ham_hf.metrics import top_margin  # noqa: E402
from ham_hf.serve import export  # noqa: E402
from ham_hf.serve.classifier import Classifier  # noqa: E402
from ham_hf.serve.guard import BACKSTOP, colour_stats  # noqa: E402
from ham_hf.transforms import cache_split  # noqa: E402


def guard_margins(guard, features, texture, colours) -> np.ndarray:
    """How far each image is from flipping a guard decision: min of |log score/threshold| and |probe logit - floor|."""
    scores = guard.score(features)
    far = np.abs(np.log(np.maximum(scores, 1e-12) / (guard.threshold * BACKSTOP)))
    if guard.probe is None:
        return far
    p = np.clip(guard.probe.dermoscopic(texture, colours), 1e-12, 1 - 1e-12)
    floor = guard.probe.min_dermoscopic
    return np.minimum(far, np.abs(np.log(p / (1 - p)) - np.log(floor / (1 - floor))))


def main() -> None:
    """Log one JSON line per delta and one for the delta fitted on training images."""
    from sklearn.metrics import balanced_accuracy_score

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--external", required=True)
    p.add_argument("--negatives", required=True)
    p.add_argument("--graph", default=None, help="an all-int8 graph of this model (default: built here)")
    p.add_argument("--work", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    clf = Classifier(args.model, backend="torch")
    dc, guard = clf.data_config, clf.guard
    dsd = data.load_splits(args.data)
    order = dsd["train"].shuffle(seed=0)
    calibration = _float_batches(cache_split(order.select(range(300)), dc).images, dc)
    fit = cache_split(order.select(range(300, 1300)), dc)
    val = cache_split(dsd["validation"], dc)
    external, odd, y_ext = _guard_images(dc, args.negatives, args.external, dict(clf.model.config.label2id))
    work = Path(args.work or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    fp32 = export.export_onnx(clf.model.float(), dc.size, work / "fp32.onnx")
    int8 = Path(args.graph) if args.graph else export.quantize_int8(
        fp32, work / "int8-all.onnx", work / "ranges.json", calibration, float_until_stride=0)
    sets = {"fit": fit.images, "validation": val.images, "external": external, "odd": odd}
    out = {}
    for name, images in sets.items():
        batches = _float_batches(images, dc)
        colours = colour_stats(images.numpy())
        for kind, path in (("fp32", fp32), ("int8", int8)):
            z, f, t = _onnx_outputs(path, batches)
            out[name, kind] = {"z": z, "m": top_margin(z), "g": guard_margins(guard, f, t, colours),
                               "v": guard.judge(f, colours, texture=t)[0]}
    labels = {"validation": val.labels.numpy(), "external": y_ext}

    def row(delta: float, gdelta: float) -> dict:
        """The cascade's figures at one pair of thresholds."""
        r = {"delta": delta, "guard_delta": gdelta}
        verdicts, sent_all = [], []
        for name in sets:
            a, b = out[name, "fp32"], out[name, "int8"]
            sent = (b["m"] < delta) | (b["g"] < gdelta)
            top = np.where(sent, a["z"].argmax(1), b["z"].argmax(1))
            verdicts.append(np.where(sent, a["v"], b["v"]) == a["v"])
            sent_all.append(sent)
            r[f"{name}_sent"] = round(float(sent.mean()), 4)
            if name in ("validation", "external"):
                r[f"{name}_agreement"] = round(float((top == a["z"].argmax(1)).mean()), 4)
            if name in labels:
                y = labels[name]
                known = y >= 0
                r[f"{name}_ba_drop"] = round(float(balanced_accuracy_score(y[known], a["z"].argmax(1)[known])
                                                   - balanced_accuracy_score(y[known], top[known])), 4)
        r["guard_verdict_agreement"] = round(float(np.concatenate(verdicts[1:]).mean()), 4)
        return r

    for name in ("validation", "external"):
        a, b = out[name, "fp32"], out[name, "int8"]
        flips = a["z"].argmax(1) != b["z"].argmax(1)
        logging.info("%s: %d flips of %d; int8 margins of the flips: %s", name, flips.sum(), len(flips),
                     np.round(np.sort(b["m"][flips]), 2).tolist())
    for delta in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5):
        for gdelta in (0.0, 0.1, 0.25, 0.5):
            logging.info("%s", json.dumps(row(delta, gdelta)))
    a, b = out["fit", "fp32"], out["fit", "int8"]
    flips = a["z"].argmax(1) != b["z"].argmax(1)
    delta = float(b["m"][flips].max()) + 1e-6 if flips.any() else 0.0
    gflip = a["v"] != b["v"]
    gdelta = float(b["g"][gflip].max()) + 1e-6 if gflip.any() else 0.0
    logging.info("fitted on %d training images (%d flips): %s", len(flips), flips.sum(), json.dumps(row(delta, gdelta)))


if __name__ == "__main__":
    main()
