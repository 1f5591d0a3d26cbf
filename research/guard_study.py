"""Which guard holds on real uploads? The saved guard against a probe fitted on half of the real sets.

    .venv/bin/python research/guard_study.py --model models/ham10000-resnet50 --data data/ham10000 \
        --ood ../shared/data/ood-dev --external ../shared/data/dermoscopy-external [--cache /tmp/guard-study.npz]

Features are the served model's pooled features (`Classifier`, as the app computes them) of: HAM10000
validation, a seeded sample of HAM10000 train, the package-shipped and generated non-dermoscopic
images (`ham_hf.serve.ood.non_dermoscopic_images`), `ood-dev` (by category) and `dermoscopy-external`.
`ood-dev` and `dermoscopy-external` are split in halves (seeded, by category / source): the probe is
fitted on one half and every figure printed is on the other (and on HAM10000 validation).
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
from ham_hf.finish.guard import source_of  # noqa: E402
from ham_hf.serve import ood  # noqa: E402
from ham_hf.serve.classifier import Classifier  # noqa: E402
from ham_hf.serve.ood import KINDS, Probe, colour_stats  # noqa: E402

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


def report(name: str, flagged, d) -> None:
    """Print one guard's held-out figures."""
    fo, fe = d["ood_fit"], d["ext_fit"]
    groups = d["ood_group"]
    cells = [f"{g} {flagged['ood'][~fo & (groups == g)].mean():.0%}" for g in (*FAR, "skin_clinical")]
    far = flagged["ood"][~fo & np.isin(groups, FAR)].mean()
    print(f"{name:28s} far-OOD flagged {far:.1%} ({', '.join(cells)}); HAM val kept "
          f"{1 - flagged['val'].mean():.1%}; external kept {1 - flagged['ext'][~fe].mean():.1%}")


def main() -> None:
    """Collect features, fit on the halves, report on the rest."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--ood", required=True)
    p.add_argument("--external", required=True)
    p.add_argument("--train-sample", type=int, default=2000)
    p.add_argument("--cache", default=None)
    args = p.parse_args()
    d = collect(args)
    d["ext_group"] = np.char.lower(d["ext_group"].astype(str))
    d["ood_fit"], d["ext_fit"] = ood.halves(d["ood_group"]), ood.halves(d["ext_group"])
    guard = ood.Guard.load(ood.guard_path(args.model))
    maha = {k: guard.score(d[f"{k}_f"]) > guard.threshold for k in ("val", "ood", "ext")}
    report("saved Mahalanobis guard", maha, d)
    kinds = {"everyday": "photo", "document": "document", "medical": "medical", "skin_clinical": "skin photo"}
    neg_f = np.r_[d["package_f"], d["ood_f"][d["ood_fit"]]]
    neg_c = np.r_[d["package_c"], d["ood_c"][d["ood_fit"]]]
    neg_k = ["other"] * len(d["package_f"]) + [kinds[g] for g in d["ood_group"][d["ood_fit"]]]
    pos_f = np.r_[d["train_f"], d["ext_f"][d["ext_fit"]]]
    pos_c = np.r_[d["train_c"], d["ext_c"][d["ext_fit"]]]
    for c in (0.01, 0.1, 1.0):
        probe = Probe.fit(guard, pos_f, pos_c, neg_f, neg_c, neg_k, d["val_f"], d["val_c"], strength=c)
        flagged = {k: ~probe.accepts(guard, d[f"{k}_f"], d[f"{k}_c"]) for k in ("val", "ood", "ext")}
        report(f"probe C={c:g} (kinds {len(KINDS)})", flagged, d)
        both = {k: flagged[k] | maha[k] for k in flagged}
        report(f"probe C={c:g} or Mahalanobis", both, d)


if __name__ == "__main__":
    main()
