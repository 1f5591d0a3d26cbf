"""What the logit-adjustment tau of a saved model trades: balanced accuracy against accuracy, AUC and ECE.

A model trained with `--logit_adjustment_tau` carries tau x log(train prior) and the temperature T
folded into its head. This script unfolds both from the validation logits, re-decides with each tau
of the training grid, refits T on validation for each, and reports the validation figures, so a
choice of tau (or the case for a better-fitted model) rests on measurement, not on the test split.

    .venv/bin/python research/tau_tradeoff.py --model models/ham10000-resnet50 --data data/ham10000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ham_hf import data, precision, results  # noqa: E402
from ham_hf import model as model_lib  # noqa: E402
from ham_hf.errors import ModelError  # noqa: E402
from ham_hf.finish.calibration import TAU_GRID, check_same_split, tau_scores  # noqa: E402
from ham_hf.finish.evaluation import embed  # noqa: E402
from ham_hf.finish.report import by_subgroup  # noqa: E402
from ham_hf.head import log_prior, unfold_logits  # noqa: E402
from ham_hf.transforms import cache_split  # noqa: E402

logger = logging.getLogger("tau_tradeoff")


def raw_logits(logits: np.ndarray, held: dict, prior: np.ndarray) -> np.ndarray:
    """Undo the model's folded temperature and logit adjustment (its record's head section says which)."""
    if "logit_adjustment_tau" not in held:
        raise ModelError("this model was not trained with logit adjustment (no logit_adjustment_tau in its "
                         "results.json): there is no tau to trade")
    return unfold_logits(logits, held.get("temperature", 1.0), held["logit_adjustment_tau"], prior)


def sweep(raw: np.ndarray, labels: np.ndarray, prior: np.ndarray, taus=TAU_GRID, dx_types=None) -> list[dict]:
    """Validation figures for each tau (the training grid by default), each with its own Brier-fitted temperature.

    With `dx_types`, also the histopathology-confirmed images' balanced accuracy and accuracy: the
    hard cases, and the most like other clinics' data.
    """
    rows = []
    for tau in taus:
        m = tau_scores(raw, labels, prior, tau)
        rows.append({"tau": tau, "temperature": round(m["temperature"], 3),
                     **{k: round(m[k], 4) for k in ("balanced_accuracy", "accuracy", "macro_f1", "roc_auc_macro")},
                     "ece": round(m["ece"], 4), "recall_mel": round(m["per_class"]["mel"]["recall"], 4),
                     "recall_nv": round(m["per_class"]["nv"]["recall"], 4)})
        if dx_types is not None:
            histo = by_subgroup(raw - tau * prior, labels, dx_types).get("histo", {})
            rows[-1].update({f"histo_{k}": round(histo.get(k, float("nan")), 4)
                             for k in ("balanced_accuracy", "accuracy")})
    return rows


def main() -> None:
    """Parse the options, score validation once, and print (and optionally save) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a folder written by `ham-hf train` / `ham-hf bundle`")
    parser.add_argument("--data", required=True, help="the data the model was trained on (prepared or raw)")
    parser.add_argument("--output", help="also write the rows as JSON here")
    parser.add_argument("--taus", type=float, nargs="+", default=list(TAU_GRID),
                        help="the taus to score (default: the training grid %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    held = results.load(args.model).get("head", {})
    model = model_lib.load_model(args.model).float().eval().to(memory_format=torch.channels_last)
    dc = model_lib.data_config(model)
    dsd = data.load_splits(args.data)
    check_same_split(dsd, Path(args.model) / data.SPLIT_FILE)
    prior = log_prior(torch.as_tensor(dsd["train"]["label"])).double().numpy()
    val = cache_split(dsd["validation"], dc)
    with torch.inference_mode():
        logits = embed(model, val, dc, bf16=precision.use_bf16("cpu"))[1]
    rows = sweep(raw_logits(logits.astype(np.float64), held, prior), val.labels.numpy(), prior, args.taus,
                 val.dx_types)
    columns = [k for k in rows[0] if k != "tau"]
    logger.info("| tau | %s |", " | ".join(c.replace("_", " ") for c in columns))
    logger.info("|---:|%s", "---:|" * len(columns))
    for r in rows:
        logger.info("| %s |", " | ".join(str(r[k]) for k in ("tau", *columns)))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
