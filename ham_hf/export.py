"""Export a saved classifier to ONNX for fast CPU inference with ONNX Runtime.

    ham-hf export --model DIR [--output DIR/model.onnx]

The ONNX graph is always built here from the safetensors weights (never downloaded), and the
inference module caches it by a digest of the weights, so a changed model is exported again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)


# Bumped when the graph's outputs change, so cached exports of older graphs are not reused.
GRAPH_VERSION = "logits+features"


class _LogitsAndFeatures(nn.Module):
    """Wrap the transformers model so the graph maps pixel_values to logits and the pooled features."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from ham_hf.model import features_and_logits

        features, logits = features_and_logits(self.model, pixel_values)
        return logits, features


def weights_digest(model, size: int) -> str:
    """A short digest of the weights and input size (the ONNX cache key)."""
    h = hashlib.sha256(f"{size}:{GRAPH_VERSION}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def export_onnx(model, size: int, path: str | Path) -> Path:
    """Write the model as ONNX (float32, dynamic batch; outputs logits and features) to path, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    dummy = torch.zeros(1, 3, size, size)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(_LogitsAndFeatures(model), (dummy,), str(tmp), input_names=["pixel_values"],
                          output_names=["logits", "features"], dynamo=False,
                          dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}})
    tmp.replace(path)
    logger.info("exported ONNX model to %s", path)
    return path


def cache_dir() -> Path:
    """Where exported ONNX graphs are cached (HAM_HF_CACHE, else ~/.cache/ham_hf)."""
    return Path(os.environ.get("HAM_HF_CACHE", Path.home() / ".cache" / "ham_hf")) / "onnx"


def cached_onnx(model, size: int) -> Path:
    """Return the cached ONNX export of these weights, exporting it first if needed."""
    path = cache_dir() / f"{weights_digest(model, size)}.onnx"
    return path if path.is_file() else export_onnx(model, size, path)
