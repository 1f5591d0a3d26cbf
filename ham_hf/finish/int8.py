"""int8 for the CPU: activation ranges measured on training images, quantization-aware tuning, the cascade
(float32 for int8's close calls), and the fidelity gate against fp32."""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ham_hf import metrics
from ham_hf.finish import qat
from ham_hf.finish.guard import _folders, non_dermoscopic_images, read_folders
from ham_hf.serve import export
from ham_hf.serve import guard as guard_lib
from ham_hf.transforms import CachedImages, Preprocess, decode_images

logger = logging.getLogger(__name__)


# The int8 fidelity gate: what int8 must keep of the fp32 model to be served by default. Top-1
# agreement on validation and on other archives' dermoscopy (the guard's positives, when given),
# balanced accuracy on validation, and the guard's verdicts on validation, the guard's folders and
# the bundled non-dermoscopic images.
INT8_GATE = {"top1_agreement": 0.99, "top1_agreement_external": 0.99, "balanced_accuracy_drop": 0.005,
             "ood_verdict_agreement": 0.99, "cascade_max_sent": 0.2}
# The cascade: a whole-network graph that fails the gate can still answer every image whose decision is
# clear, float32 recomputing the close calls (int8's top logit minus its second under a margin), and is
# then gated like any graph. Only an int8 flip needs a small margin: 3.4% of validation flips, and 0.75
# of a logit sends 8% to float32 and keeps 0.993 (research/README.md, "Whole-network int8: a cascade").
# The margin is the smallest that keeps CASCADE_AGREEMENT of float32's decisions on CASCADE_FIT_IMAGES
# training images the ranges were not measured on; validation and other archives then judge it. With
# more than `cascade_max_sent` of validation sent to float32 it would be slower than the graph with the
# stem and first stage float (13.5 + 0.2 x 38.8 ms against 22.7 on the 2-core EPYC), so it fails.
CASCADE_FIT_IMAGES = 1000
CASCADE_AGREEMENT = 0.998
# Quantization-aware tuning's schedule (`ham-hf calibrate --int8_tuning_steps`; 0: post-training
# quantization with the stem and first stage float). 300 steps of 16 images: about 18 minutes on 2
# CPU cores (docs/benchmarks.md).
INT8_TUNING_STEPS = 300
INT8_TUNING_BATCH = 16
INT8_TUNING_LR = 5e-5


def _onnx_outputs(path: Path, batches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, features, texture) of preprocessed float32 batches through an ONNX Runtime session on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outs = [session.run(["logits", "features", "texture"], {"pixel_values": b}) for b in batches]
    return tuple(np.concatenate([o[k] for o in outs]) for k in range(3))


def cascade_margin(z32: np.ndarray, z8: np.ndarray, keep: float = CASCADE_AGREEMENT) -> float:
    """The smallest int8 margin under which sending images to float32 keeps `keep` of float32's decisions."""
    margins = metrics.top_margin(z8)
    flips = np.sort(margins[z32.argmax(1) != z8.argmax(1)])
    allowed = int(np.floor((1 - keep) * len(z8) + 1e-9))  # flips the cascade may leave
    if len(flips) <= allowed:
        return 0.0
    return float(np.nextafter(flips[len(flips) - allowed - 1], np.inf))  # just above the widest flip it sends


def cascaded(out32: tuple, out8: tuple, margin: float | None) -> tuple[tuple, np.ndarray]:
    """int8 outputs with the rows whose int8 margin is under `margin` taken from float32, and which rows those are."""
    if margin is None:
        return out8, np.zeros(len(out8[0]), dtype=bool)
    sent = metrics.close_calls(out8[0], margin)
    return tuple(np.where(sent[:, None], a, b) for a, b in zip(out32, out8)), sent


def _float_batches(images: torch.Tensor, data_config, batch_size: int = 32) -> list[np.ndarray]:
    """The model's eval preprocessing of decoded uint8 images, as float32 numpy batches."""
    pre = Preprocess(data_config)
    return [pre(images[i:i + batch_size], train=False).contiguous().numpy()
            for i in range(0, len(images), batch_size)]


def _guard_images(data_config, negatives, positives, codes: dict) -> tuple:
    """Decoded: other archives' dermoscopy (the guard's positives; None without), the guard's negatives with
    the bundled non-dermoscopic images, and the positives' labels (-1 where the model has no such class)."""
    pos_paths, dx, _ = read_folders(_folders(positives), "dx") if positives else ([], [], [])
    neg_paths = read_folders(_folders(negatives), "category")[0] if negatives else []
    odd = [str(p) for p in neg_paths] + [im for _, im in non_dermoscopic_images()]
    external = decode_images([str(p) for p in pos_paths], data_config) if pos_paths else None
    return external, decode_images(odd, data_config), np.array([codes.get(d, -1) for d in dx], dtype=int)


def tune_int8(model, data_config, train: CachedImages, untuned: Path, ranges: Path, work: Path, steps: int,
              seed: int = 0, rest_lr: float = 0.0, balanced: bool = False, kl_weight: float = 0.0
              ) -> tuple[dict, Path]:
    """Quantization-aware tuning of the stem and first stage, fake-quantised as the all-int8 graph `untuned` runs.

    Their learned activation ranges replace the measured ones in `ranges`; `rest_lr`, `balanced` and
    `kl_weight` are `qat.tune`'s research options (`balanced`: classes drawn alike). Returns the tuned tensors and
    the int8 graph built from them and those ranges (nothing float before the head).
    """
    tuned, learned = qat.tune(model, train.images, data_config, qat.activation_quantization(untuned), steps,
                              batch_size=INT8_TUNING_BATCH, lr=INT8_TUNING_LR, seed=seed,
                              shared=qat.shared_quantization(untuned), rest_lr=rest_lr,
                              labels=train.labels if balanced else None, kl_weight=kl_weight)
    qat.write_ranges(ranges, learned)
    served = export.with_tensors(model, tuned)
    graph = export.quantize_int8(export.export_onnx(served, data_config.size, work / "tuned.onnx"),
                                 work / "int8-tuned.onnx", ranges, float_until_stride=0)
    return tuned, graph


def _recipe(float_until_stride: int, tuning_steps: int, n_calibration: int, seed: int, margin: float | None = None,
            n_fit: int = 0) -> dict:
    """How an int8 graph is made, as the results record keeps it (what the classifier rebuilds it by)."""
    return {"format": export.INT8_FORMAT, "float_until_stride": float_until_stride,
            "calibration": f"{export.INT8_METHOD} {export.INT8_OPTIONS} on {n_calibration} training images "
                           f"(seed {seed})",
            "tuning": {"steps": tuning_steps, "batch_size": INT8_TUNING_BATCH, "lr": INT8_TUNING_LR,
                       "tuned": list(qat.TUNED_MODULES), "ranges": "learned", "seed": seed}
            if tuning_steps else None,
            "cascade": {"margin": margin, "fallback": "fp32",
                        "fitted_on": f"{n_fit} training images (seed {seed}), {CASCADE_AGREEMENT} of float32's "
                                     "decisions kept"} if margin is not None else None,
            "onnxruntime": importlib.import_module("onnxruntime").__version__, "torch": torch.__version__}


def _held_out(train: CachedImages, order: torch.Tensor, n_calibration: int) -> tuple[torch.Tensor, CachedImages]:
    """(the cascade's fitting images, the tuning's images): the CASCADE_FIT_IMAGES after the calibration images in
    `order`, and every training image but those.

    Tuned on an image, int8 agrees with float32 there more than on new ones, so the margin is fitted on images
    neither the ranges nor the tuning saw (on the calibration images when there are no others).
    """
    fit = order[n_calibration:n_calibration + CASCADE_FIT_IMAGES]
    if not len(fit):
        return order[:min(n_calibration, CASCADE_FIT_IMAGES)], train
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[fit] = False
    return fit, CachedImages(train.images[rest], train.labels[rest].tolist())


def fit_int8(model, data_config, cached: dict[str, CachedImages], output_dir: Path, guard: guard_lib.Guard | None,
             n_calibration: int = 300, seed: int = 0, tuning_steps: int = INT8_TUNING_STEPS,
             guard_negatives=None, guard_positives=None) -> dict:
    """Make the int8 graph and gate it against fp32: the whole network tuned, alone or with float32 answering its
    close calls, else the stem and first stage float.

    With `tuning_steps` > 0 the whole network (but the head) is quantized and its stem and first stage
    tuned quantization-aware (`tune_int8`); when that graph fails the gate, the cascade is measured (its
    margin fitted by `cascade_margin` on other training images); when that fails too, or without tuning,
    the post-training graph with the stem and first stage float (FLOAT_UNTIL_STRIDE) is measured. The
    first that passes (else the last) is kept: INT8_RANGES (and INT8_WEIGHTS when tuned) written into
    output_dir, and the results record's int8 section returned: its fidelity figures, `passed` (whether
    int8 is served), how it was made (`recipe`), what for (`made_for`, `files`), and the graphs it beat
    (`rejected`). Empty when this machine cannot export or quantize (a GPU machine without onnx /
    onnxruntime, say).
    """
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        logger.warning("no int8 model: %s not installed here; run `ham-hf calibrate --int8_only true` where it is",
                       " and ".join(missing))
        return {}
    from safetensors.torch import save_file

    train = cached["train"]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    pick = order[:n_calibration]
    batches = _float_batches(train.images[pick], data_config)
    fit, tuning_set = _held_out(train, order, n_calibration)
    others = _guard_images(data_config, guard_negatives, guard_positives, dict(model.config.label2id))
    tried, outputs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cpu_model = copy.deepcopy(model).float().cpu().eval()  # ONNX export traces on the CPU, wherever training ran
        fp32 = export.export_onnx(cpu_model, data_config.size, work / "fp32.onnx")
        for stride in ((0,) if tuning_steps else ()) + (export.FLOAT_UNTIL_STRIDE,):
            ranges = work / f"ranges-{stride}.json"
            try:
                int8 = export.quantize_int8(fp32, work / f"int8-{stride}.onnx", ranges, batches,
                                            float_until_stride=stride)
            except export.Int8Unavailable as exc:
                logger.warning("no int8 model: %s", exc)
                return {}
            tuned = None
            if stride == 0:
                tuned, int8 = tune_int8(cpu_model, data_config, tuning_set, int8, ranges, work, tuning_steps, seed)
            steps = tuning_steps if tuned is not None else 0
            judge = functools.partial(judge_int8, fp32, int8, data_config, cached["validation"], guard, *others,
                                      outputs=outputs)
            figures = judge()
            figures.update(n_calibration_images=int(len(pick)), recipe=_recipe(stride, steps, len(pick), seed))
            if stride == 0 and not figures["passed"]:  # int8 for the clear decisions, float32 for the close calls
                tried.append(figures)
                fit_batches = _float_batches(train.images[fit], data_config)
                margin = cascade_margin(_onnx_outputs(fp32, fit_batches)[0], _onnx_outputs(int8, fit_batches)[0])
                figures = judge(margin=margin)
                figures.update(n_calibration_images=int(len(pick)),
                               recipe=_recipe(stride, steps, len(pick), seed, margin, len(fit)))
            tried.append(figures)
            if figures["passed"]:
                break
        (output_dir / export.INT8_WEIGHTS).unlink(missing_ok=True)
        shutil.copyfile(ranges, output_dir / export.INT8_RANGES)
        if tuned is not None:
            save_file({k: v.contiguous() for k, v in tuned.items()}, str(output_dir / export.INT8_WEIGHTS),
                      metadata={"format": "pt"})
    chosen = tried[-1]
    chosen["rejected"] = [{k: t[k] for k in ("recipe", "top1_agreement", "top1_agreement_external",
                                             "balanced_accuracy_int8", "ood_verdict_agreement", "sent_to_fp32")
                           if k in t}
                          for t in tried[:-1]]
    chosen["made_for"] = export.backbone_digest(model)
    chosen["files"] = {p.name: export.file_digest(p) for p in (output_dir / export.INT8_RANGES,
                                                               output_dir / export.INT8_WEIGHTS) if p.is_file()}
    return chosen


def judge_int8(fp32: Path, int8: Path, data_config, validation: CachedImages, guard: guard_lib.Guard | None,
               external: torch.Tensor | None = None, odd: torch.Tensor | None = None,
               external_labels: np.ndarray | None = None, margin: float | None = None,
               outputs: dict | None = None) -> dict:
    """The fidelity figures of an int8 graph against its fp32 graph, and whether they pass INT8_GATE.

    With `margin`, of the cascade: images whose int8 margin is under it answered by fp32 (`cascaded`).
    `outputs` keeps each graph's outputs by image set across calls (the same graphs judged twice).
    """
    from sklearn.metrics import balanced_accuracy_score

    outputs = {} if outputs is None else outputs
    sent_shares = {}

    def both(name: str, images: torch.Tensor) -> tuple[tuple, tuple]:
        """(fp32 outputs, served outputs) of one image set; the share sent to fp32 noted by name."""
        for path in (fp32, int8):
            if (path, name) not in outputs:
                outputs[path, name] = _onnx_outputs(path, _float_batches(images, data_config))
        served, sent = cascaded(outputs[fp32, name], outputs[int8, name], margin)
        sent_shares[name] = float(sent.mean())
        return outputs[fp32, name], served

    (z32, f32, t32), (z8, f8, t8) = both("validation", validation.images)
    y = validation.labels.numpy()
    a32, a8 = z32.argmax(1), z8.argmax(1)
    p32, p8 = metrics.softmax(z32), metrics.softmax(z8)
    figures = {
        "n_validation": int(len(y)),
        "top1_agreement": float((a32 == a8).mean()),
        "balanced_accuracy_fp32": float(balanced_accuracy_score(y, a32)),
        "balanced_accuracy_int8": float(balanced_accuracy_score(y, a8)),
        "max_probability_difference": float(np.abs(p32 - p8).max()),
        "mean_probability_difference": float(np.abs(p32 - p8).mean()),
    }
    outs32, outs8 = [(f32, t32, validation.images)], [(f8, t8, validation.images)]
    if external is not None and len(external):
        (e32, ef32, et32), (e8, ef8, et8) = both("external", external)
        figures["n_external"] = int(len(external))
        figures["top1_agreement_external"] = float((e32.argmax(1) == e8.argmax(1)).mean())
        known = external_labels >= 0 if external_labels is not None else np.zeros(len(external), bool)
        if known.any():
            figures["balanced_accuracy_external_fp32"] = float(balanced_accuracy_score(
                external_labels[known], e32.argmax(1)[known]))
            figures["balanced_accuracy_external_int8"] = float(balanced_accuracy_score(
                external_labels[known], e8.argmax(1)[known]))
        outs32.append((ef32, et32, external))
        outs8.append((ef8, et8, external))
    if guard is not None:
        if odd is not None and len(odd):
            odd32, odd8 = both("odd", odd)
            outs32.append((*odd32[1:], odd))
            outs8.append((*odd8[1:], odd))
        verdicts = []
        for outs in (outs32, outs8):
            features, texture = np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
            colours = np.concatenate([guard_lib.colour_stats(o[2].numpy()) for o in outs])
            verdicts.append(guard.judge(features, colours, texture=texture)[0])
        figures["n_guard_images"] = int(len(verdicts[0]))
        figures["ood_verdict_agreement"] = float((verdicts[0] == verdicts[1]).mean())
    if margin is not None:
        figures.update(sent_to_fp32=sent_shares["validation"],
                       sent_to_fp32_external=sent_shares.get("external"), sent_to_fp32_odd=sent_shares.get("odd"))
    figures["passed"] = bool(
        figures["top1_agreement"] >= INT8_GATE["top1_agreement"]
        and figures.get("top1_agreement_external", 1.0) >= INT8_GATE["top1_agreement_external"]
        and figures["balanced_accuracy_fp32"] - figures["balanced_accuracy_int8"] <= INT8_GATE["balanced_accuracy_drop"]
        and figures.get("ood_verdict_agreement", 1.0) >= INT8_GATE["ood_verdict_agreement"]
        and figures.get("sent_to_fp32", 0.0) <= INT8_GATE["cascade_max_sent"])
    figures["gate"] = dict(INT8_GATE)
    logger.info("int8%s vs fp32: top-1 agreement %.4f on validation%s, balanced accuracy %.4f vs %.4f, guard "
                "verdicts agree on %.4f: %s",
                "" if margin is None else f" (fp32 under margin {margin:.3f}: {sent_shares['validation']:.1%} of "
                                          "validation)", figures["top1_agreement"],
                f", {figures['top1_agreement_external']:.4f} on {figures['n_external']} external images"
                if "n_external" in figures else "", figures["balanced_accuracy_int8"],
                figures["balanced_accuracy_fp32"], figures.get("ood_verdict_agreement", float("nan")),
                "passed, int8 is served by default" if figures["passed"] else "failed, fp32 is served")
    return figures
