"""What an ensemble of saved models would score: the geometric mean of their answers, on validation.

Reads each model folder's `{split}_predictions.csv` (what `ham-hf train` / `evaluate` wrote: the
calibrated, logit-adjusted probabilities) and scores every model alone, then the mean of their
log-probabilities, with the project's metrics. An ensemble is not one model `pipeline(...)` loads;
this says whether distilling it into one (`ham-hf train --distill_from A B`) has anything to gain.

    .venv/bin/ham-hf evaluate --model models/ham10000-resnet50 --data data/ham10000 --split validation \
        --output_dir outputs/default-validation
    .venv/bin/python research/ensemble_study.py --models outputs/default-validation outputs/RUN
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ham_hf import metrics  # noqa: E402
from ham_hf.errors import ModelError  # noqa: E402
from ham_hf.labels import CLASS_CODES  # noqa: E402

logger = logging.getLogger("ensemble_study")
FIGURES = ("balanced_accuracy", "accuracy", "macro_f1", "roc_auc_macro", "ece")


def read_predictions(model_dir: Path, split: str) -> pd.DataFrame:
    """One model's saved predictions of a split, indexed by image id."""
    path = Path(model_dir) / f"{split}_predictions.csv"
    if not path.is_file():
        raise ModelError(f"{path} is missing: score the model first (ham-hf evaluate --model {model_dir} "
                         f"--split {split} --output_dir OUT) and pass OUT")
    return pd.read_csv(path).set_index("image_id").sort_index()


def ensemble(frames: list[pd.DataFrame]) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) of the geometric-mean ensemble; the models must have scored the same images."""
    first = frames[0]
    for frame in frames[1:]:
        if not frame.index.equals(first.index) or not (frame["label"] == first["label"]).all():
            raise ModelError("the models scored different images: score them on one split (the same split.csv)")
    columns = [f"prob_{c}" for c in CLASS_CODES]
    log_p = np.mean([np.log(np.clip(f[columns].to_numpy(np.float64), 1e-12, None)) for f in frames], axis=0)
    probs = np.exp(log_p - log_p.max(1, keepdims=True))
    labels = first["label"].map(CLASS_CODES.index).to_numpy()
    return probs / probs.sum(1, keepdims=True), labels


def main(argv: list[str] | None = None) -> list[dict]:
    """Score each model and their ensemble on one split; log a table and return its rows."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True,
                        help="Folders with {split}_predictions.csv (a training run's, or ham-hf evaluate's output).")
    parser.add_argument("--split", default="validation", help="Select on validation; the test split once.")
    args = parser.parse_args(argv)
    frames = [read_predictions(Path(m), args.split) for m in args.models]
    rows = []
    for name, members in [*((m, [f]) for m, f in zip(args.models, frames)), ("ensemble", frames)]:
        result = metrics.compute(*ensemble(members))
        rows.append({"model": name, **{k: round(float(result[k]), 4) for k in FIGURES}})
        logger.info("%s", rows[-1])
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
