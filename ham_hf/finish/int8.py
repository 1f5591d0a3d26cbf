"""int8 for the CPU: activation ranges measured on training images, and the fidelity gate against fp32."""

from __future__ import annotations

import copy
import importlib.util
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from ham_hf import metrics
from ham_hf.finish.guard import non_dermoscopic_images
from ham_hf.serve import export
from ham_hf.serve import guard as guard_lib
from ham_hf.transforms import CachedImages, Preprocess, decode_images

logger = logging.getLogger(__name__)


# The int8 fidelity gate: what int8 must keep of the fp32 model on validation to be served by default.
INT8_GATE = {"top1_agreement": 0.99, "balanced_accuracy_drop": 0.01, "ood_verdict_agreement": 0.99}


def _onnx_outputs(path: Path, batches) -> tuple[np.ndarray, np.ndarray]:
    """(logits, features) of preprocessed float32 batches through an ONNX Runtime session on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outs = [session.run(["logits", "features"], {"pixel_values": b}) for b in batches]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def _float_batches(images: torch.Tensor, data_config, batch_size: int = 32) -> list[np.ndarray]:
    """The model's eval preprocessing of decoded uint8 images, as float32 numpy batches."""
    pre = Preprocess(data_config)
    return [pre(images[i:i + batch_size], train=False).contiguous().numpy()
            for i in range(0, len(images), batch_size)]


def fit_int8(model, data_config, cached: dict[str, CachedImages], output_dir: Path, guard: guard_lib.Guard | None,
             n_calibration: int = 300, seed: int = 0) -> dict:
    """Measure int8 activation ranges on training images and gate int8 against fp32 on validation.

    Writes INT8_RANGES into output_dir; returns the fidelity figures, the results record's int8 section
    (`passed` decides whether int8 is served), empty when this machine cannot export or quantize (a GPU
    machine without onnx / onnxruntime, say).
    """
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        logger.warning("no int8 model: %s not installed here; run `ham-hf calibrate --int8_only true` where it is",
                       " and ".join(missing))
        return {}
    train = cached["train"]
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n_calibration]
    with tempfile.TemporaryDirectory() as tmp:
        cpu_model = copy.deepcopy(model).float().cpu()  # ONNX export traces on the CPU, wherever training ran
        fp32 = export.export_onnx(cpu_model, data_config.size, Path(tmp) / "fp32.onnx")
        try:
            int8 = export.quantize_int8(fp32, Path(tmp) / "int8.onnx", output_dir / export.INT8_RANGES,
                                        _float_batches(train.images[pick], data_config))
        except export.Int8Unavailable as exc:
            logger.warning("no int8 model: %s", exc)
            return {}
        val = _float_batches(cached["validation"].images, data_config)
        (z32, f32), (z8, f8) = _onnx_outputs(fp32, val), _onnx_outputs(int8, val)
        odd = decode_images([im for _, im in non_dermoscopic_images()], data_config)
        odd_batches = _float_batches(odd, data_config)
        (_, o32), (_, o8) = _onnx_outputs(fp32, odd_batches), _onnx_outputs(int8, odd_batches)
    p32, p8 = metrics.softmax(z32), metrics.softmax(z8)
    y = cached["validation"].labels.numpy()
    from sklearn.metrics import balanced_accuracy_score

    figures = {
        "n_validation": int(len(y)), "n_calibration_images": int(len(pick)),
        "top1_agreement": float((p32.argmax(1) == p8.argmax(1)).mean()),
        "balanced_accuracy_fp32": float(balanced_accuracy_score(y, p32.argmax(1))),
        "balanced_accuracy_int8": float(balanced_accuracy_score(y, p8.argmax(1))),
        "max_probability_difference": float(np.abs(p32 - p8).max()),
        "mean_probability_difference": float(np.abs(p32 - p8).mean()),
    }
    if guard is not None:
        verdicts = [guard.in_distribution(guard.score(f)) for f in (np.r_[f32, o32], np.r_[f8, o8])]
        figures["ood_verdict_agreement"] = float((verdicts[0] == verdicts[1]).mean())
    figures["passed"] = bool(
        figures["top1_agreement"] >= INT8_GATE["top1_agreement"]
        and figures["balanced_accuracy_fp32"] - figures["balanced_accuracy_int8"] <= INT8_GATE["balanced_accuracy_drop"]
        and figures.get("ood_verdict_agreement", 1.0) >= INT8_GATE["ood_verdict_agreement"])
    figures["gate"] = dict(INT8_GATE)
    logger.info("int8 vs fp32 on validation: top-1 agreement %.4f, balanced accuracy %.4f vs %.4f, max prob diff "
                "%.4f: %s", figures["top1_agreement"], figures["balanced_accuracy_int8"],
                figures["balanced_accuracy_fp32"], figures["max_probability_difference"],
                "passed, int8 is served by default" if figures["passed"] else "failed, fp32 is served")
    return figures


