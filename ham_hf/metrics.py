"""Classification metrics through `evaluate`, from the project's own metric module (loaded by path).

`evaluate.load("accuracy")` would fetch a script from the Hub; this module ships with the package
so metrics work offline.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ham_hf.labels import CLASS_CODES, MALIGNANT

METRIC_PATH = Path(__file__).parent / "evaluate_modules" / "ham10000_metrics"
# The model-selection metric: mean per-class recall, the ISIC 2018 challenge score.
SELECTION_METRIC = "balanced_accuracy"


@lru_cache(maxsize=1)
def load_metric():
    """Load the ham10000_metrics evaluate module from its path in the package."""
    import evaluate

    return evaluate.load(str(METRIC_PATH))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (scipy's, which subtracts the row maximum first)."""
    from scipy.special import softmax as scipy_softmax

    return scipy_softmax(np.asarray(logits, dtype=np.float64), axis=1)


def top_margin(logits: np.ndarray) -> np.ndarray:
    """Each row's largest logit minus its second: how far the decision is from flipping."""
    top2 = np.sort(np.asarray(logits, dtype=np.float64), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def close_calls(logits: np.ndarray, margin: float) -> np.ndarray:
    """Which rows int8's cascade sends to float32: top logit ahead of the second by less than `margin`."""
    return top_margin(logits) < margin


# Bootstrap resamples of a split report's confidence intervals (lesions resampled, seeded).
N_BOOTSTRAP = 1000


def compute(probabilities: np.ndarray, labels: np.ndarray, groups=None, n_bootstrap: int = 0, seed: int = 0) -> dict:
    """Return the full metric dict (scalars, per_class, confusion_matrix, calibration; CIs over `groups`)."""
    return load_metric().compute(
        predictions=np.asarray(probabilities, dtype=np.float32), references=np.asarray(labels),
        label_names=list(CLASS_CODES), malignant=sorted(MALIGNANT), positive="mel",
        groups=list(groups) if groups is not None else None, n_bootstrap=n_bootstrap, seed=seed,
    )


def flatten(result: dict) -> dict[str, float]:
    """Flatten a metric dict into scalars for Trainer logs (recall_mel, f1_nv, ...)."""
    flat = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    for name, scores in result.get("per_class", {}).items():
        for key in ("precision", "recall", "f1"):
            flat[f"{key}_{name}"] = scores[key]
    return flat


def compute_metrics(eval_pred) -> dict[str, float]:
    """Trainer hook: logits + labels -> flat metrics."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return flatten(compute(softmax(logits), labels))
