"""Exploration helpers for the walkthrough notebook: the metadata as a frame, and what a plain
(not lesion-grouped) split would leak. The notebook tells the story; these only count.
"""

from __future__ import annotations

import numpy as np

from ham_hf.labels import CLASS_CODES
from ham_hf.split import SplitArguments


def metadata_frame(dataset):
    """Return the metadata (no images) as a pandas DataFrame with a `dx` code column."""
    frame = dataset.remove_columns("image").to_pandas()
    frame["dx"] = [CLASS_CODES[i] for i in frame["label"]]
    return frame


def plain_split_leakage(dataset, args: SplitArguments | None = None) -> dict[str, int]:
    """Count what a plain (not lesion-grouped) stratified split with the same fractions would leak.

    Returns how many lesions would have images both in training and in the held-out part
    (validation + test), and how many held-out images have a sibling of the same lesion in training.
    """
    from sklearn.model_selection import train_test_split

    args = args or SplitArguments()
    idx = np.arange(len(dataset))
    labels = np.asarray(dataset["label"])
    lesions = np.asarray(dataset["lesion_id"])
    held_out = args.validation_fraction + args.test_fraction
    train_idx, rest = train_test_split(idx, test_size=held_out, stratify=labels, random_state=args.split_seed)
    train_lesions = set(lesions[train_idx])
    return {
        "lesions_in_train_and_held_out": len(train_lesions & set(lesions[rest])),
        "held_out_images_with_lesion_in_train": int(sum(lesions[i] in train_lesions for i in rest)),
        "held_out_images": int(len(rest)),
    }
