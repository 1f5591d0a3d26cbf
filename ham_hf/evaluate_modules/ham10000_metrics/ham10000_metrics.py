"""An `evaluate` metric module for multi-class skin-lesion classification, loaded by path (offline).

    metric = evaluate.load("ham_hf/evaluate_modules/ham10000_metrics")
    metric.compute(predictions=probabilities, references=labels, label_names=[...])
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

_DESCRIPTION = """Accuracy, balanced accuracy (mean per-class recall, the ISIC 2018 challenge score), macro F1,
macro one-vs-rest ROC AUC, per-class precision / recall / F1 / support and the confusion matrix,
from class probabilities (one row per example) and integer references."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of lists of float, the probability of each class (rows sum to 1).
    references: list of int, the true class ids.
    label_names: optional list of str, one name per class (default "0".."K-1").
Returns:
    accuracy, balanced_accuracy, macro_f1, roc_auc_macro (NaN when a class is absent from the
    references), per_class: {name: {precision, recall, f1, support}}, confusion_matrix: K x K
    list (rows true, columns predicted).
"""

_CITATION = """@article{scikit-learn, title={Scikit-learn: Machine Learning in {P}ython}, author={Pedregosa, F. and others},
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

    def _compute(self, predictions, references, label_names=None):
        probs = np.asarray(predictions, dtype=np.float64)
        refs = np.asarray(references, dtype=np.int64)
        k = probs.shape[1]
        names = list(label_names) if label_names is not None else [str(i) for i in range(k)]
        ids = list(range(k))
        preds = probs.argmax(axis=1)
        precision, recall, f1, support = precision_recall_fscore_support(
            refs, preds, labels=ids, average=None, zero_division=0
        )
        present = np.unique(refs)
        # One-vs-rest AUC of each class present in the references, averaged (a class that is
        # absent, or the only one present, has no ROC curve).
        aucs = [roc_auc_score(refs == c, probs[:, c]) for c in present] if len(present) > 1 else []
        auc = float(np.mean(aucs)) if aucs else float("nan")
        return {
            "accuracy": float(accuracy_score(refs, preds)),
            # Mean recall over the classes present in the references (sklearn's definition).
            "balanced_accuracy": float(balanced_accuracy_score(refs, preds)),
            "macro_f1": float(f1_score(refs, preds, labels=present, average="macro", zero_division=0)),
            "roc_auc_macro": auc,
            "per_class": {
                name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for name, p, r, f, s in zip(names, precision, recall, f1, support)
            },
            "confusion_matrix": confusion_matrix(refs, preds, labels=ids).tolist(),
        }
