"""Score a saved model on any data: one forward pass over decoded images, then the split reports.

    ham-hf evaluate --model outputs/ham10000-resnet50 --data data/ham10000 --split test
    ham-hf evaluate --model DIR --data /path/to/isic2018 --split all --output eval-isic

The forward pass is the model's own eval preprocessing (the pipeline's), under bf16 autocast where
the hardware runs it natively; the reports are the ones training writes (metrics with 95% lesion
bootstrap intervals, confusion matrix, reliability diagram, per-class table, predictions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ham_hf import data, metrics, precision, results
from ham_hf import model as model_lib
from ham_hf.finish import report
from ham_hf.hub import card
from ham_hf.transforms import TTA_VIEWS, CachedImages, Preprocess, cache_split, tta_views

logger = logging.getLogger(__name__)


@torch.inference_mode()
def embed(model, images: CachedImages | torch.Tensor, data_config: model_lib.DataConfig, batch_size: int = 64,
          bf16: bool = False, tta: bool = False, texture: bool = False) -> tuple[np.ndarray, ...]:
    """(features, logits[, texture]) of decoded uint8 images through the model's eval preprocessing, float32 numpy.

    With `tta`, as the app's test-time augmentation: the logits are the log of the probabilities
    averaged over the 8 flip / rotation views, the features (and texture) those of the image as given.
    With `texture`, the stages' texture statistics too (`ham_hf.model.texture_statistics`).
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
            _, f, z, *t = model_lib.forward_all(model, tta_views(x) if tta else x, texture=texture)
        if tta:  # the first view is the image as given
            f, z = f[:len(x)], z.float().softmax(dim=1).view(TTA_VIEWS, len(x), -1).mean(dim=0).log()
            t = [t[0][:len(x)]] if t else t
        feats.append(f.float().cpu())
        logits.append(z.float().cpu())
        textures += [t[0].float().cpu()] if t else []
    outs = (torch.cat(feats).numpy(), torch.cat(logits).numpy())
    return (*outs, torch.cat(textures).numpy()) if texture else outs


@dataclass
class EvaluateArguments:
    """Options of `ham-hf evaluate`."""

    model: str = field(metadata={"help": "Model folder or Hub id to score."})
    data: str = field(metadata={"help": "Prepared dataset folder, raw folder or Hub dataset id."})
    split: str = field(default="test", metadata={"help": "Split to score: train, validation, test or all."})
    output_dir: str | None = field(default=None, metadata={"help": "Report folder (default: MODEL/eval-SPLIT).",
                                                           "aliases": ["--output"]})
    batch_size: int = field(default=128, metadata={"help": "Images per forward pass."})
    tta: bool = field(default=False, metadata={"help": "Average the probabilities over the 8 flip / rotation views, "
                                                       "as the app's test-time augmentation does."})
    record: bool = field(default=True, metadata={
        "help": "For a local model folder: put the figures in its results record and render its card again (the "
                "model's own validation or test split replaces that split's figures; other data is an entry named "
                "--source_name)."})
    source_name: str | None = field(default=None, metadata={"help": "How the record and card name the data "
                                                                     "(default: the data folder's name)."})


def evaluate_model(model_path: str, source: str, split: str = "test", output: str | None = None,
                   split_args: data.SplitArguments | None = None, batch_size: int = 128,
                   bf16: bool | None = None, tta: bool = False, record: bool = True,
                   source_name: str | None = None) -> dict:
    """Score a saved HAM10000 model on one split (or all) of any data source; write the split reports.

    With `record` and a local model folder, the figures go into the folder's results record and its
    card is rendered again: the model's own validation or test split (the images its split.csv puts
    there, without TTA) replaces that split's figures; anything else is an entry of its evaluations,
    named `source_name` (default: the data folder's name, with the split and TTA said).
    """
    import datasets

    model_lib.check_fine_tuned(model_path)
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
    features, logits, texture = embed(model, cached, dc, batch_size=batch_size, bf16=bf16, tta=tta, texture=True)
    folder = Path(model_path) if record and Path(model_path).is_dir() else None
    own = folder is not None and is_own_split(folder, split, tta, cached.image_ids)
    if own and output:
        logger.info("--output_dir given: the model's own %s split is scored there, its record left as it is", split)
        folder = None
    name = f"eval-{split}-tta" if tta else f"eval-{split}"
    # The model's own split replaces its reports beside the model, as its record's figures are replaced.
    out = Path(output) if output else folder if own else (
        Path(model_path) if Path(model_path).is_dir() else Path(".")) / name
    result = report.write_split_reports(out, split, metrics.softmax(logits), cached.labels.numpy(), cached.image_ids,
                                        cached.groups, cached.metadata)
    if own and folder is not None:
        results.update(folder, splits={split: result})
        logger.info("the model's own %s split: its figures in %s replaced", split, results.FILE)
    else:
        name, entry = evaluation_entry(source, split, tta, result, guard_kept(model_path, features, texture, cached),
                                       source_name, precision.name(bf16), precision.device_name(device.type == "cpu"))
        for where in filter(None, {out, folder}):  # the report folder's record, and the model's
            results.update(where, evaluations={name: entry})
        logger.info("recorded as %r in %s", name, results.FILE)
    if folder is not None:
        card.render(folder)
    return result


def is_own_split(folder: Path, split: str, tta: bool, image_ids) -> bool:
    """Whether these images are the model's own validation or test split (its split.csv), scored without TTA."""
    path = folder / data.SPLIT_FILE
    return split in ("validation", "test") and not tta and path.is_file() and \
        set(image_ids) == data.read_split_file(path, split)


def evaluation_entry(source: str, split: str, tta: bool, result: dict, kept: float | None, source_name: str | None,
                     precision_name: str, device: str) -> tuple[str, dict]:
    """(name, entry) of figures on other data for a record's evaluations: the command, precision and figures."""
    import shlex

    name = source_name or " ".join(filter(None, [Path(source).name, f"({split} split)" if split != "all" else "",
                                                 "with TTA" if tta else ""]))
    command = shlex.join(["ham-hf", "evaluate", "--model", "MODEL", "--data", Path(source).name, "--split", split,
                          *(["--tta", "true"] if tta else [])])
    return name, {"data": Path(source).name, "split": split, "tta": tta, "command": command,
                  "precision": precision_name, "device": device, "result": result, "guard_kept": kept}


def guard_kept(model_path: str, features: np.ndarray, texture: np.ndarray, cached: CachedImages) -> float | None:
    """The share of the scored images the model's out-of-distribution guard keeps, its probe included (None
    without a guard)."""
    from ham_hf.serve import guard as guard_lib

    path = guard_lib.guard_path(model_path)
    if not path.is_file():
        return None
    colours = guard_lib.colour_stats(cached.images.numpy())
    kept = guard_lib.Guard.load(path).judge(features, colours, texture=texture)[0]
    logger.info("the guard keeps %d of %d images (%.1f%%)", kept.sum(), len(kept), 100 * kept.mean())
    return float(kept.mean())


def run(args: EvaluateArguments, split_args: data.SplitArguments) -> dict:
    """`ham-hf evaluate` with its parsed options."""
    return evaluate_model(args.model, args.data, args.split, args.output_dir, split_args, args.batch_size,
                          tta=args.tta, record=args.record, source_name=args.source_name)
