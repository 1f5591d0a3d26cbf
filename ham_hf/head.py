"""The folded head: temperature scaling and logit adjustment live in the classifier head's weights.

A saved model decides and calibrates with no custom code (`pipeline`, ONNX, the app) because both are
folded into the head: logits / T is the weight and bias divided by T, and the logit adjustment
(minus tau x log(train prior)) is added to the bias. The values folded are recorded in the head
section of the model folder's results record (`ham_hf.results`), so the bare logits can be had back.
This module is the one place that folds and unfolds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ham_hf import model as model_lib
from ham_hf import results
from ham_hf.errors import ModelError
from ham_hf.labels import CLASS_CODES


def log_prior(labels, num_classes: int = len(CLASS_CODES)) -> torch.Tensor:
    """log of the class frequencies of `labels` (an absent class gets the log of half a count)."""
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).double().clamp(min=0.5)
    return (counts / counts.sum()).log().float()


def add_to_head_bias(model, offset) -> None:
    """Add a per-class offset to the classifier head's bias, in place (logit adjustment)."""
    fc = model_lib.head(model)
    if getattr(fc, "bias", None) is None:
        raise ModelError(f"the head of {type(model.timm_model).__name__} has no bias to fold a logit offset into")
    with torch.no_grad():
        fc.bias.add_(torch.as_tensor(offset, dtype=fc.bias.dtype, device=fc.bias.device))


def scale_head(model, factor: float) -> None:
    """Multiply the classifier head's weight and bias by `factor`, in place (temperature 1/factor)."""
    fc = model_lib.head(model)
    with torch.no_grad():
        fc.weight.mul_(factor)
        if getattr(fc, "bias", None) is not None:
            fc.bias.mul_(factor)


def unfold_logits(logits: np.ndarray, temperature: float, tau: float, prior: np.ndarray) -> np.ndarray:
    """A saved head's logits before its folded temperature and logit adjustment: T x logits + tau x log(prior)."""
    return temperature * np.asarray(logits, dtype=np.float64) + tau * np.asarray(prior, dtype=np.float64)


def folded_values(model_dir: str | Path) -> dict:
    """What a saved model's head holds folded in (its record): temperature (1) and logit_adjustment_tau (0)."""
    return results.head_values(results.load(model_dir))


def head_temperature(model_dir: str | Path) -> float:
    """The temperature already folded into a saved model's head (its record), 1 when none."""
    return folded_values(model_dir)["temperature"]


def unfold_head(model, model_dir: str | Path, prior: torch.Tensor) -> dict:
    """Undo a saved model's folded temperature and logit adjustment in its head, in place (bare logits again).

    `prior` is the log class prior of the training split it was trained on; the undone values come
    from the model folder's results record and are returned.
    """
    undone = folded_values(model_dir)
    scale_head(model, undone["temperature"])
    add_to_head_bias(model, undone["logit_adjustment_tau"] * torch.as_tensor(prior, dtype=torch.float32))
    return undone


def unfolded_state(path: Path, prior: torch.Tensor) -> dict[str, torch.Tensor]:
    """A model's float32 weights with its head unfolded to the bare logits (no temperature, no logit adjustment)."""
    model = model_lib.load_model(str(path)).float()
    unfold_head(model, path, prior)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


