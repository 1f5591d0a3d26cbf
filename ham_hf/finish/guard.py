"""The guard's fit: the Mahalanobis score on the training split, and the kind probe judged source by source.

The probe (`ham_hf.serve.ood.Probe`) needs what HAM10000 lacks: real non-dermoscopic images with
their kind (`--guard_negatives`: folders with a `metadata.csv` of `file,category`, categories
everyday / skin_clinical / document / medical or a kind name) and dermoscopic images from other
sources (`--guard_positives`: labelled folders, `metadata.csv` of `file,dx`). Every image has a
source (`source_of`). The probe is fitted on everything; its figures are leave-one-source-out: for
each source in turn, the probe is fitted again without it and read on it, so they say how the guard
holds on a camera, clinic or archive it never saw. Without both kinds of folder the guard is the
Mahalanobis score alone.
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
FAR_KINDS = ("photo", "document", "medical", "other")
HOME = "HAM10000"  # the source of the training images
GENERATED = "generated"  # the source of the package's own non-dermoscopic images
# HAM10000 training images the probe is fitted with: enough to stand for the home source, few enough
# that the leave-one-source-out fits take a minute or two on a CPU.
PROBE_HOME_SAMPLE = 1000


def source_of(row: dict, path: Path) -> str:
    """Which camera, clinic or archive an image came from.

    The `source` column; else `source_dataset` (up to its first " ("); else `source_repo`, with a data
    folder inside it (`data/<name>/...`) as a source of its own; else the file name's prefix (derm7pt_, ph2_).
    """
    if (row.get("source") or "").strip():
        return row["source"].strip()
    if (row.get("source_dataset") or "").strip():
        return row["source_dataset"].split(" (")[0].strip()
    repo = (row.get("source_repo") or "").strip()
    if repo:
        parts = (row.get("source_path") or "").split("/")
        inner = parts.index("data") + 1 if "data" in parts[:-2] else None
        return f"{repo}/{parts[inner]}" if inner is not None else repo
    return path.name.split("_")[0].lower()


def read_folder(folder: str | Path, column: str) -> tuple[list[Path], list[str], list[str]]:
    """(image paths, the `column` of each, their sources) from a folder's metadata.csv; a DataError naming the fix."""
    root = Path(folder)
    table = root / "metadata.csv"
    if not table.is_file():
        raise DataError(f"{root} has no metadata.csv (file,{column}): the guard's folders list their images there")
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if column == "category":  # a negative needs its kind; a positive is dermoscopic whatever its dx
        rows = [r for r in rows if (r.get(column) or "").strip()]
    if not rows:
        raise DataError(f"{table} lists no images{' with a category' if column == 'category' else ''}: "
                        "nothing to fit the guard on")
    paths = []
    for line, r in enumerate(rows, start=2):
        path = next((c for c in (root / r.get("file", ""), root / "images" / r.get("file", "")) if c.is_file()), None)
        if path is None or not r.get("file"):
            raise DataError(f"{table}, row {line}: {r.get('file')!r} is not there; add the file or delete its row")
        paths.append(path)
    return paths, [r.get(column, "") for r in rows], [source_of(r, p) for r, p in zip(rows, paths)]


def read_folders(folders, column: str) -> tuple[list[Path], list[str], list[str]]:
    """read_folder over several folders, concatenated."""
    out: tuple[list, list, list] = ([], [], [])
    for folder in folders:
        for whole, part in zip(out, read_folder(folder, column)):
            whole.extend(part)
    return out


def decode(images, data_config) -> torch.Tensor:
    """Decoded uint8 squares (of paths or PIL images) at the model's eval resize, as the app decodes uploads."""
    return torch.stack([torch.from_numpy(resize_square(load_rgb(str(p) if isinstance(p, Path) else p,
                                                                data_config.resize),
                                                       data_config.resize, data_config.interpolation))
                        for p in images])


def colours(images: torch.Tensor) -> np.ndarray:
    """Colour statistics of decoded uint8 images."""
    return np.stack([ood.colour_stats(im.numpy()) for im in images])


def served_inputs(clf, images, batch_size: int = 32) -> dict[str, np.ndarray]:
    """The guard's inputs (features, texture, colours) of images (paths, bytes or PIL), as a Classifier serves."""
    out: dict[str, list] = {"features": [], "texture": [], "colours": []}
    for start in range(0, len(images), batch_size):
        decoded = [clf.decode(im) for im in images[start:start + batch_size]]
        outs = clf.forward(clf.preprocess(torch.stack(decoded), train=False))
        out["features"].append(outs.features)
        out["texture"].append(outs.texture)
        out["colours"].append(colours(decoded))
    return {k: np.concatenate(v) for k, v in out.items()}


def by_source(guard: ood.Guard, rows: dict, val: tuple, **options) -> dict:
    """Leave-one-source-out: for each source but the home one, fit the probe without it and read it there.

    `rows`: features, texture, colours, kinds and sources of every image the probe is fitted on;
    `val`: HAM10000 validation's (features, texture, colours), read with the probe fitted on everything.
    Returns {source: {"kind", "n", "share"}}: the share flagged of a non-dermoscopic source, kept of a
    dermoscopic one, through the guard's whole verdict (probe, Mahalanobis backstop, greyscale rule).
    `options` go to `Probe.fit` (strength, quantile).
    """
    kinds, sources = np.asarray(rows["kinds"]), np.asarray(rows["sources"])
    figures = {}
    for source in sorted(set(sources) - {HOME, GENERATED}):
        held = sources == source
        guard.probe = ood.Probe.fit(rows["texture"][~held], rows["colours"][~held], kinds[~held], sources[~held],
                                    val[1], val[2], home=HOME, name_kinds=False, **options)
        inside = guard.judge(rows["features"][held], rows["colours"][held], texture=rows["texture"][held])[0]
        names, counts = np.unique(kinds[held], return_counts=True)
        kind = str(names[counts.argmax()])  # a source's kind: most of its images
        figures[source] = {"kind": kind, "n": int(held.sum()),
                           "share": float(inside.mean() if kind == "dermoscopic" else 1 - inside.mean())}
    guard.probe = None
    return figures


def summary(figures: dict, validation_kept: float) -> dict:
    """The figures that count: the worst and the mean held-out source of each group."""
    groups = {"skin_photo_flagged": [v["share"] for v in figures.values() if v["kind"] == "skin photo"],
              "far_flagged": [v["share"] for v in figures.values() if v["kind"] in FAR_KINDS],
              "external_kept": [v["share"] for v in figures.values() if v["kind"] == "dermoscopic"]}
    out = {"validation_kept": validation_kept}
    for name, shares in groups.items():
        if shares:
            out.update({f"loso_{name}_worst": float(min(shares)), f"loso_{name}_mean": float(np.mean(shares)),
                        f"loso_{name}_sources": len(shares)})
    return out


def fit_guard(model, data_config, train: CachedImages, val: CachedImages, val_features: np.ndarray, bf16: bool,
              negatives=None, positives=None, val_texture: np.ndarray | None = None) -> tuple[ood.Guard, dict]:
    """The guard (with a kind probe when both kinds of folder are given) and its leave-one-source-out figures.

    `val_texture`: validation's texture statistics when the caller has them (else computed here).
    """
    def embedded(images) -> tuple[np.ndarray, np.ndarray]:
        features, _, texture = embed(model, images, data_config, bf16=bf16, texture=True)
        return features, texture

    train_features = embed(model, train, data_config, bf16=bf16)[0]
    guard = ood.Guard.fit(train_features, train.labels.numpy(), val_features)
    negatives, positives = _folders(negatives), _folders(positives)
    if not (negatives and positives):
        if negatives or positives:
            logger.warning("the kind probe needs both --guard_negatives and --guard_positives: Mahalanobis only")
        return guard, {}
    neg_paths, categories, neg_sources = read_folders(negatives, "category")
    if len(set(neg_sources)) < 2:
        raise DataError(f"the guard's negatives ({', '.join(map(str, negatives))}) come from one source "
                        f"({neg_sources[0]}): judging by source needs two or more to leave out in turn; add a "
                        "folder, or a `source` column naming where each image came from")
    pos_paths, _, pos_sources = read_folders(positives, "dx")
    home = train.images[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:PROBE_HOME_SAMPLE]]
    package = decode([im for _, im in ood.non_dermoscopic_images()], data_config)
    images = torch.cat([home, decode(pos_paths, data_config), package, decode(neg_paths, data_config)])
    features, texture = embedded(images)
    kinds = (["dermoscopic"] * (len(home) + len(pos_paths)) + ["other"] * len(package)
             + [CATEGORY_KINDS.get(c, c if c in ood.KINDS[1:] else "other") for c in categories])
    sources = [HOME] * len(home) + pos_sources + [GENERATED] * len(package) + neg_sources
    rows = {"features": features, "texture": texture, "colours": colours(images), "kinds": kinds, "sources": sources}
    val_texture = embedded(val)[1] if val_texture is None else val_texture
    val_colours = colours(val.images)
    figures = by_source(guard, rows, (val_features, val_texture, val_colours))
    guard.probe = ood.Probe.fit(texture, rows["colours"], kinds, sources, val_texture, val_colours, home=HOME)
    kept = float(guard.judge(val_features, val_colours, texture=val_texture)[0].mean())
    results = {"probe_kinds": ", ".join(guard.probe.kinds), "guard_version": ood.VERSION,
               "probe_min_dermoscopic": guard.probe.min_dermoscopic, **summary(figures, kept),
               "by_source": figures}
    logger.info("guard, leave-one-source-out: skin photos flagged %.1f%% worst / %.1f%% mean, far-OOD flagged %.1f%% "
                "worst, other dermoscopy kept %.1f%% worst; HAM10000 validation kept %.1f%%",
                100 * results.get("loso_skin_photo_flagged_worst", float("nan")),
                100 * results.get("loso_skin_photo_flagged_mean", float("nan")),
                100 * results.get("loso_far_flagged_worst", float("nan")),
                100 * results.get("loso_external_kept_worst", float("nan")), 100 * kept)
    return guard, results


def _folders(value) -> list[str]:
    """One folder or several (a list, or one string of comma-separated folders)."""
    if not value:
        return []
    items = [value] if isinstance(value, (str, Path)) else list(value)
    return [f.strip() for item in items for f in str(item).split(",") if f.strip()]
