"""How much of a saved model's validation figure is the view it is shown: eval size, crop, flips and turns.

Two questions, on validation only. First, FixRes (Touvron et al. 2019): a model trained on random
resized crops sees lesions larger than its centre-cropped eval view shows them, so a larger eval
size or another crop may score higher with no training; every `--sizes` x `--crop_pcts` setting is
scored. Second, the 8 dihedral views of test-time augmentation (`--tta`): each view alone, then the
mean of the first 2 (flip), 4 and 8 views' probabilities, as the app averages them. The spread of
the single views says how far a figure moves with the view alone, against which a candidate model's
margin over the default model can be read.

    .venv/bin/python research/view_study.py --model models/ham10000-resnet50 --data data/ham10000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ham_hf import (  # noqa: E402
    data,
    metrics,
    precision,  # noqa: E402
)
from ham_hf import model as model_lib  # noqa: E402
from ham_hf.finish.calibration import check_same_split  # noqa: E402
from ham_hf.finish.evaluation import embed  # noqa: E402
from ham_hf.transforms import TTA_VIEWS, Preprocess, cache_split, tta_views  # noqa: E402

logger = logging.getLogger("view_study")
FIGURES = ("balanced_accuracy", "accuracy", "macro_f1", "roc_auc_macro", "ece")


def with_eval_view(model, size: int, crop_pct: float) -> model_lib.DataConfig:
    """Set the model's eval size and crop in its pretrained config (as a saved model would carry them)."""
    cfg = dict(model.config.pretrained_cfg)
    cfg.update(input_size=(3, size, size), test_input_size=(3, size, size), crop_pct=crop_pct, test_crop_pct=crop_pct)
    model.config.pretrained_cfg = cfg
    return model_lib.data_config(model)


def scores(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """The study's validation figures of one set of probabilities, rounded."""
    result = metrics.flatten(metrics.compute(probabilities, labels))
    return {k: round(result[k], 4) for k in FIGURES}


@torch.inference_mode()
def view_logits(model, images: torch.Tensor, dc: model_lib.DataConfig, batch_size: int = 16,
                bf16: bool = False) -> np.ndarray:
    """(N, 8, classes) logits of each image's 8 dihedral views, in `tta_views` order (view 0: as given)."""
    pre, out = Preprocess(dc), []
    model.eval()
    for start in range(0, len(images), batch_size):
        x = pre(images[start:start + batch_size], train=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z = model_lib.features_and_logits(model, tta_views(x))[1].float()
        out.append(z.view(TTA_VIEWS, len(x), -1).transpose(0, 1))
    return torch.cat(out).numpy()


def view_rows(logits: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Scores of each view alone, then of the mean probabilities of the first 2, 4 and 8 views."""
    probs = metrics.softmax(logits.reshape(-1, logits.shape[-1])).reshape(logits.shape)
    rows = [{"views": f"view {v}", **scores(probs[:, v], labels)} for v in range(logits.shape[1])]
    return rows + [{"views": f"mean of {n}", **scores(probs[:, :n].mean(1), labels)} for n in (2, 4, 8)]


def log_table(rows: list[dict]) -> None:
    """Log rows as a Markdown table, first column first."""
    keys = list(rows[0])
    logger.info("| %s |", " | ".join(k.replace("_", " ") for k in keys))
    logger.info("|---|%s", "---:|" * (len(keys) - 1))
    for row in rows:
        logger.info("| %s |", " | ".join(str(row[k]) for k in keys))


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    """Score validation at each eval setting, then view by view; log both tables and return them."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a folder written by `ham-hf train` / `ham-hf bundle`")
    parser.add_argument("--data", required=True, help="the data the model was trained on (prepared or raw)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[224, 256, 288], help="eval sizes to score")
    parser.add_argument("--crop_pcts", type=float, nargs="*", default=[0.875, 1.0], help="centre-crop fractions")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                        help="also score the 8 dihedral views at the model's own setting")
    parser.add_argument("--output", help="also write both tables as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model = model_lib.load_model(args.model).float().eval().to(memory_format=torch.channels_last)
    own, bf16 = dict(model.config.pretrained_cfg), precision.use_bf16("cpu")
    dsd = data.load_splits(args.data)
    check_same_split(dsd, Path(args.model) / data.SPLIT_FILE)  # scores mean nothing on images it trained on
    validation = dsd["validation"]
    tables: dict[str, list[dict]] = {"eval_views": [], "dihedral_views": []}
    for size in args.sizes:
        for crop_pct in args.crop_pcts:
            dc = with_eval_view(model, size, crop_pct)
            cached = cache_split(validation, dc)
            logits = embed(model, cached, dc, bf16=bf16)[1]
            row = {"size": size, "crop_pct": crop_pct, "resize": dc.resize,
                   **scores(metrics.softmax(logits), cached.labels.numpy())}
            logger.info("%s", row)
            tables["eval_views"].append(row)
    model.config.pretrained_cfg = own
    if tables["eval_views"]:
        log_table(tables["eval_views"])
    if args.tta:
        dc = model_lib.data_config(model)
        cached = cache_split(validation, dc)
        tables["dihedral_views"] = view_rows(view_logits(model, cached.images, dc, bf16=bf16), cached.labels.numpy())
        log_table(tables["dihedral_views"])
    if args.output:
        Path(args.output).write_text(json.dumps(tables, indent=1) + "\n")
    return tables


if __name__ == "__main__":
    main()
