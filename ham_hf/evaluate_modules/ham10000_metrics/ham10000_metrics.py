"""An `evaluate` metric module for multi-class skin-lesion classification, loaded by path (offline).

    metric = evaluate.load("ham_hf/evaluate_modules/ham10000_metrics")
    metric.compute(predictions=probabilities, references=labels, label_names=[...])
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

_DESCRIPTION = """Accuracy, balanced accuracy (mean per-class recall, the ISIC 2018 challenge score), macro F1,
macro one-vs-rest ROC AUC, per-class precision / recall / F1 / support and the confusion matrix,
calibration (expected calibration error over 15 bins, Brier score), malignant-vs-benign ROC AUC and
melanoma sensitivity at the decision and at fixed specificities, from class probabilities (one row per example) and
integer references; optionally with bootstrap confidence intervals that resample groups (lesions)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of lists of float, the probability of each class (rows sum to 1).
    references: list of int, the true class ids.
    label_names: optional list of str, one name per class (default "0".."K-1").
    malignant: optional list of class names counted as malignant (for malignant_roc_auc).
    positive: optional class name whose sensitivity at the decision (the share of its examples predicted
        as it) and at fixed specificities is reported (e.g. "mel").
    groups: optional list of group ids (lesion_id), one per example: the bootstrap resamples groups.
    n_bootstrap: resamples for the 95% confidence intervals (0: none), seed: their random seed.
Returns:
    accuracy, balanced_accuracy, macro_f1, roc_auc_macro (NaN when a class is absent from the
    references), per_class: {name: {precision, recall, f1, support}}, confusion_matrix: K x K
    list (rows true, columns predicted), ece, brier; malignant_roc_auc,
    {positive}_sensitivity_at_decision and {positive}_sensitivity_at_specificity_{80,90} when asked for;
    ci: {metric: [low, high]} with n_bootstrap > 0.
"""

SPECIFICITIES = (0.8, 0.9)
N_BINS = 15


def expected_calibration_error(probs, refs, n_bins=N_BINS):
    """ECE of the top-class confidence over equal-width bins (Guo et al., 2017)."""
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == refs
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    gaps = [abs(correct[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
            for b in range(n_bins) if (bins == b).any()]
    return float(np.sum(gaps))


def brier_score(probs, refs):
    """Mean over examples of the squared distance between the probabilities and the one-hot truth."""
    onehot = np.eye(probs.shape[1])[refs]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def sensitivity_at_specificity(positive, score, specificity):
    """Share of positives caught at the threshold that keeps `specificity` of the negatives below it."""
    if positive.all() or not positive.any():
        return float("nan")
    threshold = np.quantile(score[~positive], specificity)
    return float((score[positive] > threshold).mean())


def roc_auc(positive, score):
    """ROC AUC as the Mann-Whitney statistic with tied scores averaged (equals sklearn's roc_auc_score)."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _scores(probs, refs, malignant_ids, positive_id):
    """The scalar metrics of one (re)sample, in numpy (a bootstrap runs this a thousand times)."""
    k = probs.shape[1]
    preds = probs.argmax(axis=1)
    cm = np.bincount(refs * k + preds, minlength=k * k).reshape(k, k)
    present = np.flatnonzero(cm.sum(axis=1))
    tp, true_n, pred_n = np.diag(cm).astype(float), cm.sum(axis=1), cm.sum(axis=0)
    recall = tp[present] / true_n[present]
    denom = (true_n + pred_n)[present]
    f1 = np.where(denom > 0, 2 * tp[present] / np.maximum(denom, 1), 0.0)
    aucs = [roc_auc(refs == c, probs[:, c]) for c in present] if len(present) > 1 else []
    out = {
        "accuracy": float(tp.sum() / len(refs)),
        "balanced_accuracy": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "roc_auc_macro": float(np.mean(aucs)) if aucs else float("nan"),
    }
    if malignant_ids:
        out["malignant_roc_auc"] = roc_auc(np.isin(refs, malignant_ids), probs[:, malignant_ids].sum(axis=1))
    if positive_id is not None:
        is_positive = refs == positive_id
        out["sensitivity_at_decision"] = float((preds[is_positive] == positive_id).mean()) if is_positive.any() \
            else float("nan")
        for spec in SPECIFICITIES:
            out[f"sensitivity_at_specificity_{round(spec * 100)}"] = sensitivity_at_specificity(
                refs == positive_id, probs[:, positive_id], spec)
    return out


def bootstrap_ci(probs, refs, groups, n_bootstrap, seed, **kwargs):
    """95% percentile intervals of _scores over resamples of whole groups (lesions), seeded."""
    rng = np.random.default_rng(seed)
    _, group_idx = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(group_idx == g) for g in range(group_idx.max() + 1)]
    samples = []
    for _ in range(n_bootstrap):
        rows = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        samples.append(_scores(probs[rows], refs[rows], **kwargs))
    return {key: [float(np.nanpercentile(vals, 2.5)), float(np.nanpercentile(vals, 97.5))]
            for key in samples[0] for vals in [np.array([s[key] for s in samples], dtype=np.float64)]}

_CITATION = """@article{scikit-learn, title={Scikit-learn: Machine Learning in {P}ython},
author={Pedregosa, F. and others},
journal={Journal of Machine Learning Research}, volume={12}, pages={2825--2830}, year={2011}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Ham10000Metrics(evaluate.Metric):
    """Multi-class classification metrics from probabilities."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, label_names=None, malignant=None, positive=None, groups=None,
                 n_bootstrap=0, seed=0):
        probs = np.asarray(predictions, dtype=np.float64)
        refs = np.asarray(references, dtype=np.int64)
        k = probs.shape[1]
        names = list(label_names) if label_names is not None else [str(i) for i in range(k)]
        ids = list(range(k))
        preds = probs.argmax(axis=1)
        precision, recall, f1, support = precision_recall_fscore_support(
            refs, preds, labels=ids, average=None, zero_division=0
        )
        # One-vs-rest AUC of each class present in the references is averaged (an absent class, or
        # the only one present, has no ROC curve); balanced accuracy is sklearn's mean recall over
        # the classes present.
        kwargs = {"malignant_ids": [names.index(m) for m in malignant or []],
                  "positive_id": names.index(positive) if positive is not None else None}
        result = _scores(probs, refs, **kwargs)
        if positive is not None:
            result = {k2 if not k2.startswith("sensitivity") else f"{positive}_{k2}": v for k2, v in result.items()}
        result.update({
            "ece": expected_calibration_error(probs, refs),
            "brier": brier_score(probs, refs),
            "per_class": {
                name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for name, p, r, f, s in zip(names, precision, recall, f1, support)
            },
            "confusion_matrix": confusion_matrix(refs, preds, labels=ids).tolist(),
        })
        if n_bootstrap:
            if groups is None or len(groups) != len(refs):
                raise ValueError("bootstrap intervals need one group id (lesion_id) per example")
            ci = bootstrap_ci(probs, refs, groups, n_bootstrap, seed, **kwargs)
            result["ci"] = {k2 if not k2.startswith("sensitivity") else f"{positive}_{k2}": v for k2, v in ci.items()}
            result["ci_resamples"] = int(n_bootstrap)
        return result
