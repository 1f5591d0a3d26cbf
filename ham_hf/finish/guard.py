"""The guard's fit: the Mahalanobis score on the training split, and the kind probe judged source by source.

What serving needs (load, score, judge) is `ham_hf.serve.guard`; fitting and reporting it is here.
The Mahalanobis score is fitted on the training split's features (`fit_mahalanobis`). The probe
(`ham_hf.serve.guard.Probe`, `fit_probe`) needs what HAM10000 lacks: real non-dermoscopic images with
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
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ham_hf.errors import DataError
from ham_hf.finish.evaluation import embed
from ham_hf.serve import guard as guard_lib
from ham_hf.transforms import CachedImages, decode_images

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

# ood-dev's categories -> the probe's kinds.
CATEGORY_KINDS = {"everyday": "photo", "skin_clinical": "skin photo", "document": "document", "medical": "medical"}
FAR_KINDS = ("photo", "document", "medical", "other")
HOME = "HAM10000"  # the source of the training images
GENERATED = "generated"  # the source of the package's own non-dermoscopic images
# HAM10000 training images the probe is fitted with: enough to stand for the home source, few enough
# that the leave-one-source-out fits take a minute or two on a CPU.
PROBE_HOME_SAMPLE = 1000
# The Mahalanobis score: the PCA subspace it is measured in, and how far beyond validation's
# KEEP_QUANTILE its threshold sits, so that lesion images from other clinics and cameras, which sit a
# little further out than HAM10000's own, still pass.
PCA_DIMS = 384
MARGIN = 1.25
# The probe's regularisation (inverse strength), chosen by leave-one-source-out (research/README.md).
PROBE_C = 0.03
# The floor gives up at most this share of a dermatoscope the probe never saw, as measured by fitting
# without each fitted source of other dermoscopy in turn (research/README.md, "A guard judged by source").
PROBE_QUANTILE = 0.2


def fit_mahalanobis(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
                    dims: int = PCA_DIMS, keep_quantile: float = guard_lib.KEEP_QUANTILE,
                    margin: float = MARGIN) -> guard_lib.Guard:
    """Fit the subspace, class centres and covariance on train; set the threshold on validation."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(train_features, dtype=np.float64)
    labels = np.asarray(train_labels)
    mean = x.mean(axis=0)
    dims = min(dims, x.shape[0] - 1, x.shape[1])
    components = np.linalg.svd(x - mean, full_matrices=False)[2][:dims]
    z = (x - mean) @ components.T
    classes = np.unique(labels)
    centres = np.stack([z[labels == c].mean(axis=0) for c in classes])
    residual = z - centres[np.searchsorted(classes, labels)]
    precision = LedoitWolf(assume_centered=True).fit(residual).precision_
    guard = guard_lib.Guard(mean.astype(np.float32), components.astype(np.float32), centres.astype(np.float32),
                            precision.astype(np.float32), threshold=float("inf"), keep_quantile=keep_quantile)
    guard.threshold = float(np.quantile(guard.score(val_features), keep_quantile) * margin)
    return guard


def source_weights(labels: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Sample weights under which every source weighs alike within its class, and the two classes alike."""
    labels, sources = np.asarray(labels), np.asarray(sources)
    _, index, counts = np.unique(sources, return_inverse=True, return_counts=True)
    w = 1.0 / counts[index]
    for c in np.unique(labels):
        w[labels == c] /= w[labels == c].sum()
    return w * len(w) / len(np.unique(labels))


def fit_probe(texture, colours, kinds, sources, val_texture, val_colours, strength: float = PROBE_C,
              quantile: float = PROBE_QUANTILE, keep: float = guard_lib.KEEP_QUANTILE, home: str | None = None,
              name_kinds: bool = True) -> guard_lib.Probe:
    """Fit on labelled images: `kinds` ("dermoscopic" or a KINDS name) and `sources`, one per image.

    Without `name_kinds` the kind model is left out (every flagged image is "other"): what a
    leave-one-source-out fit needs, at a fraction of the time.

    The floor is the lowest of: the P(dermoscopic) that keeps `keep` of validation, and for each
    fitted source of dermoscopy but `home` (the training set's), the `quantile` of P(dermoscopic)
    that a fit without that source gives its images: how far out a dermatoscope it never saw sits.
    """
    from sklearn.linear_model import LogisticRegression

    x = guard_lib.Probe.inputs(texture, colours)
    offset, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    z, kinds, sources = (x - offset) / scale, np.asarray(kinds), np.asarray(sources)
    positive = kinds == "dermoscopic"

    def dermoscopy(rows) -> LogisticRegression:
        w = source_weights(positive[rows], sources[rows])
        return LogisticRegression(C=strength, max_iter=3000).fit(z[rows], positive[rows], sample_weight=w)

    main = dermoscopy(np.ones(len(z), dtype=bool))
    named = tuple(k for k in guard_lib.KINDS[1:] if k in set(kinds[~positive]))
    if len(named) == 1 or not name_kinds:  # one kind of negative: every flagged image is said to be that
        named = named if name_kinds else ("other",)
        kind_weight, kind_bias = np.zeros((1, z.shape[1])), np.zeros(1)
    else:
        kind_model = LogisticRegression(C=strength, class_weight="balanced", max_iter=3000)
        kind_model.fit(z[~positive], [named.index(k) for k in kinds[~positive]])
        kind_weight, kind_bias = kind_model.coef_, kind_model.intercept_
    if len(named) == 2:  # scikit-learn gives one row for two classes: the second's logit against the first
        kind_weight, kind_bias = np.r_[-kind_weight, kind_weight] / 2, np.r_[-kind_bias, kind_bias] / 2
    probe = guard_lib.Probe(main.coef_[0].astype(np.float32), main.intercept_.astype(np.float32),
                kind_weight.astype(np.float32), kind_bias.astype(np.float32), scale.astype(np.float32),
                offset.astype(np.float32), named, 0.0)
    floors = [float(np.quantile(probe.dermoscopic(val_texture, val_colours), 1 - keep))]
    for source in sorted(set(sources[positive]) - {home}):
        held = sources == source
        without = dermoscopy(~held)
        floors.append(float(np.quantile(without.predict_proba(z[held])[:, 1], quantile)))
    probe.min_dermoscopic = min(floors)
    return probe


def evaluate_guard(guard: guard_lib.Guard, features_of, data_config, val_features: np.ndarray,
                   output_dir: Path | None = None, colours_of=None) -> dict:
    """AUROC and share flagged on the package's non-dermoscopic images; share of validation lesions kept.

    `features_of` maps a (N, H, W, 3) uint8 tensor of decoded images to their ((N, D) features,
    (N, T) texture statistics); `colours_of` to their colour statistics, for a guard with a kind probe.
    """
    from sklearn.metrics import roc_auc_score

    names, images = zip(*non_dermoscopic_images())
    cached = decode_images(list(images), data_config)
    outside_features, outside_texture = features_of(cached)
    outside = guard.score(outside_features)
    inside = guard.score(val_features)
    truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    figures = {"threshold": guard.threshold, "keep_quantile": guard.keep_quantile,
               "validation_kept": float(guard.in_distribution(inside).mean()),
               "auroc": float(roc_auc_score(truth, np.r_[inside, outside])),
               "n_images": len(outside)}
    flagged = ~guard.in_distribution(outside)
    if guard.probe is not None and colours_of is not None:
        flagged = ~guard.judge(outside_features, colours_of(cached), outside, outside_texture)[0]
        figures.pop("validation_kept")  # the caller's, with colours: the probe decides too
    figures["flagged"] = float(flagged.mean())
    if output_dir is not None:  # each image's verdict as served (the probe's too), beside its score
        per_image = {n: {"score": round(float(s), 2), "flagged": bool(f)}
                     for n, s, f in zip(names, outside, flagged)}
        (Path(output_dir) / "ood_images.json").write_text(json.dumps(per_image, indent=1) + "\n")
    logger.info("OOD guard: non-dermoscopic package images AUROC %.4f, %.1f%% flagged", figures["auroc"],
                100 * figures["flagged"])
    return figures


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


def served_inputs(clf, images, batch_size: int = 32) -> dict[str, np.ndarray]:
    """The guard's inputs (features, texture, colours) of images (paths, bytes or PIL), as a Classifier serves."""
    out: dict[str, list] = {"features": [], "texture": [], "colours": []}
    for start in range(0, len(images), batch_size):
        decoded = torch.stack([clf.decode(im) for im in images[start:start + batch_size]])
        outs = clf.forward(clf.pixels(decoded))
        out["features"].append(outs.features)
        out["texture"].append(outs.texture)
        out["colours"].append(guard_lib.colour_stats(decoded.numpy()))
    return {k: np.concatenate(v) for k, v in out.items()}


def by_source(guard: guard_lib.Guard, rows: dict, val: tuple, **options) -> dict:
    """Leave-one-source-out: for each source but the home one, fit the probe without it and read it there.

    `rows`: features, texture, colours, kinds and sources of every image the probe is fitted on;
    `val`: HAM10000 validation's (features, texture, colours), read with the probe fitted on everything.
    Returns {source: {"kind", "n", "share"}}: the share flagged of a non-dermoscopic source, kept of a
    dermoscopic one, through the guard's whole verdict (probe, Mahalanobis backstop, greyscale rule).
    `options` go to `fit_probe` (strength, quantile).
    """
    kinds, sources = np.asarray(rows["kinds"]), np.asarray(rows["sources"])
    figures = {}
    for source in sorted(set(sources) - {HOME, GENERATED}):
        held = sources == source
        guard.probe = fit_probe(rows["texture"][~held], rows["colours"][~held], kinds[~held], sources[~held],
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
              negatives=None, positives=None, val_texture: np.ndarray | None = None) -> tuple[guard_lib.Guard, dict]:
    """The guard (with a kind probe when both kinds of folder are given) and its leave-one-source-out figures.

    `val_texture`: validation's texture statistics when the caller has them (else computed here).
    """
    def embedded(images) -> tuple[np.ndarray, np.ndarray]:
        features, _, texture = embed(model, images, data_config, bf16=bf16, texture=True)
        return features, texture

    train_features = embed(model, train, data_config, bf16=bf16)[0]
    guard = fit_mahalanobis(train_features, train.labels.numpy(), val_features)
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
    package = decode_images([im for _, im in non_dermoscopic_images()], data_config)
    images = torch.cat([home, decode_images(pos_paths, data_config), package, decode_images(neg_paths, data_config)])
    features, texture = embedded(images)
    kinds = (["dermoscopic"] * (len(home) + len(pos_paths)) + ["other"] * len(package)
             + [CATEGORY_KINDS.get(c, c if c in guard_lib.KINDS[1:] else "other") for c in categories])
    sources = [HOME] * len(home) + pos_sources + [GENERATED] * len(package) + neg_sources
    rows = {"features": features, "texture": texture, "colours": guard_lib.colour_stats(images.numpy()), "kinds": kinds,
            "sources": sources}
    val_texture = embedded(val)[1] if val_texture is None else val_texture
    val_colours = guard_lib.colour_stats(val.images.numpy())
    figures = by_source(guard, rows, (val_features, val_texture, val_colours))
    guard.probe = fit_probe(texture, rows["colours"], kinds, sources, val_texture, val_colours, home=HOME)
    kept = float(guard.judge(val_features, val_colours, texture=val_texture)[0].mean())
    results = {"probe_kinds": ", ".join(guard.probe.kinds), "guard_version": guard_lib.VERSION,
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


# ----------------------------------------------------------------------------- non-dermoscopic images


SKIMAGE_SAMPLES = ("astronaut", "binary_blobs", "brick", "camera", "cat", "cell", "checkerboard", "clock", "coffee",
                   "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry",
                   "logo", "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale any numeric image array to uint8."""
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    return (255 * (a - a.min()) / max(a.max() - a.min(), 1e-9)).astype(np.uint8)


def generated_images(seed: int = 0) -> list[tuple[str, "Image.Image"]]:
    """Solid colours (skin tones too), noise, gradients, rendered text and charts: inputs a lesion model never saw."""
    from matplotlib.figure import Figure
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for rgb in ((0, 0, 255), (255, 0, 0), (0, 255, 0), (255, 255, 255), (0, 0, 0), (128, 128, 128), (230, 180, 160),
                (200, 120, 100), (120, 80, 60)):
        out.append((f"solid-{rgb[0]}-{rgb[1]}-{rgb[2]}", Image.new("RGB", (320, 240), rgb)))
    for i in range(4):
        out.append((f"noise-{i}", Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))))
    for i in range(4):
        ramp = (np.linspace(0, 1, 320)[None, :, None] * rng.random(3)
                + np.linspace(0, 1, 240)[:, None, None] * rng.random(3))
        out.append((f"gradient-{i}", Image.fromarray((255 * ramp / ramp.max()).astype(np.uint8))))
    for i, kind in enumerate(("line", "bar", "text", "scatter", "pie", "table")):
        fig = Figure(figsize=(4, 3))
        ax = fig.subplots()
        if kind == "line":
            ax.plot(rng.random(30).cumsum())
        elif kind == "bar":
            ax.bar(range(6), rng.random(6))
        elif kind == "scatter":
            ax.scatter(rng.random(50), rng.random(50))
        elif kind == "pie":
            ax.pie(rng.random(4) + 0.1)
        else:
            ax.axis("off")
            ax.text(0.02, 0.5, "Quarterly report\nRevenue grew 12%\nSee appendix B" if kind == "text"
                    else "id | name | value\n1  | alpha | 0.3\n2  | beta  | 0.7", fontsize=13, family="monospace")
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        out.append((f"chart-{kind}", Image.open(buf).convert("RGB")))
    return out


def non_dermoscopic_images() -> list[tuple[str, "Image.Image"]]:
    """scikit-image's and scikit-learn's bundled sample images plus generated ones (each skipped if absent)."""
    from PIL import Image

    out = []
    try:
        import skimage.data

        for name in SKIMAGE_SAMPLES:
            try:
                out.append((f"skimage-{name}", Image.fromarray(_to_uint8(getattr(skimage.data, name)()))))
            except Exception as exc:  # a sample that needs a download: skip it offline
                logger.debug("skimage sample %s unavailable: %s", name, exc)
    except ImportError:
        logger.info("scikit-image is not installed: its sample images are left out of the OOD figures")
    from sklearn.datasets import load_sample_images

    out += [(f"sklearn-{i}", Image.fromarray(a)) for i, a in enumerate(load_sample_images().images)]
    return out + generated_images()
