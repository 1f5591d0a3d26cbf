"""The classifier: a timm model as transformers' `TimmWrapperForImageClassification` with a 7-class head.

The backbone comes from a Hub id (`timm/resnet50.a1_in1k`) or a local timm/Hub folder
(config.json + model.safetensors). Image size, interpolation, mean and std always come from the
model's own pretrained config (`data_config`), never from constants.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ham_hf.errors import ModelError
from ham_hf.labels import CLASS_CODES, LONG_NAMES, id2label, label2id

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class DataConfig:
    """What preprocessing the model expects: eval crop `size` out of a `resize` square, mean/std."""

    size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_model(name_or_path: str, image_size: int | None = None, random_init: bool = False):
    """Load a backbone or a fine-tuned model with the 7 HAM10000 classes as its labels.

    A backbone with another head (ImageNet's 1,000 classes) gets a new 7-class head. `image_size`
    overrides the training/eval resolution recorded in the model's pretrained config. `random_init`
    builds the architecture from config.json alone (speed measurements need no weights).
    """
    from transformers import TimmWrapperForImageClassification

    config = load_config(name_or_path)
    fine_tuned = list(config.id2label.values()) == list(CLASS_CODES)
    if fine_tuned and image_size is None and not random_init:
        return TimmWrapperForImageClassification.from_pretrained(name_or_path)
    # The trap: an ImageNet folder carries 1,000 `label_names`; left in the config they would be
    # saved again and the pipeline would answer LABEL_0..LABEL_6. Replace them with ours.
    config.label_names = list(CLASS_CODES)
    config.label_descriptions = dict(LONG_NAMES)  # not ImageNet's 1,000 descriptions
    config.num_labels = len(CLASS_CODES)
    config.id2label, config.label2id = id2label(), label2id()
    # timm's own save_for_hf records num_classes in model_args too; it would clash with ours. A dict, even
    # empty: saved as null, timm.create_model("hf-hub:..." / "local-dir:...") fails on it.
    config.model_args = {k: v for k, v in (config.model_args or {}).items() if k != "num_classes"}
    if image_size:
        cfg = dict(config.pretrained_cfg or {})
        cfg["input_size"] = (3, image_size, image_size)
        cfg.pop("test_input_size", None)
        config.pretrained_cfg = cfg
    if random_init:
        return TimmWrapperForImageClassification(config)
    model = TimmWrapperForImageClassification.from_pretrained(
        name_or_path, config=config, ignore_mismatched_sizes=not fine_tuned
    )
    if not fine_tuned:
        logger.info("new %d-class head on %s", len(CLASS_CODES), name_or_path)
    return model


def load_config(name_or_path: str):
    """Read a timm model's config from a folder or the Hub; a clear ModelError when it cannot be had."""
    from transformers import TimmWrapperConfig

    try:
        return TimmWrapperConfig.from_pretrained(name_or_path)
    except OSError as exc:
        raise ModelError(
            f"cannot load a model config from {name_or_path!r} ({str(exc).splitlines()[0]}): it is no folder here, "
            "and the Hub has no such repo or cannot be reached. Pass an existing folder with config.json + "
            "model.safetensors, or a Hub id that exists (to train from: --model_name_or_path timm/resnet50.a1_in1k)"
        ) from None


def is_fine_tuned(name_or_path: str) -> bool:
    """Whether a model's config already names the 7 HAM10000 classes in order."""
    return list(load_config(name_or_path).id2label.values()) == list(CLASS_CODES)


def check_fine_tuned(name_or_path: str) -> None:
    """Refuse a model that is not a HAM10000 classifier (an ImageNet backbone, say), naming the fix."""
    if not is_fine_tuned(str(name_or_path)):
        raise ModelError(f"{name_or_path} is not a HAM10000 classifier (its labels are not {', '.join(CLASS_CODES)}); "
                         "fine-tune it first with `ham-hf train`")


def data_config(model) -> DataConfig:
    """Resolve the model's preprocessing (timm's eval transform: resize to size/crop_pct, centre crop)."""
    import timm.data

    # The config's pretrained_cfg is what is saved and what the pipeline's image processor reads.
    cfg = timm.data.resolve_data_config({}, pretrained_cfg=dict(model.config.pretrained_cfg or {}))
    size = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    return DataConfig(
        size=size,
        resize=math.floor(size / crop_pct),
        interpolation=str(cfg.get("interpolation", "bilinear")),
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
    )


def head(model) -> nn.Module:
    """Return the classifier head module of the timm model."""
    return model.timm_model.get_classifier()


def features_and_logits(model, pixel_values):
    """Pooled penultimate features (what the head reads) and the logits, from one forward pass."""
    _, features, logits = forward_all(model, pixel_values)
    return features, logits


# How many of the backbone's stages (the last ones) the guard's texture statistics read.
TEXTURE_STAGES = 4


def forward_all(model, pixel_values, texture: bool = False, texture_fn=None):
    """The last feature map, the pooled features the head reads and the logits (and `texture_statistics`).

    `texture_fn` computes the statistics from the stages' maps instead (the ONNX export names its nodes so).
    """
    net = model.timm_model
    if texture:
        feature_map, stages = net.forward_intermediates(pixel_values, indices=TEXTURE_STAGES)
    else:
        feature_map = net.forward_features(pixel_values)
    features = net.forward_head(feature_map, pre_logits=True)
    outs = (feature_map, features, head(model)(features))
    return (*outs, (texture_fn or texture_statistics)(stages)) if texture else outs


def texture_statistics(maps) -> torch.Tensor:
    """Each stage's per-channel mean and standard deviation over its positions, stage by stage: (N, 2 x channels).

    What the early stages see of texture, scale and lighting, which the pooled last-stage features
    lose (Lee et al. 2018; Pacheco et al. 2020): the guard reads them to tell dermoscopy from other photos.
    """
    out = []
    for m in maps:
        mean = m.mean(dim=(2, 3))
        # E[x^2] - E[x]^2 rather than torch.std: two reductions that ONNX Runtime runs as they are.
        out += [mean, (m.square().mean(dim=(2, 3)) - mean.square()).clamp_min(0).sqrt()]
    return torch.cat(out, dim=1)


def split_parameters(model) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Return (backbone parameters, head parameters)."""
    head_ids = {id(p) for p in head(model).parameters()}
    params = list(model.parameters())
    return [p for p in params if id(p) not in head_ids], [p for p in params if id(p) in head_ids]


def stage_parameters(model, stages: int) -> list[nn.Parameter]:
    """Parameters of the backbone's stem and its first `stages` stages, input side first (0: none)."""
    if stages == 0:
        return []
    net = model.timm_model
    matcher = getattr(net, "group_matcher", None)
    if matcher is None:
        raise ModelError(f"{type(net).__name__} does not name its stages (no timm group_matcher): "
                         "train it with --frozen_stages 0")
    from timm.models import group_parameters

    head_ids = {id(p) for p in head(model).parameters()}
    # timm's coarse groups run from the input: the stem, then one group per stage; the head is left out.
    groups = [[p for p in g if id(p) not in head_ids]
              for g in group_parameters(net, matcher(coarse=True), return_values=True).values()]
    groups = [g for g in groups if g]
    if not 0 <= stages < len(groups):
        raise ModelError(f"--frozen_stages must be 0 to {len(groups) - 1} for {type(net).__name__} "
                         f"(the stem and its {len(groups) - 1} stages; got {stages})")
    return [p for g in groups[: stages + 1] for p in g]


def norm_layers(model, parameters) -> list[nn.Module]:
    """The backbone's normalisation layers whose weights are among `parameters`."""
    ids = {id(p) for p in parameters}
    return [m for m in model.timm_model.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and getattr(m, "weight", None) is not None
            and id(m.weight) in ids]


def set_trainable(parameters, trainable: bool) -> None:
    """Freeze or unfreeze `parameters`."""
    for p in parameters:
        p.requires_grad_(trainable)
