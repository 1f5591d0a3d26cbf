"""Quantization-aware fine-tuning: the whole network in int8 within the fidelity gate.

Post-training quantization cannot put the stem and first stage in int8 within the gate: the rounding
of their activations moves too many decisions (research/README.md, "Whole-network int8"). Here a copy
of the fp32 model runs fake-quantised exactly as ONNX Runtime's int8 graph will run it (that graph's
own activation scales and zero points, per-channel int8 weights of the batch-norm-folded
convolutions), and its stem and first stage are fine-tuned to give the fp32 model's logits and
features (distillation: no labels, so the fp32 model stays the reference the gate compares with),
their activation step sizes learned with them. The int8 graph is then built from the tuned weights
and ranges (`ham_hf.finish.int8.tune_int8`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# What is tuned: the modules before the graph's stride passes 4 (the stem and the first stage, where
# post-training rounding costs the agreement): their weights (0.2 M parameters, so the tuned weights
# travel as a small file beside the model instead of a second copy of it) and their activations'
# int8 ranges (learned step sizes, Esser et al. 2020, "LSQ"), which replace the measured ones.
TUNED_MODULES = ("conv1", "bn1", "act1", "maxpool", "layer1")
TUNED_PREFIXES = tuple(f"{m}." for m in TUNED_MODULES)
# Learning rate of the ranges' log step sizes (Adam): up to a few fold over a few hundred steps.
RANGE_LR = 1e-2
# int8 weights are symmetric in [-127, 127] per output channel (ONNX Runtime's QInt8 with symmetric weights).
WEIGHT_QMAX = 127


def module_path(tensor: str) -> str:
    """The timm module an exported tensor comes from: '/layer1/layer1.0/conv1/Conv_output_0' -> 'layer1.0.conv1'.

    The TorchScript exporter names a tensor by its module scopes, each scope by its attribute name
    within its parent ('layer1', then 'layer1.0', 'downsample', 'downsample.0').
    """
    path: list[str] = []
    for scope in tensor.strip("/").split("/")[:-1]:
        if path and scope.startswith(path[-1] + "."):
            path[-1] = scope
        else:
            path.append(scope)
    return ".".join(path)


def activation_quantization(int8_path: str | Path) -> dict[str, tuple[float, int]]:
    """Each activation the int8 graph quantizes, by tensor name: (scale, zero point) as the graph has them."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(int8_path)).graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return {n.input[0]: (float(consts[n.input[1]]), int(consts[n.input[2]]))
            for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in consts}


def shared_quantization(int8_path: str | Path) -> dict[str, str]:
    """{a pooling's output: its input}: ONNX Runtime gives a max or average pooling's output its input's
    scale and zero point, whatever range was measured for it."""
    import onnx

    graph = onnx.load(str(int8_path)).graph
    quantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    source = {n.output[0]: quantized.get(n.input[0]) for n in graph.node if n.op_type == "DequantizeLinear"}
    return {n.output[0]: source[n.input[0]] for n in graph.node
            if n.op_type in ("MaxPool", "AveragePool") and source.get(n.input[0]) and n.output[0] in quantized.values()}


@torch.no_grad()
def folded_pairs(net: nn.Module, size: int) -> dict[str, str]:
    """{convolution: the batch norm reading its output}, found by one forward pass (the export folds each pair)."""
    names = {m: n for n, m in net.named_modules()}
    outputs, pairs, handles = {}, {}, []
    for m in names:
        if isinstance(m, nn.Conv2d):
            # The output itself is kept too, so that its id is not reused by a later tensor.
            handles.append(m.register_forward_hook(lambda m, a, out: outputs.__setitem__(id(out), (names[m], out))))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(
                lambda m, a: pairs.__setitem__(outputs[id(a[0])][0], names[m]) if id(a[0]) in outputs else None))
    try:
        was_training = net.training
        net.eval()(torch.zeros(1, 3, size, size))
        net.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return pairs


def _fake_quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 rounding of a weight, gradient passed straight through."""
    scale = (w.detach().abs().flatten(1).amax(1) / WEIGHT_QMAX).clamp_min(1e-12)
    zero = torch.zeros(len(scale), dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale.float(), zero, 0, -WEIGHT_QMAX, WEIGHT_QMAX)


def _folded_forward(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    """A forward for `conv` computing conv + (frozen) batch norm as one convolution with int8-rounded weights."""
    def forward(self, x):
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * s + (conv.bias * s if conv.bias is not None else 0)
        weight = _fake_quantize_weight(conv.weight * s.view(-1, 1, 1, 1))
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return forward


def _fake_quantize_activation(scale: float, zero: int):
    """A hook rounding a tensor to the graph's uint8 grid (straight-through gradient)."""
    def round_(x):
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)
    return round_


def _learned_activation(scale: float, zero: int, log_factor: torch.Tensor):
    """A hook rounding a tensor to a uint8 grid of learned step scale x exp(log_factor) (LSQ's gradients)."""
    def round_(x):
        step = scale * log_factor.exp()
        v = x / step
        q = torch.clamp(v + (torch.round(v) - v).detach() + zero, 0, 255)  # rounding passed straight through
        return (q - zero) * step
    return round_


def tuned_tensor(tensor: str, every_layer: bool = False) -> bool:
    """Is this graph tensor an activation of the tuned part (TUNED_MODULES, or any layer; not the graph input)?"""
    return tensor != "pixel_values" and (every_layer or module_path(tensor).split(".")[0] in TUNED_MODULES)


@contextlib.contextmanager
def fake_quantized(net: nn.Module, activations: dict[str, tuple[float, int]], pairs: dict[str, str],
                   learned: dict[str, torch.Tensor] | None = None):
    """Run a timm network as the int8 graph runs it, inside the block; the network is as it was after.

    `learned`: log factors on the step sizes of some activations (by tensor name), trained with the weights.
    """
    modules = dict(net.named_modules())
    handles, patched = [], []
    try:
        for conv_name, bn_name in pairs.items():
            conv, bn = modules[conv_name], modules[bn_name]
            conv.forward = types.MethodType(_folded_forward(conv, bn), conv)
            bn.forward = types.MethodType(lambda self, x: x, bn)
            patched += [conv, bn]
        for tensor, (scale, zero) in activations.items():
            round_ = _learned_activation(scale, zero, learned[tensor]) if learned and tensor in learned else \
                _fake_quantize_activation(scale, zero)
            if tensor == "pixel_values":  # the graph's input: rounded where the first convolution reads it
                handles.append(modules["conv1"].register_forward_pre_hook(lambda m, args, r=round_: (r(args[0]),)))
                continue
            path = module_path(tensor)
            if path not in modules:
                raise KeyError(f"the int8 graph quantizes {tensor}, which no module of this network gives")
            handles.append(modules[path].register_forward_hook(lambda m, args, out, r=round_: r(out)))
        yield net
    finally:
        for h in handles:
            h.remove()
        for m in patched:
            del m.forward  # back to the class's forward


def tuned_parameters(net: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters quantization-aware tuning changes (TUNED_MODULES'), by state-dict name."""
    return {n: p for n, p in net.named_parameters() if n.startswith(TUNED_PREFIXES)}


def tune(model, images: torch.Tensor, data_config, activations: dict[str, tuple[float, int]], steps: int,
         batch_size: int = 16, lr: float = 2e-5, feature_weight: float = 0.1, seed: int = 0,
         shared: dict[str, str] | None = None, rest_lr: float = 0.0, labels: torch.Tensor | None = None,
         kl_weight: float = 0.0) -> tuple[dict[str, torch.Tensor], dict[str, tuple[float, int]]]:
    """Fine-tune a copy's stem and first stage, fake-quantised, to give `model`'s logits and features.

    `images` are the model's cached uint8 squares (training images), read at the eval crop with random
    flips; the batch norms keep their statistics (they are folded into the int8 convolutions). The tuned
    part's activation step sizes are learned too, a pooling's tied to its input's (`shared`, from
    `shared_quantization`). Research options (`research/int8_study.py`'s `tunedall` recipes; none helped
    enough to be the product's): `rest_lr` > 0 tunes the rest of the backbone too, at that rate, with every
    activation's step size learned; `labels` draws every class alike; `kl_weight` adds a KL term on the
    probabilities. Returns the tuned tensors by state-dict name of the timm network, and the (scale, zero
    point) of the activations whose step sizes were learned.
    """
    import copy

    from ham_hf import model as model_lib
    from ham_hf.transforms import Preprocess

    teacher = copy.deepcopy(model).float().eval()
    student = copy.deepcopy(model).float().eval()
    net = student.timm_model
    for p in net.parameters():
        p.requires_grad_(False)
    params = tuned_parameters(net)
    head_ids = {id(p) for p in model_lib.head(student).parameters()}
    rest = {n: p for n, p in net.named_parameters() if n not in params and id(p) not in head_ids} if rest_lr else {}
    for p in [*params.values(), *rest.values()]:
        p.requires_grad_(True)
    pairs = folded_pairs(net, data_config.size)
    pre = Preprocess(data_config)
    shared = shared or {}
    learned = {t: torch.zeros((), requires_grad=True) for t in activations
               if tuned_tensor(t, every_layer=bool(rest)) and t not in shared}
    learned.update({out: learned[src] for out, src in shared.items() if src in learned and out in activations})
    opt = torch.optim.Adam([{"params": list(params.values())}, {"params": list(rest.values()), "lr": rest_lr},
                            {"params": list({id(f): f for f in learned.values()}.values()), "lr": RANGE_LR}], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    gen = torch.Generator().manual_seed(seed)
    # With labels, every class is drawn alike: the gate's balanced accuracy weighs the rare classes as the common.
    draw = (1.0 / torch.bincount(labels).float())[labels] if labels is not None else None
    start, running = time.perf_counter(), None
    with fake_quantized(net, activations, pairs, learned):
        for step in range(steps):
            pick = torch.multinomial(draw, batch_size, replacement=True, generator=gen) if draw is not None else \
                torch.randint(len(images), (batch_size,), generator=gen)
            x = pre(images[pick], train=False)
            flips = torch.rand(2, generator=gen) < 0.5
            x = torch.flip(x, dims=[d for d, f in zip((2, 3), flips.tolist()) if f]) if flips.any() else x
            with torch.no_grad():
                t_features, t_logits = model_lib.features_and_logits(teacher, x)
            s_features, s_logits = model_lib.features_and_logits(student, x)
            loss = F.mse_loss(s_logits, t_logits) + \
                feature_weight * F.mse_loss(s_features, t_features) / t_features.square().mean() + \
                kl_weight * F.kl_div(F.log_softmax(s_logits, 1), F.log_softmax(t_logits, 1), log_target=True,
                                     reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            if step % 10 == 0 or step == steps - 1:
                logger.info("int8 tuning step %d/%d: loss %.4f (%.1f images/s)", step + 1, steps, running,
                            (step + 1) * batch_size / (time.perf_counter() - start))
    scales = {t: (float(activations[t][0] * f.detach().exp()), activations[t][1]) for t, f in learned.items()}
    if learned:
        factors = torch.stack([f.detach().exp() for f in learned.values()])
        logger.info("int8 tuning: %d activation ranges learned, step sizes x%.2f to x%.2f", len(learned),
                    factors.min(), factors.max())
    return {n: p.detach().clone() for n, p in {**params, **rest}.items()}, scales


def write_ranges(ranges_path: str | Path, quantization: dict[str, tuple[float, int]]) -> None:
    """Put (scale, zero point) of activations into an ONNX Runtime ranges file, as the range it turns into them.

    ONNX Runtime derives scale = (highest - lowest) / 255 and zero point = round(-lowest / scale), so
    lowest = -zero x scale and highest = (255 - zero) x scale give back exactly these.
    """
    import json

    path = Path(ranges_path)
    table = json.loads(path.read_text())
    for tensor, (scale, zero) in quantization.items():
        entry = table["data"][tensor]
        entry["lowest"]["data"] = [-zero * scale]
        entry["highest"]["data"] = [(255 - zero) * scale]
    path.write_text(json.dumps(table))
