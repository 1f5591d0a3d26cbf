"""A model folder's results record (`results.json`): every figure a step measured, the one source of its card.

Each measuring step replaces the sections it measures, whole: `ham-hf train` writes training, head,
calibration, splits, guard and int8; `ham-hf calibrate` head, calibration, splits, guard and int8
(`--guard_only` the guard, `--int8_only` int8); `ham-hf evaluate` one entry of evaluations, or the
split itself when it scores the model's own validation or test split again. A figure a later step
makes stale is replaced, never kept beside the new one; the card (`ham_hf.hub.card.render`) is
rendered whole from this record each time, never appended to or read back.

Sections:
- training: base_model, dataset, split (how it was made), command, device, precision, epochs,
  runtime_s, images_per_s, settings (the recipe's options), lineage (the fine-tuned folders it came from)
- head: what the classifier head holds folded in: temperature, logit_adjustment_tau, logit_adjustment_max_ece
- calibration: {split: {ece_before, ece_after, brier_before, brier_after}}
- splits: {split: the split's metrics (`ham_hf.metrics.compute`, with CIs, by_dx_type and subgroups)}
- guard: the out-of-distribution guard's figures (version, threshold, probe, leave-one-source-out)
- int8: the int8 fidelity gate's figures (`passed` decides whether int8 is served)
- evaluations: {name: {data, split, command, result, guard_kept}}: other data the model was scored on
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ham_hf.errors import ModelError

FILE = "results.json"
VERSION = 1
# The flat record of earlier versions (the transformers examples' all_results.json), read and converted;
# the int8 gate's figures were a file of their own then.
LEGACY_FILE = "all_results.json"
LEGACY_FILES = (LEGACY_FILE, "int8_fidelity.json")
SECTIONS = ("training", "head", "calibration", "splits", "guard", "int8", "evaluations")
# Sections merged by key (one split, one evaluation replaced); the rest are replaced whole.
KEYED = ("splits", "evaluations")


def empty() -> dict:
    """A record with no results yet."""
    return {"version": VERSION}


def read(path: str | Path) -> dict:
    """The record in a results file; a ModelError naming the step to rerun when it is of another version."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path} ({exc}); rerun `ham-hf calibrate` on the folder to write it again") \
            from None
    version = record.get("version") if isinstance(record, dict) else None
    if version != VERSION:
        newer = isinstance(version, int) and version > VERSION
        raise ModelError(
            f"{path} is a results record of version {version!r}; this ham-hf reads version {VERSION}: "
            + ("upgrade ham-hf (pip install -U ham-hf)" if newer else
               "rerun `ham-hf calibrate --model FOLDER --data DATA` to measure and record it again"))
    return record


def load(folder: str | Path) -> dict:
    """A model folder's record: results.json, else converted from an earlier version's files, else empty."""
    folder = Path(folder)
    if (folder / FILE).is_file():
        return read(folder / FILE)
    if (folder / LEGACY_FILE).is_file():
        return from_legacy(folder)
    return empty()


def update(folder: str | Path, **sections) -> dict:
    """Replace the given sections of a folder's record (keyed ones by key), write it atomically, return it."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown results sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    folder = Path(folder)
    record = load(folder)
    for name, value in sections.items():
        if name in KEYED:
            record[name] = {**record.get(name, {}), **value}
        elif value is None:
            record.pop(name, None)
        else:
            record[name] = value
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / FILE, record)
    for legacy in LEGACY_FILES:  # their figures live in the record now
        (folder / legacy).unlink(missing_ok=True)
    return record


def dumps(record: dict) -> str:
    """A record as the file holds it: JSON, its keys in the order the steps gave them (the card's order)."""
    return json.dumps(record, indent=2, default=_plain) + "\n"


def write(path: str | Path, record: dict) -> Path:
    """Write a record to path atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(dumps(record))
    tmp.replace(path)
    return path


def _plain(value):
    """JSON for numpy scalars and arrays (what metric code returns)."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def head_values(record: dict) -> dict:
    """What the head holds folded in: temperature (1 when none) and logit_adjustment_tau (0 when none)."""
    held = record.get("head", {})
    return {"temperature": float(held.get("temperature", 1.0)),
            "logit_adjustment_tau": float(held.get("logit_adjustment_tau", 0.0))}


# ----------------------------------------------------------------------------- earlier versions


def from_legacy(folder: Path) -> dict:
    """The record of a folder written before results.json: all_results.json's flat keys and the split files."""
    flat = json.loads((folder / LEGACY_FILE).read_text())
    record = empty()
    head = {k: flat[k] for k in ("temperature", "logit_adjustment_tau", "logit_adjustment_max_ece") if k in flat}
    if head:
        record["head"] = head
    calibration = {}
    for prefix, split in (("eval", "validation"), ("test", "test")):
        if f"{prefix}_ece_calibrated" in flat:
            calibration[split] = {f"{m}_{when}": flat[f"{prefix}_{m}_{old}"] for m in ("ece", "brier")
                                  for when, old in (("before", "uncalibrated"), ("after", "calibrated"))}
    if calibration:
        record["calibration"] = calibration
    splits = {s: json.loads((folder / f"{s}_metrics.json").read_text()) for s in ("validation", "test")
              if (folder / f"{s}_metrics.json").is_file()}
    if splits:
        record["splits"] = splits
    guard = {k[len("ood_"):]: v for k, v in flat.items() if k.startswith("ood_")}
    if guard:
        record["guard"] = guard
    if (folder / "int8_fidelity.json").is_file():
        record["int8"] = json.loads((folder / "int8_fidelity.json").read_text())
    if "train_runtime" in flat or "device" in flat:
        record["training"] = legacy_training(folder, flat)
    return record


def legacy_training(folder: Path, flat: dict) -> dict:
    """The training section of an earlier folder: its device, run figures, base model (config) and recipe."""
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    tag = (config.get("pretrained_cfg") or {}).get("tag")
    recipe = folder / "recipe.json"
    return {"base_model": ".".join(filter(None, [config.get("architecture"), tag])) or "unknown",
            "device": flat.get("device"), "precision": flat.get("precision"), "epochs": flat.get("train_epoch"),
            "runtime_s": flat.get("train_runtime"), "images_per_s": flat.get("train_samples_per_second"),
            "settings": json.loads(recipe.read_text()) if recipe.is_file() else {},
            "command": ("ham-hf train recipe.json --data DATA --output_dir OUTPUT --model_name_or_path BASE_MODEL"
                        if recipe.is_file() else None)}
