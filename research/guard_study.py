"""Which guard holds on real uploads? The saved guard against a probe fitted on half of the real sets.

    .venv/bin/python research/guard_study.py --model models/ham10000-resnet50 --data data/ham10000 \
        --ood ../shared/data/ood-dev --external ../shared/data/dermoscopy-external [--cache /tmp/guard-study.npz]

Features are the served model's pooled features (`Classifier`, as the app computes them) of: HAM10000
validation, a seeded sample of HAM10000 train, the package-shipped and generated non-dermoscopic
images (`ham_hf.serve.ood.non_dermoscopic_images`), `ood-dev` (by category) and `dermoscopy-external`.
`ood-dev` and `dermoscopy-external` are split in halves (seeded, by category / source): the probe is
fitted on one half and every figure printed is on the other (and on HAM10000 validation). Each
probe setting is fitted on `--seeds` halvings and its figures averaged, since one half of ~100
images moves a share by a point per image; the saved guard is read on the halves of seed 0, the
ones `ham-hf calibrate --guard_only` fits on.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ham_hf import data  # noqa: E402
from ham_hf.finish.guard import CATEGORY_KINDS, source_of  # noqa: E402
from ham_hf.serve import ood  # noqa: E402
from ham_hf.serve.classifier import Classifier  # noqa: E402
from ham_hf.serve.ood import Probe, colour_stats  # noqa: E402

FAR = ("everyday", "document", "medical")


def embed(clf: Classifier, images: list) -> tuple[np.ndarray, np.ndarray]:
    """(features, colour statistics) of images (paths, bytes or PIL) as the app computes them."""
    feats, colours = [], []
    for start in range(0, len(images), 16):
        decoded = [clf.decode(im) for im in images[start:start + 16]]
        x = clf.preprocess(torch.stack(decoded), train=False)
        feats.append(clf.forward(x)[1])
        colours += [colour_stats(d.numpy()) for d in decoded]
    return np.concatenate(feats), np.asarray(colours)


def collect(args) -> dict:
    """Every set's features, colour statistics and groups (cached in args.cache)."""
    if args.cache and Path(args.cache).is_file():
        return dict(np.load(args.cache, allow_pickle=False))
    clf = Classifier(args.model)
    dsd = data.load_splits(args.data)
    train = dsd["train"].shuffle(seed=0).select(range(min(args.train_sample, len(dsd["train"]))))
    ood_rows = list(csv.DictReader(open(Path(args.ood) / "metadata.csv")))
    ext_rows = list(csv.DictReader(open(Path(args.external) / "metadata.csv")))
    package = [im for _, im in ood.non_dermoscopic_images()]
    out = {}
    for name, images in (("val", [r["image"]["bytes"] for r in dsd["validation"].cast_column("image", _raw())]),
                         ("train", [r["image"]["bytes"] for r in train.cast_column("image", _raw())]),
                         ("package", package),
                         ("ood", [str(Path(args.ood) / r["file"]) for r in ood_rows]),
                         ("ext", [str(Path(args.external) / r["file"]) for r in ext_rows])):
        out[f"{name}_f"], out[f"{name}_c"] = embed(clf, images)
    out["ood_group"] = np.array([r["category"] for r in ood_rows])
    out["ext_group"] = np.array([source_of(Path(r["file"])) for r in ext_rows])
    out["guard_threshold"] = np.array(clf.guard.threshold)
    if args.cache:
        np.savez(args.cache, **out)
    return out


def _raw():
    """The image column undecoded (bytes), so the study decodes as the app does."""
    import datasets

    return datasets.Image(decode=False)


def held_out(flagged: dict, d: dict, ood_fit, ext_fit) -> dict:
    """The four goals' figures on the halves not fitted on (and HAM10000 validation)."""
    groups = d["ood_group"]
    return {"far flagged": flagged["ood"][~ood_fit & np.isin(groups, FAR)].mean(),
            "skin flagged": flagged["ood"][~ood_fit & (groups == "skin_clinical")].mean(),
            "val kept": 1 - flagged["val"].mean(), "external kept": 1 - flagged["ext"][~ext_fit].mean()}


def fit_probe(guard, d: dict, ood_fit, ext_fit, **options) -> Probe:
    """A probe fitted as `ham-hf calibrate --guard_only` fits it, on the given halves."""
    neg_f = np.r_[d["package_f"], d["ood_f"][ood_fit]]
    neg_c = np.r_[d["package_c"], d["ood_c"][ood_fit]]
    neg_k = ["other"] * len(d["package_f"]) + [CATEGORY_KINDS[g] for g in d["ood_group"][ood_fit]]
    pos_f = np.r_[d["train_f"], d["ext_f"][ext_fit]]
    pos_c = np.r_[d["train_c"], d["ext_c"][ext_fit]]
    return Probe.fit(guard, pos_f, pos_c, neg_f, neg_c, neg_k, d["val_f"], d["val_c"],
                     positives_fit=d["ext_f"][ext_fit], positives_fit_colours=d["ext_c"][ext_fit], **options)


def repeated(guard, d: dict, seeds: int, strength: float, margins) -> dict[float, dict[str, list[float]]]:
    """Held-out figures of the probe (with the backstop and greyscale rule) over seeded halvings, per floor margin."""
    rows: dict[float, list[dict]] = {m: [] for m in margins}
    for seed in range(seeds):
        ood_fit, ext_fit = ood.halves(d["ood_group"], seed), ood.halves(d["ext_group"], seed)
        guard.probe = fit_probe(guard, d, ood_fit, ext_fit, strength=strength, margin=1.0)
        floor = guard.probe.min_dermoscopic
        for m in margins:  # the margin scales the floor only: one fit serves them all
            guard.probe.min_dermoscopic = m * floor
            flagged = {k: ~guard.judge(d[f"{k}_f"], d[f"{k}_c"])[0] for k in ("val", "ood", "ext")}
            rows[m].append(held_out(flagged, d, ood_fit, ext_fit))
    guard.probe = None
    return {m: {k: [r[k] for r in rs] for k in rs[0]} for m, rs in rows.items()}


def show(name: str, figures: dict[str, list[float]]) -> None:
    """One line: the mean (and the worst seed) of each figure."""
    cells = [f"{k} {np.mean(v):.1%}" + (f" (worst {min(v):.1%})" if len(v) > 1 else "") for k, v in figures.items()]
    print(f"{name:34s} " + "; ".join(cells))


def main() -> None:
    """Collect features, fit on halves, report on the rest."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--ood", required=True)
    p.add_argument("--external", required=True)
    p.add_argument("--train-sample", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=10, help="seeded halvings to average the held-out figures over")
    p.add_argument("--cache", default=None)
    args = p.parse_args()
    d = collect(args)
    d["ext_group"] = np.char.lower(d["ext_group"].astype(str))
    saved = ood.Guard.load(ood.guard_path(args.model))
    fits = ood.halves(d["ood_group"]), ood.halves(d["ext_group"])
    flagged = {k: ~saved.judge(d[f"{k}_f"], d[f"{k}_c"])[0] for k in ("val", "ood", "ext")}
    show("saved guard (halves of seed 0)", {k: [v] for k, v in held_out(flagged, d, *fits).items()})
    maha = ood.Guard(saved.mean, saved.components, saved.centres, saved.precision, saved.threshold)
    flagged = {k: ~maha.in_distribution(maha.score(d[f"{k}_f"])) for k in ("val", "ood", "ext")}
    show("Mahalanobis alone", {k: [v] for k, v in held_out(flagged, d, *fits).items()})
    for c in (0.01, ood.PROBE_C, 0.1):
        for margin, figures in repeated(maha, d, args.seeds, c, (1.0, 0.5, 0.3, ood.PROBE_MARGIN)).items():
            show(f"probe C={c:g}, floor x{margin:g}", figures)


if __name__ == "__main__":
    main()
