"""Reports of a scored split: metrics JSON, confusion-matrix PNG, per-class report, predictions CSV, plots."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ham_hf import metrics
from ham_hf.figures import figure
from ham_hf.labels import CLASS_CODES, LONG_NAMES

logger = logging.getLogger(__name__)


def plot_confusion_matrix(cm: Sequence[Sequence[int]], path: str | Path, title: str = "Confusion matrix") -> Path:
    """Save a confusion-matrix heat map: colour is the row share (recall), text the count."""
    cm = np.asarray(cm)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(CLASS_CODES)), CLASS_CODES)
    ax.set_yticks(range(len(CLASS_CODES)), CLASS_CODES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="share of the true class")
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


def write_split_reports(output_dir: str | Path, split: str, probs: np.ndarray, labels: Sequence[int],
                        image_ids: Sequence[str], groups: Sequence[str] | None = None,
                        dx_types: Sequence[str | None] | None = None) -> dict:
    """Score a split (95% CIs resampling `groups`, the lesions; figures by `dx_types`, how each diagnosis
    was confirmed) and write its metrics JSON, confusion matrix, reliability diagram, per-class report
    and predictions."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = list(groups) if groups is not None else list(image_ids)
    result = metrics.compute(probs, np.asarray(labels), groups=groups, n_bootstrap=metrics.N_BOOTSTRAP)
    if dx_types is not None:
        # HAM10000's follow-up images are all nevi of one kind and easy; histopathology-confirmed lesions
        # look most like other clinics' data: the overall figures hide which is which.
        result["by_dx_type"] = by_subgroup(probs, labels, dx_types)
        logger.info("%s by dx_type: %s", split, ", ".join(
            f"{k} (n={v['n']}) accuracy {v['accuracy']:.3f} balanced {v['balanced_accuracy']:.3f}"
            for k, v in result["by_dx_type"].items()))
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


def update_all_results(output_dir: str | Path, results: dict, stale: tuple[str, ...] = ()) -> Path:
    """Merge results into all_results.json (as transformers' examples keep it), first dropping keys starting `stale`."""
    path = Path(output_dir) / "all_results.json"
    current = json.loads(path.read_text()) if path.is_file() else {}
    current = {k: v for k, v in current.items() if not (stale and k.startswith(stale))}
    current.update(results)
    path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    return path
