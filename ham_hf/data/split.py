"""The split: byte-identical images found, lesions grouped (with their duplicates), and train /
validation / test assigned grouped by lesion, stratified by class and seeded.

`SplitArguments` is the one place that decides the split; `split.csv` records it.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ham_hf.data.schema import SPLITS
from ham_hf.errors import DataError
from ham_hf.labels import CLASS_CODES

logger = logging.getLogger(__name__)


@dataclass
class SplitArguments:
    """How a data set is split: fractions and seed (the one place that decides the split)."""

    train_fraction: float = field(default=0.70, metadata={"help": "Share of images for training."})
    validation_fraction: float = field(
        default=0.15, metadata={"help": "Share of images for validation (model selection)."}
    )
    test_fraction: float = field(default=0.15, metadata={"help": "Share of images held out for the final test."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the lesion-grouped split."})

    def __post_init__(self):
        fractions = self.fractions
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6 or self.train_fraction <= 0:
            raise DataError(
                f"split fractions must be >= 0, sum to 1 and give training a share; got train="
                f"{self.train_fraction}, validation={self.validation_fraction}, test={self.test_fraction}"
            )

    def describe(self) -> str:
        """Say in one paragraph how the split is made (for cards and reports)."""
        t, v, s = (round(100 * f) for f in self.fractions)
        return (
            f"Train / validation / test = {t} / {v} / {s} % of the images, grouped by `lesion_id` (all images of "
            "one lesion, and byte-identical images, fall in one split), stratified by diagnosis, seed "
            f"{self.split_seed}. `split.csv` lists every image_id with its split."
        )

    @property
    def fractions(self) -> tuple[float, float, float]:
        """Return (train, validation, test) fractions."""
        return (self.train_fraction, self.validation_fraction, self.test_fraction)


def find_duplicates(dataset) -> list[list[str]]:
    """Return groups of image_ids whose image files are byte-identical."""
    import datasets

    raw = dataset.cast_column("image", datasets.Image(decode=False))
    by_hash: dict[str, list[str]] = defaultdict(list)
    for image, image_id in zip(raw["image"], raw["image_id"]):
        by_hash[hashlib.sha256(image["bytes"]).hexdigest()].append(image_id)
    return sorted(sorted(ids) for ids in by_hash.values() if len(ids) > 1)


def _groups(lesion_ids: Sequence[str], image_ids: Sequence[str], duplicates: list[list[str]]) -> list[int]:
    """Assign each row a group: one per lesion, with lesions joined where they share a duplicate image.

    The groups are the connected components of a lesion graph whose edges are the duplicates,
    numbered in order of first appearance (so a split depends only on the data and the seed).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    index = {lesion: i for i, lesion in enumerate(dict.fromkeys(lesion_ids))}
    lesion_of = dict(zip(image_ids, lesion_ids))
    edges = [(index[lesion_of[ids[0]]], index[lesion_of[other]]) for ids in duplicates for other in ids[1:]]
    rows, cols = (list(e) for e in zip(*edges)) if edges else ([], [])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(index), len(index)))
    component = connected_components(graph, directed=False)[1]
    of_row = [component[index[lesion]] for lesion in lesion_ids]
    numbering = {c: i for i, c in enumerate(dict.fromkeys(of_row))}
    return [numbering[c] for c in of_row]


def assign_splits(labels: Sequence[int], groups: Sequence[int], args: SplitArguments) -> np.ndarray:
    """Return the split index (0 train, 1 validation, 2 test) of each row, grouped and stratified."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    rng = np.random.default_rng(args.split_seed)
    members: dict[int, list[int]] = defaultdict(list)
    for row, g in enumerate(groups):
        members[int(g)].append(row)
    # A group is stratified by its most common label (HAM10000 lesions carry a single dx).
    group_label = {g: Counter(labels[rows].tolist()).most_common(1)[0][0] for g, rows in members.items()}
    split = np.empty(len(labels), dtype=np.int64)
    fractions = np.asarray(args.fractions)
    for cls in sorted(set(group_label.values())):
        cls_groups = [g for g in members if group_label[g] == cls]
        rng.shuffle(cls_groups)
        # Large groups first, so the small ones can even out the fractions at the end.
        cls_groups.sort(key=lambda g: -len(members[g]))
        target = fractions * sum(len(members[g]) for g in cls_groups)
        filled = np.zeros(3)
        for g in cls_groups:
            s = int(np.argmax(target - filled))
            filled[s] += len(members[g])
            split[members[g]] = s
    return split


def split_dataset(dataset, args: SplitArguments | None = None, duplicates: list[list[str]] | None = None):
    """Split a dataset into a DatasetDict(train, validation, test) grouped by lesion and duplicates."""
    import datasets

    args = args or SplitArguments()
    duplicates = find_duplicates(dataset) if duplicates is None else duplicates
    groups = _groups(dataset["lesion_id"], dataset["image_id"], duplicates)
    split = assign_splits(dataset["label"], groups, args)
    return datasets.DatasetDict(
        {name: dataset.select(np.flatnonzero(split == i)) for i, name in enumerate(SPLITS)}
    )


def split_table(dsd) -> list[dict[str, str]]:
    """Return one row per image: image_id, lesion_id, dx, split (what split.csv holds)."""
    rows = []
    for name in SPLITS:
        ds = dsd[name]
        for image_id, lesion_id, label in zip(ds["image_id"], ds["lesion_id"], ds["label"]):
            rows.append({"image_id": image_id, "lesion_id": lesion_id, "dx": CLASS_CODES[label], "split": name})
    return rows


def write_split_file(dsd, path: str | Path) -> Path:
    """Write split.csv (image_id -> split) for reproduction and audit."""
    path = Path(path)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image_id", "lesion_id", "dx", "split"])
        writer.writeheader()
        writer.writerows(split_table(dsd))
    return path


def read_split_file(path: str | Path, split: str) -> set[str]:
    """The image ids that a split.csv puts in `split`."""
    with Path(path).open(newline="") as fh:
        return {row["image_id"] for row in csv.DictReader(fh) if row["split"] == split}


def class_counts(dsd) -> dict[str, dict[str, int]]:
    """Return {split: {class code: image count}}."""
    out = {}
    for name in dsd:
        counts = Counter(dsd[name]["label"])
        out[name] = {code: counts.get(i, 0) for i, code in enumerate(CLASS_CODES)}
    return out
