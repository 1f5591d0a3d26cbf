"""Does the guard hold on sources it never saw? Leave-one-source-out through the served (int8) path.

    .venv/bin/python research/guard_study.py --model models/ham10000-resnet50 --data data/ham10000 \
        --negatives "$DEV/ood-dev,$DEV/skin-photos" --positives "$DEV/dermoscopy-external" \
        [--cache /tmp/guard-study.npz] [--quantiles 0.05,0.1,0.2] [--strengths 0.1]

Features, texture statistics and colour statistics are computed by `Classifier`, as the app computes
them (int8 ONNX where the model passed its gate), for: a seeded sample of HAM10000 train (the home
source), HAM10000 validation, the package's generated images, and every image of the guard's folders,
each with its source (`ham_hf.finish.guard.source_of`). For each probe setting, `by_source` fits the
probe without each source in turn and reads it there, exactly as `ham-hf calibrate` reports it;
printed: the worst and mean held-out source of each group, and each source's share.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ham_hf import data  # noqa: E402
from ham_hf.finish import guard as guard_fit  # noqa: E402
from ham_hf.serve import guard as guard_lib  # noqa: E402
from ham_hf.serve.classifier import Classifier  # noqa: E402


def collect(args) -> dict:
    """Every image's features, texture, colours, kind and source, and HAM10000 validation's (cached in args.cache)."""
    if args.cache and Path(args.cache).is_file():
        return dict(np.load(args.cache, allow_pickle=False))
    import datasets

    clf = Classifier(args.model)
    raw = datasets.Image(decode=False)  # bytes, so the study decodes as the app does
    dsd = data.load_splits(args.data)
    home = dsd["train"].shuffle(seed=0).select(range(min(guard_fit.PROBE_HOME_SAMPLE, len(dsd["train"]))))
    neg_paths, categories, neg_sources = guard_fit.read_folders(guard_fit._folders(args.negatives), "category")
    pos_paths, _, pos_sources = guard_fit.read_folders(guard_fit._folders(args.positives), "dx")
    package = [im for _, im in guard_fit.non_dermoscopic_images()]
    images = ([r["image"]["bytes"] for r in home.cast_column("image", raw)] + [str(p) for p in pos_paths] + package
              + [str(p) for p in neg_paths])
    out = guard_fit.served_inputs(clf, images)
    out["kinds"] = np.array(["dermoscopic"] * (len(home) + len(pos_paths)) + ["other"] * len(package)
                            + [guard_fit.CATEGORY_KINDS.get(c, c) for c in categories])
    out["sources"] = np.array([guard_fit.HOME] * len(home) + pos_sources + [guard_fit.GENERATED] * len(package)
                              + neg_sources)
    validation = [r["image"]["bytes"] for r in dsd["validation"].cast_column("image", raw)]
    out.update({f"val_{k}": v for k, v in guard_fit.served_inputs(clf, validation).items()})
    out["backend"] = np.array(clf.backend)
    if args.cache:
        np.savez(args.cache, **out)
    return out


def mahalanobis(model: str) -> guard_lib.Guard:
    """The model's Mahalanobis score and threshold, whatever version its guard file is."""
    from safetensors import safe_open

    with safe_open(str(guard_lib.guard_path(model)), "np") as fh:
        meta, arrays = fh.metadata(), {k: fh.get_tensor(k) for k in ("mean", "components", "centres", "precision")}
    return guard_lib.Guard(**arrays, threshold=float(meta["threshold"]))


def main() -> None:
    """Collect, then judge each probe setting by source."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--negatives", required=True, help="comma-separated folders of non-dermoscopic images")
    p.add_argument("--positives", required=True, help="comma-separated folders of other sources' dermoscopy")
    p.add_argument("--quantiles", default=str(guard_fit.PROBE_QUANTILE), help="comma list of PROBE_QUANTILE values")
    p.add_argument("--strengths", default=str(guard_fit.PROBE_C), help="comma list of PROBE_C values")
    p.add_argument("--cache", default=None)
    args = p.parse_args()
    d = collect(args)
    rows = {k: d[k] for k in ("features", "texture", "colours", "kinds", "sources")}
    val = (d["val_features"], d["val_texture"], d["val_colours"])
    guard = mahalanobis(args.model)
    print(f"features through the {d['backend']} backend")
    for strength in map(float, args.strengths.split(",")):
        for quantile in map(float, args.quantiles.split(",")):
            figures = guard_fit.by_source(guard, rows, val, strength=strength, quantile=quantile)
            guard.probe = guard_fit.fit_probe(rows["texture"], rows["colours"], rows["kinds"], rows["sources"],
                                              *val[1:], strength=strength, quantile=quantile, home=guard_fit.HOME)
            kept = float(guard.judge(val[0], val[2], texture=val[1])[0].mean())
            s = guard_fit.summary(figures, kept)
            cells = [f"{label} worst {s[f'ood_loso_{key}_worst']:.1%} mean {s[f'ood_loso_{key}_mean']:.1%}"
                     for label, key in (("skin photos flagged", "skin_photo_flagged"),
                                        ("far-OOD flagged", "far_flagged"), ("other dermoscopy kept", "external_kept"))]
            print(f"C={strength:g} quantile={quantile:g}: " + "; ".join(cells) + f"; HAM10000 val kept {kept:.1%}")
            for name, v in sorted(figures.items(), key=lambda kv: (kv[1]["kind"], kv[0])):
                print(f"    {name:62s} {v['kind']:12s} n={v['n']:4d} {v['share']:.1%}")


if __name__ == "__main__":
    main()
