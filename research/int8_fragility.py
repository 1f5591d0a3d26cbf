"""How much rounding can the model's decisions take? The fp32 model's top-1 agreement with itself under noise.

    .venv/bin/python research/int8_fragility.py --model models/ham10000-resnet50 --data data/ham10000 [--n 480]

On the first `--n` validation images, the PyTorch model's top-1 decision against itself when
- Gaussian noise of standard deviation sigma is added to its input (normalised units; 0.01 is about
  0.6 of one 8-bit grey level),
- only the input, or only the stem's output, is rounded to the uint8 grid of the all-int8 graph
  (`ham_hf.finish.qat.fake_quantized` with that one tensor; ranges from 300 seeded training images),
- the whole network is fake-quantised as the all-int8 graph runs it (the simulation tuning trains),
and the logits' noise (standard deviation of int8 minus fp32, mean over classes) of the last.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ham_hf import data  # noqa: E402
from ham_hf.finish import qat  # noqa: E402
from ham_hf.finish.int8 import _float_batches  # noqa: E402
from ham_hf.serve import export  # noqa: E402
from ham_hf.serve.classifier import Classifier  # noqa: E402
from ham_hf.transforms import cache_split  # noqa: E402


def main() -> None:
    """Log one JSON line of agreements."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int, default=480)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    clf = Classifier(args.model, backend="torch")
    dc, model = clf.data_config, clf.model
    dsd = data.load_splits(args.data)
    calibration = _float_batches(cache_split(dsd["train"].shuffle(seed=0).select(range(300)), dc).images, dc)
    val = [torch.from_numpy(b) for b in _float_batches(
        cache_split(dsd["validation"].select(range(args.n)), dc).images, dc)]
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export.export_onnx(model, dc.size, Path(tmp) / "fp32.onnx")
        int8 = export.quantize_int8(fp32, Path(tmp) / "int8.onnx", Path(tmp) / "ranges.json", calibration,
                                    float_until_stride=0)
        acts = qat.activation_quantization(int8)
    pairs = qat.folded_pairs(model.timm_model, dc.size)
    generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def logits(rounded: dict, folded: dict, sigma: float = 0.0) -> np.ndarray:
        with qat.fake_quantized(model.timm_model, rounded, folded):
            return np.concatenate([model(pixel_values=x + sigma * torch.randn(x.shape, generator=generator)
                                         ).logits.numpy() for x in val])

    ref = logits({}, {})

    def agreement(z: np.ndarray) -> float:
        return round(float((z.argmax(1) == ref.argmax(1)).mean()), 4)

    row = {"n": int(len(ref))}
    for sigma in (0.0025, 0.005, 0.01, 0.02):
        row[f"noise {sigma}"] = agreement(logits({}, {}, sigma))
    row["input rounded"] = agreement(logits({"pixel_values": acts["pixel_values"]}, {}))
    row["stem output rounded"] = agreement(logits({"/act1/Relu_output_0": acts["/act1/Relu_output_0"]}, {}))
    whole = logits(acts, pairs)
    row["all-int8 simulation"] = agreement(whole)
    row["all-int8 logit noise"] = round(float((whole - ref).std(0).mean()), 3)
    logging.info("%s", json.dumps(row))


if __name__ == "__main__":
    main()
