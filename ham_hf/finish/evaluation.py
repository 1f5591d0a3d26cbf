"""Score a saved model on any data: one forward pass over decoded images, then the split reports.

    ham-hf evaluate --model outputs/ham10000-resnet50 --data data/ham10000 --split test
    ham-hf evaluate --model DIR --data /path/to/isic2018 --split all --output eval-isic

The forward pass is the model's own eval preprocessing (the pipeline's), under bf16 autocast where
the hardware runs it natively; the reports are the ones training writes (metrics with 95% lesion
bootstrap intervals, confusion matrix, reliability diagram, per-class table, predictions).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ham_hf import data, metrics, precision
from ham_hf import model as model_lib
from ham_hf.errors import ModelError
from ham_hf.finish import report
from ham_hf.labels import CLASS_CODES
from ham_hf.transforms import TTA_VIEWS, CachedImages, Preprocess, cache_split, tta_views

logger = logging.getLogger(__name__)


@torch.inference_mode()
def embed(model, images: CachedImages | torch.Tensor, data_config: model_lib.DataConfig, batch_size: int = 64,
          bf16: bool = False, tta: bool = False, texture: bool = False) -> tuple[np.ndarray, ...]:
    """(features, logits[, texture]) of decoded uint8 images through the model's eval preprocessing, float32 numpy.

    With `tta`, as the app's test-time augmentation: the logits are the log of the probabilities
    averaged over the 8 flip / rotation views, the features those of the image as given. With
    `texture`, the stages' texture statistics too (`ham_hf.model.texture_statistics`; not with `tta`).
    """
    device = next(model.parameters()).device
    tensors = images.images if isinstance(images, CachedImages) else images
    pre = Preprocess(data_config).to(device)
    step = max(1, batch_size // TTA_VIEWS) if tta else batch_size  # the same images per forward pass
    feats, logits, textures = [], [], []
    model.eval()
    for start in range(0, len(tensors), step):
        x = pre(tensors[start:start + step].to(device), train=False)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            _, f, z, *t = model_lib.forward_all(model, tta_views(x) if tta else x, texture=texture and not tta)
        if tta:
            f, z = f[:len(x)], z.float().softmax(dim=1).view(TTA_VIEWS, len(x), -1).mean(dim=0).log()
        feats.append(f.float().cpu())
        logits.append(z.float().cpu())
        textures += [t[0].float().cpu()] if t else []
    outs = (torch.cat(feats).numpy(), torch.cat(logits).numpy())
    return (*outs, torch.cat(textures).numpy()) if texture else outs


def evaluate_model(model_path: str, source: str, split: str = "test", output: str | None = None,
                   split_args: data.SplitArguments | None = None, batch_size: int = 128,
                   bf16: bool | None = None, tta: bool = False) -> dict:
    """Score a saved HAM10000 model on one split (or all) of any data source; write the split reports."""
    import datasets

    if not model_lib.is_fine_tuned(model_path):
        raise ModelError(f"{model_path} is not a HAM10000 classifier (its labels are not {', '.join(CLASS_CODES)}); "
                         "fine-tune it first with `ham-hf train`")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model_lib.load_model(model_path).float().eval().to(device).to(memory_format=torch.channels_last)
    dc = model_lib.data_config(model)
    dsd = data.load_splits(source, split_args)
    if split == "all":
        ds = datasets.concatenate_datasets([dsd[s] for s in data.SPLITS if len(dsd[s])])
    elif split in dsd:
        ds = dsd[split]
    else:
        raise data.DataError(f"no split {split!r} in {source}; choose one of {', '.join([*dsd, 'all'])}")
    bf16 = precision.use_bf16(device, bf16)
    cached = cache_split(ds, dc)
    features, logits = embed(model, cached, dc, batch_size=batch_size, bf16=bf16, tta=tta)
    name = f"eval-{split}-tta" if tta else f"eval-{split}"
    out = Path(output) if output else (Path(model_path) if Path(model_path).is_dir() else Path(".")) / name
    result = report.write_split_reports(out, split, metrics.softmax(logits), cached.labels.numpy(), cached.image_ids,
                                        cached.groups, cached.dx_types)
    report.update_all_results(out, {f"{split}_{k}": v for k, v in metrics.flatten(result).items()})
    report.update_all_results(out, {"precision": precision.name(bf16), "device": str(device),
                                    "test_time_augmentation": tta})
    report.update_all_results(out, guard_figures(model_path, features, cached, split))
    return result


def guard_figures(model_path: str, features: np.ndarray, cached: CachedImages, split: str) -> dict:
    """The share of the scored images the model's out-of-distribution guard keeps, where it has one."""
    from ham_hf.serve import ood

    path = ood.guard_path(model_path)
    if not path.is_file():
        return {}
    colours = np.stack([ood.colour_stats(im.numpy()) for im in cached.images])
    kept = ood.Guard.load(path).judge(features, colours)[0]
    logger.info("the guard keeps %d of %d images (%.1f%%)", kept.sum(), len(kept), 100 * kept.mean())
    return {f"{split}_guard_kept": float(kept.mean())}
