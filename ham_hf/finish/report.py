"""Reports of a scored split: metrics JSON, confusion-matrix PNG, per-class report, predictions CSV, plots."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from ham_hf import metrics
from ham_hf.figures import figure
from ham_hf.labels import CLASS_CODES, LONG_NAMES, MALIGNANT

logger = logging.getLogger(__name__)


def plot_confusion_matrix(cm: Sequence[Sequence[int]], path: str | Path, title: str = "Confusion matrix") -> Path:
    """Save a confusion-matrix heat map (scikit-learn's display): colour is the row share (recall), text the count."""
    from sklearn.metrics import ConfusionMatrixDisplay

    cm = np.asarray(cm)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    shown = ConfusionMatrixDisplay(share, display_labels=list(CLASS_CODES)).plot(
        ax=ax, cmap="Blues", im_kw={"vmin": 0, "vmax": 1}, colorbar=False, text_kw={"fontsize": 7})
    for (i, j), text in np.ndenumerate(shown.text_):  # the count beside the share; white on the darker half
        text.set_text(f"{cm[i, j]}\n{share[i, j]:.0%}")
        text.set_color("white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(shown.im_, ax=ax, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_reliability(probs: np.ndarray, labels: np.ndarray, path: str | Path, title: str = "Reliability",
                     n_bins: int = 15) -> Path:
    """Save a reliability diagram: accuracy against confidence of the top class, per confidence bin."""
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    used = [b for b in range(n_bins) if (bins == b).any()]
    fig = figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.bar([(b + 0.5) / n_bins for b in used], [correct[bins == b].mean() for b in used], width=1 / n_bins,
           edgecolor="black", alpha=0.7, label="accuracy in bin")
    ax.plot([conf[bins == b].mean() for b in used], [correct[bins == b].mean() for b in used], "o", color="C3",
            label="mean confidence")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_training_curves(log_history: list[dict], path: str | Path) -> Path:
    """Save training loss per step and validation loss / balanced accuracy per evaluation."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h.get("eval_loss"), h.get(f"eval_{metrics.SELECTION_METRIC}")) for h in log_history
             if "eval_loss" in h]
    fig = figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    if train:
        ax1.plot(*zip(*train), label="train loss")
    if evals:
        ax1.plot([e[0] for e in evals], [e[1] for e in evals], "o-", label="validation loss")
        ax2.plot([e[0] for e in evals], [e[2] for e in evals], "o-", color="C2", label="validation balanced accuracy")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax2.set_xlabel("step")
    ax2.set_ylabel("balanced accuracy")
    ax2.set_ylim(0, 1)
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:  # a run without evaluations has nothing to label
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def write_per_class(result: dict, path: str | Path) -> Path:
    """Write the per-class precision / recall / F1 / support table as CSV."""
    with Path(path).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "name", "precision", "recall", "f1", "support"])
        for code in CLASS_CODES:
            s = result["per_class"][code]
            writer.writerow([code, LONG_NAMES[code], f"{s['precision']:.4f}", f"{s['recall']:.4f}", f"{s['f1']:.4f}",
                             s["support"]])
    return Path(path)


def write_predictions(path: str | Path, image_ids: Sequence[str], labels: Sequence[int], probs: np.ndarray) -> Path:
    """Write one row per image: id, true and predicted class, and all 7 probabilities."""
    with Path(path).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "label", "predicted", *[f"prob_{c}" for c in CLASS_CODES]])
        for image_id, label, p in zip(image_ids, labels, probs):
            writer.writerow([image_id, CLASS_CODES[int(label)], CLASS_CODES[int(np.argmax(p))],
                             *[f"{v:.6f}" for v in p]])
    return Path(path)


def by_subgroup(probs: np.ndarray, labels: Sequence[int], subgroups: Sequence[str | None]) -> dict[str, dict]:
    """Images, accuracy and balanced accuracy (over the classes present) of each subgroup, largest first."""
    predicted, labels = np.asarray(probs).argmax(1), np.asarray(labels)
    names = np.array([str(g) for g in subgroups])
    out = {}
    for name in sorted(set(names), key=lambda g: -(names == g).sum()):
        y, p = labels[names == name], predicted[names == name]
        out[name] = {"n": int(len(y)), "accuracy": float((y == p).mean()),
                     "balanced_accuracy": float(np.mean([(p[y == c] == c).mean() for c in np.unique(y)]))}
    return out


# Patient subgroups of a scored split: a group smaller than MIN_IMAGES reads nothing, and the melanoma /
# malignant figures need MIN_POSITIVES melanomas (malignant and benign lesions): intervals wider than
# that say nothing.
AGE_BANDS = ((0, 40, "under 40"), (40, 60, "40-59"), (60, float("inf"), "60 and over"))
COMMONEST_SITES = 5
MIN_IMAGES = 30
MIN_POSITIVES = 10
# Each subgroup figure and the metric module's name for it.
SUBGROUP_METRICS = {"balanced_accuracy": "balanced_accuracy", "mel_sensitivity": "mel_sensitivity_at_decision",
                    "malignant_roc_auc": "malignant_roc_auc"}


def age_band(age) -> str:
    """The age band of an age in years ("unknown" when not recorded)."""
    if age is None or age != age:  # None or NaN
        return "unknown"
    return next(name for low, high, name in AGE_BANDS if low <= float(age) < high)


def patient_groups(metadata: dict[str, Sequence]) -> dict[str, list[str]]:
    """Each image's group by sex, age band and body site (the commonest sites; the rest "other sites")."""
    out = {}
    if "sex" in metadata:
        out["sex"] = [str(v) if v not in (None, "") else "unknown" for v in metadata["sex"]]
    if "age" in metadata:
        out["age"] = [age_band(v) for v in metadata["age"]]
    if "localization" in metadata:
        sites = [str(v) if v not in (None, "") else "unknown" for v in metadata["localization"]]
        known = [s for s in sites if s != "unknown"]
        common = [s for s, _ in Counter(known).most_common(COMMONEST_SITES)]
        out["site"] = [s if s in common or s == "unknown" else "other sites" for s in sites]
    return out


def subgroup_figures(probs: np.ndarray, labels: Sequence[int], lesions: Sequence[str], metadata: dict[str, Sequence],
                     n_bootstrap: int = metrics.N_BOOTSTRAP, seed: int = 0) -> dict:
    """Each patient group's images, lesions and figures with 95% lesion-bootstrap intervals (the metric module's,
    `ham_hf.metrics.compute`); the figures of a group too small to read are None."""
    probs, labels, lesions = np.asarray(probs, dtype=np.float64), np.asarray(labels), np.asarray(lesions)
    mel, malignant_ids = CLASS_CODES.index("mel"), [CLASS_CODES.index(c) for c in sorted(MALIGNANT)]
    out: dict = {"rule": {"min_images": MIN_IMAGES, "min_positives": MIN_POSITIVES, "resamples": n_bootstrap,
                          "commonest_sites": COMMONEST_SITES}}
    for kind, names in patient_groups(metadata).items():
        names = np.asarray(names)
        out[kind] = {}
        for name in sorted(set(names), key=lambda g: _group_order(kind, g, (names == g).sum())):
            rows = np.flatnonzero(names == name)
            y = labels[rows]
            n_malignant = int(np.isin(y, malignant_ids).sum())
            readable = {"balanced_accuracy": len(rows) >= MIN_IMAGES,
                        "mel_sensitivity": len(rows) >= MIN_IMAGES and (y == mel).sum() >= MIN_POSITIVES,
                        "malignant_roc_auc": len(rows) >= MIN_IMAGES and min(n_malignant, len(y) - n_malignant)
                        >= MIN_POSITIVES}
            group = {"n": int(len(rows)), "lesions": int(len(set(lesions[rows]))), "melanomas": int((y == mel).sum()),
                     "malignant": n_malignant, "ci": {}}
            scored = metrics.compute(probs[rows], y, groups=lesions[rows], n_bootstrap=n_bootstrap, seed=seed) \
                if any(readable.values()) else {}
            for key, ok in readable.items():
                source = SUBGROUP_METRICS[key]
                group[key] = scored[source] if ok else None
                if ok:
                    group["ci"][key] = scored["ci"][source]
            group["too_small"] = [key for key, ok in readable.items() if not ok]
            out[kind][name] = group
    return out


def _group_order(kind: str, name: str, n: int) -> tuple:
    """Age bands young to old, other groups largest first; unknown and the rest last."""
    bands = [band for _, _, band in AGE_BANDS]
    rank = bands.index(name) if kind == "age" and name in bands else -n
    return (name in ("unknown", "other sites"), rank, name)


def write_split_reports(output_dir: str | Path, split: str, probs: np.ndarray, labels: Sequence[int],
                        image_ids: Sequence[str], groups: Sequence[str] | None = None,
                        metadata: dict[str, Sequence] | None = None) -> dict:
    """Score a split (95% CIs resampling `groups`, the lesions; figures by how each diagnosis was confirmed and
    by patient group, from `metadata`) and write its metrics JSON, confusion matrix, reliability diagram,
    per-class report and predictions."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = list(groups) if groups is not None else list(image_ids)
    metadata = metadata or {}
    result = metrics.compute(probs, np.asarray(labels), groups=groups, n_bootstrap=metrics.N_BOOTSTRAP)
    if metadata.get("dx_type") is not None:
        # HAM10000's follow-up images are all nevi of one kind and easy; histopathology-confirmed lesions
        # look most like other clinics' data: the overall figures hide which is which.
        result["by_dx_type"] = by_subgroup(probs, labels, metadata["dx_type"])
        logger.info("%s by dx_type: %s", split, ", ".join(
            f"{k} (n={v['n']}) accuracy {v['accuracy']:.3f} balanced {v['balanced_accuracy']:.3f}"
            for k, v in result["by_dx_type"].items()))
    if any(metadata.get(c) is not None for c in ("sex", "age", "localization")):
        result["subgroups"] = subgroup_figures(probs, labels, groups, metadata)
        log_subgroups(split, result["subgroups"])
    (out / f"{split}_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_confusion_matrix(result["confusion_matrix"], out / f"{split}_confusion_matrix.png",
                          title=f"{split}: balanced accuracy {result['balanced_accuracy']:.3f}")
    plot_reliability(probs, np.asarray(labels), out / f"{split}_reliability.png",
                     title=f"{split}: ECE {result['ece']:.3f}")
    write_per_class(result, out / f"{split}_per_class.csv")
    write_predictions(out / f"{split}_predictions.csv", image_ids, labels, probs)
    logger.info("%s: accuracy %.4f, balanced accuracy %.4f, macro F1 %.4f, macro AUC %.4f", split,
                result["accuracy"], result["balanced_accuracy"], result["macro_f1"], result["roc_auc_macro"])
    return result


def log_subgroups(split: str, subgroups: dict) -> None:
    """One log line per patient grouping: each group's balanced accuracy, or that it is too small."""
    for kind in ("sex", "age", "site"):
        if kind in subgroups:
            logger.info("%s by %s: %s", split, kind, "; ".join(
                f"{name} (n={g['n']}) " + (f"balanced accuracy {g['balanced_accuracy']:.3f}"
                                           if g["balanced_accuracy"] is not None else "too small to read")
                for name, g in subgroups[kind].items()))
