"""Helpers for the walkthrough notebook: the metadata as a frame, what a plain (not lesion-grouped)
split would leak, an image grid, and a run's reports read back. The notebook tells the story.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ham_hf.data.split import SplitArguments
from ham_hf.figures import figure
from ham_hf.labels import CLASS_CODES


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


def plot_image_grid(images: Sequence, titles: Sequence[str], ncols: int = 4, colours: Sequence[str] | None = None,
                    size: float = 2.6):
    """Return a matplotlib Figure showing images in a grid with a (coloured) title each."""
    nrows = max(1, -(-len(images) // ncols))
    fig = figure(figsize=(size * ncols, size * nrows + 0.3))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (ax, img, title) in enumerate(zip(axes.flat, images, titles)):
        ax.imshow(img)
        ax.set_title(title, fontsize=8, color=colours[k] if colours else "black")
    fig.tight_layout()
    return fig


def prediction_titles(rows: Sequence[dict]) -> tuple[list[str], list[str]]:
    """Titles ("true -> predicted (p)") and colours (green right, red wrong) for prediction-CSV rows."""
    titles, colours = [], []
    for r in rows:
        p = float(r[f"prob_{r['predicted']}"])
        titles.append(f"true {r['label']} -> {r['predicted']} ({p:.0%})")
        colours.append("green" if r["label"] == r["predicted"] else "red")
    return titles, colours


def read_metrics(output_dir: str | Path, split: str) -> dict:
    """Read a split's metrics JSON written by write_split_reports."""
    return json.loads((Path(output_dir) / f"{split}_metrics.json").read_text())


def read_predictions(output_dir: str | Path, split: str) -> list[dict]:
    """Read a split's predictions CSV written by write_split_reports."""
    with (Path(output_dir) / f"{split}_predictions.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))
