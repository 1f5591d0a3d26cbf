"""Which int8 graph keeps the model and serves fastest? Post-training recipes side by side, one run.

    .venv/bin/python research/int8_study.py --model models/ham10000-resnet50 --data data/ham10000 \
        --external DERMOSCOPY_FOLDER [--recipes float4-minmax-ma,all-minmax-ma,...] [--n-calibration 300]

For each recipe: ranges measured on the same seeded training images, the int8 graph built, then read
on HAM10000 validation and on another archive's dermoscopy against the fp32 graph (top-1 agreement,
balanced accuracy) and timed one image at a time (p50 of the forward pass, 100 validation images).
A recipe is "<float part>-<calibration>": float part `float4` (stem and first stage float, the
shipped recipe), `float2` (the stem convolution float), `all` (every convolution int8), or
`only:<stage>` (only that stage int8: stem, layer1 ... layer4; what each stage's rounding costs),
`noadd` (every convolution int8, the residual additions float); a `cle:` prefix first equalises the
weights' per-channel ranges across each ReLU (cross-layer equalisation, Nagel et al., ICCV 2019: the
stem into layer1's first block, and inside every bottleneck), which leaves the float model's outputs
as they were (checked) and is then quantized by the rest of the recipe;
an `ae<alpha>:` prefix (`aestem<alpha>:` for the stem alone) equalises the activations instead: each
rescalable ReLU output's channels multiplied by (widest / own peak)^alpha on the calibration images,
their consumers' input channels divided by the same (SmoothQuant-style, Xiao et al. 2023);
calibration `minmax-ma` (moving average of batch extremes), `minmax`, `percentile` (99.999th), `entropy`.
Recipe `tuned<N>` (`tuned300`) is `all-minmax-ma` followed by `ham-hf calibrate`'s quantization-aware
tuning of the stem and first stage for N steps (`ham_hf.finish.int8.tune_int8`, on the training split);
`tunedall<N>@<rate>` tunes every backbone layer, the rest at that rate, with every activation's step
size learned; a `+bal` suffix draws the classes alike, `+kl<w>` adds a KL term of weight w.
With `--openvino` each graph is also compiled by OpenVINO (the same QDQ file) and read the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ham_hf import data, metrics  # noqa: E402
from ham_hf.finish import guard as guard_fit  # noqa: E402
from ham_hf.finish.int8 import _float_batches, _onnx_outputs, tune_int8  # noqa: E402
from ham_hf.serve import export  # noqa: E402
from ham_hf.serve.classifier import Classifier  # noqa: E402
from ham_hf.transforms import cache_split, decode_images  # noqa: E402

CALIBRATIONS = {"minmax-ma": ("MinMax", {"CalibMovingAverage": True}), "minmax": ("MinMax", {}),
                "percentile": ("Percentile", {"CalibPercentile": 99.999}), "entropy": ("Entropy", {})}
FLOAT_PARTS = {"float4": 4, "float2": 2, "all": 0}


STAGES = {"stem": ("/conv1/", "/act1/", "/maxpool/"), **{f"layer{k}": (f"/layer{k}/",) for k in range(1, 5)}}


def build(recipe: str, fp32: Path, out: Path, batches) -> Path:
    """The int8 graph of one recipe (export's calibration settings and float rule swapped in for the call)."""
    part, calibration = recipe.split("-", 1)
    method, options = CALIBRATIONS[calibration]
    saved = export.INT8_METHOD, export.INT8_OPTIONS, export.float_nodes
    export.INT8_METHOD, export.INT8_OPTIONS = method, options
    stride = FLOAT_PARTS.get(part, 0)
    if part.startswith("only:"):  # every node float but one stage's
        prefixes = STAGES[part.split(":")[1]]
        export.float_nodes = lambda graph, _: [n.name for n in graph.node if not n.name.startswith(prefixes)]
    elif part == "noadd":  # the shipped rule with nothing float before the head, and the additions float
        export.float_nodes = lambda graph, _: saved[2](graph, 0) + [n.name for n in graph.node if n.op_type == "Add"]
    try:
        return export.quantize_int8(fp32, out, out.with_suffix(".ranges.json"), batches, float_until_stride=stride)
    finally:
        export.INT8_METHOD, export.INT8_OPTIONS, export.float_nodes = saved


def _bn_scale(bn) -> torch.Tensor:
    """The per-channel factor a BatchNorm multiplies its input by (gamma / sqrt(var + eps))."""
    return bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)


def _equalisable(net, stem_only: bool) -> list:
    """(conv, BN, consumers) pairs whose output channels can be rescaled: the stem into layer1's first block,
    and (unless `stem_only`) the two inner activations of every bottleneck."""
    pairs = [(net.conv1, net.bn1, [net.layer1[0].conv1, net.layer1[0].downsample[0]])]
    if not stem_only:
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in stage:
                pairs += [(block.conv1, block.bn1, [block.conv2]), (block.conv2, block.bn2, [block.conv3])]
    return pairs


@torch.no_grad()
def equalise(net) -> None:
    """Cross-layer equalisation of a timm ResNet in place: each (conv, BN) -> ReLU -> consumers pair gets output
    channel c divided by s_c in the BN and input channel c of the consumers multiplied by s_c, with
    s_c = sqrt(r1_c / r2_c) from the folded producer's and the consumers' weight ranges (ReLU and max-pool
    commute with a positive per-channel scale)."""
    for conv, bn, consumers in _equalisable(net, stem_only=False):
        r1 = (conv.weight.abs().flatten(1).amax(1) * _bn_scale(bn).abs())
        r2 = torch.stack([c.weight.abs().transpose(0, 1).flatten(1).amax(1) for c in consumers]).amax(0)
        s = torch.sqrt(r1 / r2.clamp(min=1e-8)).clamp(min=1e-3, max=1e3)
        bn.weight.div_(s)
        bn.bias.div_(s)
        for c in consumers:
            c.weight.mul_(s.view(1, -1, 1, 1))


@torch.no_grad()
def equalise_activations(net, batches, alpha: float, stem_only: bool) -> None:
    """Activation equalisation in place (SmoothQuant-style, Xiao et al. 2023, for a per-tensor uint8 grid):
    each rescalable ReLU output's channel c is multiplied by (a_max / a_c)^alpha, a_c its largest value on the
    calibration batches, and its consumers' input channel c divided by the same, so that small channels use
    more of the tensor's grid (alpha 1: every channel the range of the widest; 0: unchanged)."""
    pairs = _equalisable(net, stem_only)
    peaks: dict[int, torch.Tensor] = {}
    handles = [bn.register_forward_hook(
        lambda m, a, out, k=k: peaks.__setitem__(k, torch.maximum(peaks.get(k, out.new_zeros(out.shape[1])),
                                                                   out.clamp(min=0).amax((0, 2, 3)))))
        for k, (_, bn, _) in enumerate(pairs)]
    try:
        for b in batches:
            net(torch.from_numpy(b))
    finally:
        for h in handles:
            h.remove()
    for k, (_, bn, consumers) in enumerate(pairs):
        a = peaks[k].clamp(min=1e-3)
        s = (a.max() / a) ** alpha  # the factor channel c's activations are multiplied by
        bn.weight.mul_(s)
        bn.bias.mul_(s)
        for c in consumers:
            c.weight.div_(s.view(1, -1, 1, 1))


def p50_ms(path: Path, batches) -> float:
    """Median time of one single-image forward pass through an ONNX Runtime session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    singles = [b[i:i + 1] for b in batches for i in range(len(b))][:100]
    for x in singles[:5]:
        session.run(None, {"pixel_values": x})
    times = []
    for x in singles:
        start = time.perf_counter()
        session.run(None, {"pixel_values": x})
        times.append(time.perf_counter() - start)
    return round(float(np.median(times) * 1000), 2)


def openvino_row(path: Path, val_batches, ext_batches, ref_val, ref_ext, y_val, y_ext) -> dict:
    """The same QDQ graph compiled by OpenVINO for the CPU: agreement with the fp32 graph and p50 of one image."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                          "INFERENCE_PRECISION_HINT": "f32",
                                                          "PERFORMANCE_HINT": "LATENCY"})
    request, logits = compiled.create_infer_request(), compiled.output("logits")

    def outputs(batches) -> np.ndarray:
        return np.concatenate([request.infer({"pixel_values": b})[logits] for b in batches])

    singles = [b[i:i + 1] for b in val_batches for i in range(len(b))][:100]
    for x in singles[:5]:
        request.infer({"pixel_values": x})
    times = []
    for x in singles:
        start = time.perf_counter()
        request.infer({"pixel_values": x})
        times.append(time.perf_counter() - start)
    return {"p50_ms": round(float(np.median(times) * 1000), 2), "version": ov.get_version(),
            "validation": agreement(ref_val, outputs(val_batches), y_val),
            "external": agreement(ref_ext, outputs(ext_batches), y_ext)}


def agreement(z32: np.ndarray, z8: np.ndarray, y: np.ndarray) -> dict:
    """Top-1 agreement and balanced accuracy of int8 against fp32."""
    from sklearn.metrics import balanced_accuracy_score

    a, b = z32.argmax(1), z8.argmax(1)
    return {"top1_agreement": round(float((a == b).mean()), 4),
            "ba_fp32": round(float(balanced_accuracy_score(y, a)), 4),
            "ba_int8": round(float(balanced_accuracy_score(y, b)), 4),
            "max_prob_diff": round(float(np.abs(metrics.softmax(z32) - metrics.softmax(z8)).max()), 4)}


def main() -> None:
    """Build and judge every recipe; log one JSON line each."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--external", required=True, help="a folder of other sources' dermoscopy (metadata.csv, dx)")
    p.add_argument("--recipes", default="float4-minmax-ma,all-minmax-ma,all-percentile,all-entropy,float2-minmax-ma")
    p.add_argument("--n-calibration", type=int, default=300)
    p.add_argument("--work", default=None, help="keep the graphs here (default: a temporary folder)")
    p.add_argument("--openvino", action="store_true", help="also run each graph in OpenVINO (pip install openvino)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    clf = Classifier(args.model, backend="torch")
    dc = clf.data_config
    dsd = data.load_splits(args.data)
    train = dsd["train"].shuffle(seed=0).select(range(args.n_calibration))
    calibration = _float_batches(cache_split(train, dc).images, dc)
    val = cache_split(dsd["validation"], dc)
    val_batches, y_val = _float_batches(val.images, dc), val.labels.numpy()
    paths, dx, _ = guard_fit.read_folder(Path(args.external), "dx")
    codes = clf.model.config.label2id
    keep = [i for i, d in enumerate(dx) if d in codes]
    ext_batches = _float_batches(decode_images([str(paths[i]) for i in keep], dc), dc)
    y_ext = np.array([codes[dx[i]] for i in keep])
    work = Path(args.work or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    fp32 = export.export_onnx(clf.model.float(), dc.size, work / "fp32.onnx")
    ref_val, ref_ext = _onnx_outputs(fp32, val_batches)[0], _onnx_outputs(fp32, ext_batches)[0]
    logging.info("%s", json.dumps({"recipe": "fp32", "p50_ms": p50_ms(fp32, val_batches)}))
    train_images, sources = None, {}
    for recipe in args.recipes.split(","):
        start = time.perf_counter()
        source = fp32
        prefix = recipe.split(":")[0]
        equivalent = prefix == "cle" or prefix.startswith("ae")  # cle: / ae<alpha>: / aestem<alpha>:
        if equivalent:  # an equivalent float model, made once a prefix
            if prefix not in sources:
                import copy

                model = copy.deepcopy(clf.model).float().eval()
                if prefix == "cle":
                    equalise(model.timm_model)
                else:  # activation equalisation: ae<alpha> (every pair) or aestem<alpha> (the stem only)
                    stem_only = prefix.startswith("aestem")
                    equalise_activations(model.timm_model, calibration,
                                         float(prefix.removeprefix("aestem" if stem_only else "ae")), stem_only)
                sources[prefix] = export.export_onnx(model, dc.size, work / f"fp32-{prefix}.onnx")
                moved = np.abs(_onnx_outputs(sources[prefix], val_batches)[0] - ref_val).max()
                logging.info("%s: largest logit change on validation %.2e", prefix, moved)
            source = sources[prefix]
        if recipe.startswith("tuned"):  # every convolution int8, then `ham-hf calibrate`'s tuning for N steps
            untuned = build("all-minmax-ma", fp32, work / f"{recipe}-untuned.onnx", calibration)
            if train_images is None:
                train_images = cache_split(dsd["train"], dc)
            # tunedall<N>@<rate>: every backbone layer tuned, beyond the stem and first stage at that rate
            # ...+bal: classes drawn alike; ...+kl<w>: a KL term of weight w on the probabilities
            name, *options = recipe.split("+")
            steps, _, rest_lr = name.removeprefix("tunedall" if name.startswith("tunedall") else "tuned").partition("@")
            kl = [float(o.removeprefix("kl")) for o in options if o.startswith("kl")]
            int8 = tune_int8(clf.model, dc, train_images, untuned, untuned.with_suffix(".ranges.json"), work,
                             int(steps), rest_lr=float(rest_lr or 0), balanced="bal" in options,
                             kl_weight=kl[0] if kl else 0.0)[1]
        else:
            rest = recipe.removeprefix(f"{prefix}:") if equivalent else recipe
            int8 = build(rest, source, work / f"{recipe.replace(':', '_')}.onnx", calibration)
        built = time.perf_counter() - start
        row = {"recipe": recipe, "build_s": round(built, 1), "p50_ms": p50_ms(int8, val_batches),
               "validation": agreement(ref_val, _onnx_outputs(int8, val_batches)[0], y_val),
               "external": agreement(ref_ext, _onnx_outputs(int8, ext_batches)[0], y_ext)}
        if args.openvino:
            row["openvino"] = openvino_row(int8, val_batches, ext_batches, ref_val, ref_ext, y_val, y_ext)
        logging.info("%s", json.dumps(row))


if __name__ == "__main__":
    main()
