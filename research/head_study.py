"""Is a saved model's decision limited by its head or by its features? New heads on the same features, on validation.

Two head-only remedies for class imbalance, each scored as the project decides (`choose_tau`: the
best validation balanced accuracy among the taus calibrated to the ECE goal), beside the model's own
head with its temperature and logit adjustment unfolded:

- tau-normalisation (Kang et al., ICLR 2020): each class's weight vector divided by its norm to the
  power p, since the frequent classes grow longer weights;
- classifier re-training (cRT, the same paper): a new linear head fitted on the model's pooled
  features of the training images (eval preprocessing), plain or class-balanced cross-entropy, kept
  near the trained head by an L2 pull of the given strength.

A head that beats the model's own on validation can be folded into the model as training folds its
head; if none does, the features are what limit the decision, and only a better backbone fit helps.

    .venv/bin/python research/head_study.py --model models/ham10000-resnet50 --data data/ham10000
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

from ham_hf import (
    data,  # noqa: E402
    precision,  # noqa: E402
)
from ham_hf import model as model_lib  # noqa: E402
from ham_hf.finish.calibration import check_same_split, choose_tau  # noqa: E402
from ham_hf.finish.evaluation import embed  # noqa: E402
from ham_hf.head import log_prior, unfolded_state  # noqa: E402
from ham_hf.train import class_weights  # noqa: E402
from ham_hf.transforms import cache_split  # noqa: E402

logger = logging.getLogger("head_study")
FIGURES = ("balanced_accuracy", "accuracy", "macro_f1", "roc_auc_macro", "ece")


def tau_normalised(weight: torch.Tensor, p: float) -> torch.Tensor:
    """Each class's weights divided by their norm to the power p, rescaled to the mean norm's (logit scale kept)."""
    norms = weight.norm(dim=1, keepdim=True)
    return weight / norms**p * norms.mean() ** p


def retrain(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            balanced: bool, pull: float, label_smoothing: float = 0.1, steps: int = 300):
    """(weight, bias) of a linear head fitted by L-BFGS from the given one, held near it by `pull` x squared L2."""
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    # The training run's own class weights (a weighted mean: only their ratios matter here).
    class_weight = class_weights(labels, "balanced" if balanced else "none", len(bias))
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(features @ w.T + b, labels, weight=class_weight,
                                                 label_smoothing=label_smoothing)
        loss = loss + pull * ((w - weight) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def score(features: torch.Tensor, labels: np.ndarray, weight: torch.Tensor, bias: torch.Tensor,
          prior: np.ndarray) -> dict:
    """The head's validation figures at the tau the project's rule chooses."""
    raw = (features @ weight.T + bias).double().numpy()
    tau, table = choose_tau(raw, labels, prior)
    return {"tau": tau, **{k: round(float(table[tau][k]), 4) for k in FIGURES}}


def pooled(model_path: str, source: str,
           bf16: bool | None = None) -> tuple[dict, np.ndarray, torch.Tensor, torch.Tensor]:
    """({split: (features, labels)} for train and validation, log prior, unfolded head weight and bias).

    bf16: autocast for the forward passes (default: where the CPU runs it natively).
    """
    model = model_lib.load_model(model_path).float().eval()
    dc = model_lib.data_config(model)
    dsd = data.load_splits(source)
    check_same_split(dsd, Path(model_path) / data.SPLIT_FILE)
    prior = log_prior(torch.as_tensor(dsd["train"]["label"]))
    model.load_state_dict(unfolded_state(Path(model_path), prior))
    model = model.to(memory_format=torch.channels_last)
    out = {}
    for split in ("train", "validation"):
        images = cache_split(dsd[split], dc)
        with torch.inference_mode():
            features = embed(model, images, dc, bf16=precision.use_bf16("cpu", bf16))[0]
        out[split] = (torch.from_numpy(features).float(), images.labels)
    head = model_lib.head(model)
    return out, prior.double().numpy(), head.weight.detach().float(), head.bias.detach().float()


def study(splits: dict, prior: np.ndarray, weight: torch.Tensor, bias: torch.Tensor,
          powers=(0.25, 0.5, 1.0), pulls=(1e-2, 1e-3)) -> list[dict]:
    """One row per head: the model's own, tau-normalised at each power, re-trained at each pull."""
    (train_f, train_y), (val_f, val_y) = splits["train"], splits["validation"]
    val_y = val_y.numpy()
    rows = [{"head": "the model's own", **score(val_f, val_y, weight, bias, prior)}]
    rows += [{"head": f"tau-normalised, p {p:g}", **score(val_f, val_y, tau_normalised(weight, p), bias, prior)}
             for p in powers]
    for balanced in (False, True):
        for pull in pulls:
            w, b = retrain(train_f, train_y, weight, bias, balanced, pull)
            kind = "class-balanced" if balanced else "plain"
            rows.append({"head": f"cRT, {kind} cross-entropy, pull {pull:g}", **score(val_f, val_y, w, b, prior)})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse the options, embed train and validation once, and log (and optionally save) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a folder written by `ham-hf train` / `ham-hf bundle`")
    parser.add_argument("--data", required=True, help="the data the model was trained on (prepared or raw)")
    parser.add_argument("--output", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = study(*pooled(args.model, args.data))
    logger.info("| head | tau | %s |", " | ".join(f.replace("_", " ") for f in FIGURES))
    logger.info("|---|---:|%s", "---:|" * len(FIGURES))
    for r in rows:
        logger.info("| %s |", " | ".join(str(r[k]) for k in ("head", "tau", *FIGURES)))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
