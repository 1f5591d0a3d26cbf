"""Export a saved classifier to ONNX for fast CPU inference with ONNX Runtime.

    ham-hf export --model DIR [--output DIR/model.onnx]

The ONNX graph is always built here from the safetensors weights (never downloaded), and the
inference module caches it by a digest of the weights, so a changed model is exported again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ham_hf.defaults import BUNDLED_DIR

logger = logging.getLogger(__name__)


# Bumped when the graph's outputs change, so cached exports of older graphs are not reused.
GRAPH_VERSION = "logits+features+feature_map(identity)+texture"
OUTPUTS = ("logits", "features", "feature_map", "texture")


class _Texture(nn.Module):
    """The stages' texture statistics, as a module of its own so its nodes are named /texture/... (left float)."""

    def forward(self, maps) -> torch.Tensor:
        from ham_hf.model import texture_statistics

        return texture_statistics(maps)


class _Outputs(nn.Module):
    """Wrap the transformers model: pixel_values to logits, pooled features, the feature map and texture statistics."""

    def __init__(self, model):
        super().__init__()
        self.model, self.texture = model, _Texture()

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from ham_hf.model import forward_all

        feature_map, features, logits, texture = forward_all(self.model, pixel_values, True, self.texture)
        return logits, features, feature_map, texture


@dataclass
class ExportArguments:
    """Options of `ham-hf export`."""

    model: str = field(metadata={"help": "Model folder or Hub id."})
    output: str = field(default="model.onnx", metadata={"help": "ONNX file to write."})


def run_export(args: ExportArguments) -> Path:
    """`ham-hf export`: the model as float32 ONNX at its own input size."""
    from ham_hf import model as model_lib

    model = model_lib.load_model(args.model)
    return export_onnx(model, model_lib.data_config(model).size, args.output)


def weights_digest(model, size: int) -> str:
    """A short digest of the weights and input size (the ONNX cache key)."""
    h = hashlib.sha256(f"{size}:{GRAPH_VERSION}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def export_onnx(model, size: int, path: str | Path) -> Path:
    """Write the model as ONNX (float32, dynamic batch; OUTPUTS) to path, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    dummy = torch.zeros(1, 3, size, size)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        # The wrapper in eval mode too: the exporter restores the mode it found, recursively, and a wrapper
        # left in training mode would leave the model's batch norms in training mode after the export.
        torch.onnx.export(_Outputs(model).eval(), (dummy,), str(tmp), input_names=["pixel_values"],
                          output_names=list(OUTPUTS), dynamo=False,
                          dynamic_axes={name: {0: "batch"} for name in ("pixel_values", *OUTPUTS)})
    _map_through_identity(tmp)
    tmp.replace(path)
    logger.info("exported ONNX model to %s", path)
    return path


def _map_through_identity(path: Path) -> None:
    """Give the feature map its own Identity output, so the tensor inside keeps the name int8 ranges know it by.

    The exporter names a graph output after the output itself ("feature_map"), which would rename the
    last stage's activation; int8 ranges measured on a graph without that output name it
    "<node>_output_0", as the exporter names every inner tensor.
    """
    import onnx

    model = onnx.load(str(path))
    producer = next(n for n in model.graph.node if "feature_map" in n.output)
    inner = f"{producer.name}_output_0"
    producer.output[list(producer.output).index("feature_map")] = inner
    for node in model.graph.node:
        node.input[:] = [inner if name == "feature_map" else name for name in node.input]
    model.graph.node.append(onnx.helper.make_node("Identity", [inner], ["feature_map"], name="/feature_map/Identity"))
    onnx.save(model, str(path))


def cache_dir() -> Path:
    """Where exported ONNX graphs are cached (HAM_HF_CACHE, else ~/.cache/ham_hf)."""
    return Path(os.environ.get("HAM_HF_CACHE", Path.home() / ".cache" / "ham_hf")) / "onnx"


def cached_onnx(model, size: int) -> Path:
    """Return the cached ONNX export of these weights, exporting it first if needed."""
    path = cache_dir() / f"{weights_digest(model, size)}.onnx"
    return path if path.is_file() else export_onnx(model, size, path)


# ----------------------------------------------------------------------------- compact weights


@dataclass
class BundleArguments:
    """Options of `ham-hf bundle`."""

    model: str = field(metadata={"help": "Model folder written by ham-hf train."})
    output_dir: str = field(default=str(BUNDLED_DIR), metadata={
        "help": "Folder to write (the app's default).", "aliases": ["--output"]})
    dtype: str = field(default="float16", metadata={"help": "Storage dtype of weight tensors.",
                                                    "choices": ["float16", "bfloat16", "float32"]})


def bundle(model_dir: str | Path, output: str | Path, dtype: str = "float16") -> Path:
    """Copy a model folder's Hub files to output, storing weight tensors in dtype (half the size).

    Normalisation parameters and buffers stay float32: a batch-norm running variance can exceed the
    float16 range. The config keeps dtype float32, so loaders compute in float32 as before.
    """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(model_dir), Path(output)
    dst.mkdir(parents=True, exist_ok=True)
    from ham_hf.hub import model_files

    for name in model_files(src):
        if name != "model.safetensors":
            shutil.copy2(src / name, dst / name)
    tensors = load_file(str(src / "model.safetensors"))
    save_file(_compact(tensors, getattr(torch, dtype)), str(dst / "model.safetensors"), metadata={"format": "pt"})
    logger.info("bundled %s into %s (%s weights)", src, dst, dtype)
    return dst


def _compact(tensors: dict, dtype) -> dict:
    """Store convolution and linear weights (the bulk) in dtype; anything 1-D (biases, norms, buffers) stays."""
    return {k: (v.to(dtype) if v.is_floating_point() and v.ndim > 1 else v) for k, v in tensors.items()}


def save_weights_like(model, reference: str | Path, path: str | Path) -> Path:
    """Save a timm model's weights as safetensors in the storage dtype of `reference` (a bundled fp16 stays fp16)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(reference), "pt") as fh:
        dtype = max((fh.get_slice(k) for k in fh.keys()), key=lambda t: len(t.get_shape())).get_dtype()
    import torch

    storage = {"F16": torch.float16, "BF16": torch.bfloat16}.get(dtype, torch.float32)
    state = {k: v.detach().cpu().contiguous() for k, v in model.timm_model.state_dict().items()}
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    save_file(_compact(state, storage), str(path), metadata={"format": "pt"})
    return Path(path)


# ----------------------------------------------------------------------------- int8 (static, QDQ)

# Beside the model: the activation ranges int8 needs (a Space has no HAM10000 to calibrate with), and
# the weights quantization-aware tuning gave the stem and first stage (`ham_hf.finish.qat`); how they
# were made and the fidelity check that decides whether int8 is served are the int8 section of its
# results record.
INT8_RANGES = "int8_ranges.json"
INT8_WEIGHTS = "int8_weights.safetensors"
# The version of those files and of the record's int8 section: files of another version are refused.
# 3 added the cascade (the recipe's "cascade": float32 answers the close calls), which a reader of 2
# would ignore; 2's files are built as 3's are, so they are still read.
INT8_FORMAT = 3
INT8_READABLE = (2, 3)
# How activation ranges are measured (ONNX Runtime's CalibrationMethod name). The moving average
# of per-batch extremes, not the extremes over all images: with plain MinMax, rare outliers set the
# ranges of the later stages and their typical activations round to zero (research/README.md,
# "int8 recipe").
INT8_METHOD = "MinMax"
INT8_OPTIONS = {"CalibMovingAverage": True}
# Without quantization-aware tuning, the cumulative input stride up to which the graph stays float:
# the stem and the first stage, whose post-training rounding costs the gate (research/README.md,
# "int8 recipe"). With tuning nothing before the head is float (stride 0). The head stays float
# either way (tiny, and it alone sets the temperature-sharpened probabilities).
FLOAT_UNTIL_STRIDE = 4


def int8_recipe(float_until_stride: int) -> str:
    """Part of the int8 cache key: a change of the recipe must not reuse an old build."""
    return f"{INT8_METHOD}:{sorted(INT8_OPTIONS.items())}:float-stride-{float_until_stride}:float-head:texture-once"


class Int8Unavailable(RuntimeError):
    """int8 cannot be built here (no quantization tools, no ranges, ranges of another graph)."""


class _Batches:
    """An ONNX Runtime CalibrationDataReader over preprocessed float32 batches."""

    def __init__(self, batches):
        self._it = iter([{"pixel_values": b} for b in batches])

    def get_next(self):
        return next(self._it, None)


def quantize_int8(fp32_path: str | Path, out_path: str | Path, ranges_path: str | Path, batches=None,
                  float_until_stride: int = FLOAT_UNTIL_STRIDE) -> Path:
    """Static int8 quantization (QDQ, per-channel int8 weights, uint8 activations; `float_nodes` left float).

    With `batches` (preprocessed float32 arrays) the ranges are measured and written to `ranges_path`;
    without, the ranges already at `ranges_path` are used, so int8 can be built where no data is.
    Raises Int8Unavailable when this ONNX Runtime cannot, or the ranges do not fit the graph.
    """
    import onnx

    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise Int8Unavailable(f"this ONNX Runtime has no quantization tools ({exc})") from None
    out_path, ranges_path = Path(out_path), Path(ranges_path)
    if batches is None and not ranges_path.is_file():
        raise Int8Unavailable(f"no {ranges_path.name} beside the model (run `ham-hf calibrate` to measure it)")
    if batches is not None:
        ranges_path.unlink(missing_ok=True)  # ONNX Runtime would reuse an existing file instead of measuring
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # folds batch norms, infers shapes
        if batches is None:
            names = {t for n in onnx.load(str(prepared)).graph.node for t in (*n.input, *n.output)}
            missing = set(json.loads(ranges_path.read_text()).get("data", {})) - names
            if missing:
                raise Int8Unavailable(f"{ranges_path.name} names {len(missing)} tensors this graph lacks "
                                      "(exported by another torch version?); refit with `ham-hf calibrate`")
        tmp_out = Path(tmp) / "int8.onnx"
        try:
            quantize_static(str(prepared), str(tmp_out), _Batches(batches) if batches is not None else None,
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, INT8_METHOD),
                            nodes_to_exclude=float_nodes(onnx.load(str(prepared)).graph, float_until_stride),
                            extra_options=dict(INT8_OPTIONS), calibration_cache_path=str(ranges_path))
        except TypeError as exc:  # an ONNX Runtime older than calibration caches
            raise Int8Unavailable(f"this ONNX Runtime cannot reuse calibration ranges ({exc})") from None
        quantized = onnx.load(str(tmp_out))
        texture_reads_once(quantized.graph)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(quantized, str(tmp_out))
        shutil.move(str(tmp_out), out_path)
    logger.info("int8 model written to %s", out_path)
    return out_path


def texture_reads_once(graph) -> int:
    """Let the float texture statistics dequantize each stage's int8 map once, not once per use; the maps rerouted.

    ONNX Runtime gives every node that reads a dequantized tensor a DequantizeLinear of its own
    (EnsureUniqueDQForNodeUnit), so the statistics' three reads of a stage's map were three
    single-threaded passes over it. Read through one Relu instead, an identity on a ReLU's output
    (zero point 0), and the values stay the same, bit for bit (tested) at a third of the passes.
    """
    import onnx
    from onnx import numpy_helper

    zero = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    changed = 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        texture = [n for n in readers.get(dq.output[0], []) if n.name.startswith("/texture/")]
        z = zero.get(dq.input[2]) if len(dq.input) > 2 else None
        if not texture or z is None or z.any():  # not a ReLU's output: Relu would not be an identity
            continue
        once = f"{dq.output[0]}/texture_once"
        at = list(graph.node).index(dq) + 1
        graph.node.insert(at, onnx.helper.make_node("DequantizeLinear", list(dq.input), [f"{once}_float"],
                                                    name=f"{dq.name}/texture"))
        graph.node.insert(at + 1, onnx.helper.make_node("Relu", [f"{once}_float"], [once],
                                                        name=f"{dq.name}/texture_once"))
        for node in texture:
            node.input[:] = [once if name == dq.output[0] else name for name in node.input]
        changed += 1
    return changed


def float_nodes(graph, float_until_stride: int = FLOAT_UNTIL_STRIDE) -> list[str]:
    """The nodes int8 leaves float: all before the graph's stride passes float_until_stride, the head, the texture."""
    names, stride, early = [], 1, float_until_stride > 0
    for node in graph.node:  # ONNX keeps nodes in topological order
        if early and node.op_type in ("Conv", "MaxPool", "AveragePool"):
            stride *= max(next((list(a.ints) for a in node.attribute if a.name == "strides"), [1]))
            early = stride <= float_until_stride
        if early or node.op_type in ("Gemm", "MatMul", "GlobalAveragePool", "Flatten") or \
                node.name.startswith("/texture/"):
            names.append(node.name)
    return names


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (how the results record names the int8 files it was measured with)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def backbone_digest(model) -> str:
    """A digest of the weights int8 files are made for: all but the head's (the head stays float in int8,
    and calibration rescales it)."""
    from ham_hf.model import head

    head_memory = {t.data_ptr() for t in head(model).state_dict().values()}
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.data_ptr() not in head_memory:
            h.update(name.encode())
            h.update(tensor.detach().cpu().float().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def with_int8_weights(model, weights_path: str | Path):
    """A copy of the model with the tuned tensors of weights_path in place (the int8 graph's float weights)."""
    from safetensors.torch import load_file

    try:
        tuned = load_file(str(weights_path))
    except Exception as exc:
        raise Int8Unavailable(f"cannot read {Path(weights_path).name} ({str(exc).splitlines()[0]})") from None
    return with_tensors(model, tuned, Path(weights_path).name)


def with_tensors(model, tensors: dict, source: str = "the tuned weights"):
    """A copy of the model with these tensors of its timm network (by state-dict name) in place."""
    import copy

    state = model.timm_model.state_dict()
    wrong = [k for k, v in tensors.items() if k not in state or state[k].shape != v.shape]
    if wrong:
        raise Int8Unavailable(f"{source} has {len(wrong)} tensors this model lacks (such as {wrong[0]}): it "
                              "belongs to another model; rerun `ham-hf calibrate --int8_only true`")
    out = copy.deepcopy(model)
    out.timm_model.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items()}, strict=False)
    return out


def cached_int8(model, size: int, ranges_path: str | Path, float_until_stride: int = FLOAT_UNTIL_STRIDE,
                weights_path: str | Path | None = None) -> Path:
    """The cached int8 build of these weights (tuned weights_path in place) and ranges, exported first if needed."""
    ranges_path = Path(ranges_path)
    if not ranges_path.is_file():
        raise Int8Unavailable(f"no {ranges_path.name} beside the model")
    if weights_path is not None:
        model = with_int8_weights(model, weights_path)
    digest = hashlib.sha256(ranges_path.read_bytes() + int8_recipe(float_until_stride).encode()).hexdigest()[:12]
    path = cache_dir() / f"{weights_digest(model, size)}-{digest}-int8.onnx"
    if path.is_file():
        return path
    return quantize_int8(cached_onnx(model, size), path, ranges_path, float_until_stride=float_until_stride)
