"""The guard's fit: the Mahalanobis score on the training split, and the kind probe on real uploads' kinds.

The probe (`ham_hf.serve.ood.Probe`) needs what HAM10000 lacks: real non-dermoscopic images with
their kind (`--guard_negatives`: a folder with a `metadata.csv` of `file,category`, categories
everyday / skin_clinical / document / medical or a kind name) and dermoscopic images from other
sources (`--guard_positives`: a labelled folder, `metadata.csv` of `file,dx`). A seeded half of
each is fitted on (the first half by category or source, `ood.halves`); the figures recorded are on
the other half, so they say how the guard holds on images it has not seen. Without both folders
the guard is the Mahalanobis score alone, as before.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch

from ham_hf.errors import DataError
from ham_hf.finish.evaluation import embed
from ham_hf.serve import ood
from ham_hf.transforms import CachedImages, load_rgb, resize_square

logger = logging.getLogger(__name__)

# ood-dev's categories -> the probe's kinds.
CATEGORY_KINDS = {"everyday": "photo", "skin_clinical": "skin photo", "document": "document", "medical": "medical"}
FAR_KINDS = ("photo", "document", "medical")


def read_folder(folder: str | Path, column: str) -> tuple[list[Path], list[str]]:
    """(image paths, the `column` of each) from a folder's metadata.csv; a DataError naming the fix."""
    root = Path(folder)
    table = root / "metadata.csv"
    if not table.is_file():
        raise DataError(f"{root} has no metadata.csv (file,{column}): the guard's folders list their images there")
    rows = list(csv.DictReader(table.open()))
    if column == "category":  # a negative needs its kind; a positive is dermoscopic whatever its dx
        rows = [r for r in rows if (r.get(column) or "").strip()]
    paths = [next((c for c in (root / r["file"], root / "images" / r["file"]) if c.is_file()), None) for r in rows]
    found = [(p, r.get(column, "")) for p, r in zip(paths, rows) if p is not None]
    if not found:
        raise DataError(f"no images listed in {table} were found beside it: nothing to fit the guard on")
    return [p for p, _ in found], [v for _, v in found]


def source_of(path: Path) -> str:
    """The source an external image came from, by its file name's prefix (derm7pt_, ISIC_, ph2_)."""
    return path.name.split("_")[0].lower()


def decode(images, data_config) -> torch.Tensor:
    """Decoded uint8 squares (of paths or PIL images) at the model's eval resize, as the app decodes uploads."""
    return torch.stack([torch.from_numpy(resize_square(load_rgb(str(p) if isinstance(p, Path) else p,
                                                                data_config.resize),
                                                       data_config.resize, data_config.interpolation))
                        for p in images])


def colours(images: torch.Tensor) -> np.ndarray:
    """Colour statistics of decoded uint8 images."""
    return np.stack([ood.colour_stats(im.numpy()) for im in images])


def fit_guard(model, data_config, train: CachedImages, val: CachedImages, val_features: np.ndarray, bf16: bool,
              negatives: str | None = None, positives: str | None = None) -> tuple[ood.Guard, dict]:
    """The guard (with a kind probe when both folders are given) and its held-out figures."""
    def features(images):
        return embed(model, images, data_config, bf16=bf16)[0]

    train_features = features(train)
    guard = ood.Guard.fit(train_features, train.labels.numpy(), val_features)
    if not (negatives and positives):
        if negatives or positives:
            logger.warning("the kind probe needs both --guard_negatives and --guard_positives: Mahalanobis only")
        return guard, {}
    neg_paths, categories = read_folder(negatives, "category")
    pos_paths, sources = read_folder(positives, "dx")
    neg_images, pos_images = decode(neg_paths, data_config), decode(pos_paths, data_config)
    neg_f, pos_f = features(neg_images), features(pos_images)
    neg_c, pos_c = colours(neg_images), colours(pos_images)
    kinds = [CATEGORY_KINDS.get(c, c if c in ood.KINDS else "other") for c in categories]
    neg_fit, pos_fit = ood.halves(categories), ood.halves(source_of(p) for p in pos_paths)
    package = [im for _, im in ood.non_dermoscopic_images()]
    pack_images = decode(package, data_config)
    pack_f, pack_c = features(pack_images), colours(pack_images)
    val_c = colours(val.images)
    guard.probe = ood.Probe.fit(guard, np.r_[train_features, pos_f[pos_fit]],
                                np.r_[colours(train.images), pos_c[pos_fit]],
                                np.r_[pack_f, neg_f[neg_fit]], np.r_[pack_c, neg_c[neg_fit]],
                                ["other"] * len(package) + [k for k, f in zip(kinds, neg_fit) if f],
                                val_features, val_c, positives_fit=pos_f[pos_fit], positives_fit_colours=pos_c[pos_fit])
    inside = {name: guard.judge(f, c)[0] for name, (f, c) in
              {"val": (val_features, val_c), "neg": (neg_f, neg_c), "pos": (pos_f, pos_c)}.items()}
    kinds_arr = np.array(kinds)
    held = ~neg_fit
    figures = {
        "ood_probe_kinds": ", ".join(guard.probe.kinds), "ood_probe_min_dermoscopic": guard.probe.min_dermoscopic,
        "ood_heldout_far_flagged": float((~inside["neg"])[held & np.isin(kinds_arr, FAR_KINDS)].mean()),
        "ood_heldout_skin_photo_flagged": float((~inside["neg"])[held & (kinds_arr == "skin photo")].mean()),
        "ood_heldout_external_kept": float(inside["pos"][~pos_fit].mean()),
        "ood_heldout_n_negatives": int(held.sum()), "ood_heldout_n_external": int((~pos_fit).sum()),
        "ood_validation_kept": float(inside["val"].mean()),
    }
    logger.info("guard on held-out halves: far-OOD flagged %.1f%%, skin photos flagged %.1f%%, external dermoscopy "
                "kept %.1f%%, HAM10000 validation kept %.1f%%", 100 * figures["ood_heldout_far_flagged"],
                100 * figures["ood_heldout_skin_photo_flagged"], 100 * figures["ood_heldout_external_kept"],
                100 * figures["ood_validation_kept"])
    return guard, figures
