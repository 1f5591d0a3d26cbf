"""Temperature scaling, fitted on validation and folded into the classifier head.

    ham-hf calibrate --model models/ham10000-resnet50 --data data/ham10000

The head's weight and bias are divided by T, so `pipeline("image-classification")`, the app, ONNX
and `ham-hf predict` all give calibrated probabilities with no custom code, and the argmax never
moves (T > 0 rescales every logit of an image alike). The same command (re)fits the model's
out-of-distribution guard (`ham_hf.finish.guard`) on the training split.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ham_hf import data, head, metrics, precision, results
from ham_hf import model as model_lib
from ham_hf.errors import DataError, ModelError, UserError
from ham_hf.finish import report
from ham_hf.finish.evaluation import embed
from ham_hf.finish.guard import evaluate_guard, fit_guard
from ham_hf.finish.int8 import INT8_TUNING_STEPS, fit_int8
from ham_hf.labels import CLASS_CODES
from ham_hf.serve import guard as guard_lib
from ham_hf.transforms import CachedImages, cache_split

logger = logging.getLogger(__name__)

TEMPERATURE_BOUNDS = (0.05, 20.0)
# Re-calibrating a calibrated model: a refit within this factor of the folded temperature keeps the
# head as it is (the ECE moves in the fourth decimal, and 47 MB of weights are not rewritten for it).
TEMPERATURE_TOLERANCE = 1.02


def fit_temperature(logits: np.ndarray, labels: np.ndarray, objective: str = "brier") -> float:
    """The T > 0 minimising the Brier score (or the negative log-likelihood) of softmax(logits / T).

    Temperature scaling (Guo et al., 2017) is usually fitted by likelihood. Here the decision rule is
    logit-adjusted for the class prior, so one temperature cannot calibrate every class at once, and
    the likelihood's optimum favours the tail classes over the top probability a user reads; the Brier
    score, also a proper score, weighs them as the user does (research/README.md, "Temperature objective").
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax, softmax

    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    onehot = np.eye(z.shape[1])[y]

    def loss(log_t: float) -> float:
        if objective == "nll":
            return -log_softmax(z / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean()
        return ((softmax(z / np.exp(log_t), axis=1) - onehot) ** 2).sum(axis=1).mean()

    if objective not in ("brier", "nll"):
        raise ValueError(f"unknown calibration objective {objective!r}: brier or nll")
    bounds = tuple(np.log(TEMPERATURE_BOUNDS))
    return float(np.exp(minimize_scalar(loss, bounds=bounds, method="bounded", options={"xatol": 1e-4}).x))


# The taus that logit-adjustment tuning tries: coarse, so one validation split cannot over-fit it.
TAU_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
# The calibration goal (validation ECE after temperature scaling) a tuned tau must meet.
MAX_ECE = 0.05


def tau_scores(raw: np.ndarray, labels: np.ndarray, prior: np.ndarray, tau: float) -> dict:
    """Validation metrics of the decision raw - tau x log(prior), after its own temperature fit."""
    adjusted = np.asarray(raw, dtype=np.float64) - tau * np.asarray(prior, dtype=np.float64)
    temperature = fit_temperature(adjusted, labels)
    return {"temperature": temperature, **metrics.compute(metrics.softmax(adjusted / temperature), labels)}


def choose_tau(raw: np.ndarray, labels: np.ndarray, prior: np.ndarray, grid: tuple[float, ...] = TAU_GRID,
               max_ece: float = MAX_ECE) -> tuple[float, dict[float, dict]]:
    """The tau of `grid` with the best validation balanced accuracy among those calibrated to `max_ece`.

    Subtracting tau x log(prior) trades the frequent class for the rare ones; with a large tau the
    probabilities are no longer frequencies and no temperature repairs that, so a tau qualifies only
    when its calibrated validation ECE meets `max_ece`. Ties go to the smaller tau (more accuracy);
    when no tau qualifies the condition is dropped, with a warning. Returns (tau, {tau: scores}).
    """
    labels = np.asarray(labels)
    table = {tau: tau_scores(raw, labels, prior, tau) for tau in grid}
    calibrated = [tau for tau in grid if table[tau]["ece"] <= max_ece]
    if not calibrated:
        logger.warning("no tau of %s brings the calibrated validation ECE to %.3f or below: choosing by balanced "
                       "accuracy alone", grid, max_ece)
    tau = max(calibrated or grid, key=lambda t: (round(table[t]["balanced_accuracy"], 9), -t))
    logger.info("logit adjustment on validation (tau: balanced accuracy / calibrated ECE): %s; chosen tau %.2f",
                ", ".join(f"{t:g}: {table[t]['balanced_accuracy']:.4f} / {table[t]['ece']:.4f}" for t in grid), tau)
    return tau, table


def check_calibration_split(labels: np.ndarray, split: str = "validation") -> None:
    """Refuse a split that lacks a class: a temperature fitted without it would not hold for it."""
    missing = [c for i, c in enumerate(CLASS_CODES) if not (np.asarray(labels) == i).any()]
    if missing:
        raise DataError(f"the {split} split has no image of {', '.join(missing)}: calibration needs every class; "
                        "use a larger validation fraction (--validation_fraction) or the full data")


def check_same_split(dsd, split_file: Path) -> None:
    """Refuse data split otherwise than the model's own split.csv says (its validation would be trained on)."""
    if not split_file.is_file():
        logger.warning("no %s beside the model: cannot check that validation was held out in training", split_file.name)
        return
    expected = data.read_split_file(split_file, "validation")
    got = set(dsd["validation"]["image_id"])
    if got != expected:
        raise DataError(f"the validation split of this data ({len(got)} images) is not the one in {split_file} "
                        f"({len(expected)}): calibrate on the data and split options (--split_seed, fractions) the "
                        "model was trained with")


def calibrate_model(model, data_config, cached: dict[str, CachedImages], output_dir: Path, bf16: bool = False,
                    train_sample: int = 3000, seed: int = 0, write: bool = True, write_reports: bool = False,
                    int8: bool = True, folded_temperature: float = 1.0, guard_negatives: str | None = None,
                    guard_positives: str | None = None, int8_tuning_steps: int = INT8_TUNING_STEPS) -> dict:
    """Fit T on validation and fold it into the head; fit the OOD guard and int8; write reports; return sections.

    `folded_temperature` is the T already in the head (a calibrated model's record): T is fitted on
    the unfolded logits, so "before" always means uncalibrated and the recorded T is the head's whole
    temperature; `head_changed` in the returned dict says whether the head was rescaled.

    `cached` needs "train" and "validation" (and scores "test" when present). Writes into output_dir
    (unless `write` is false, as on all but one process of a distributed run):
    `{split}_reliability_uncalibrated.png`, the guard file, and with `write_reports` the calibrated
    split reports (metrics with CIs, confusion matrix, reliability, predictions); the caller saves the
    model. Returns {"head": {temperature}, "calibration", "guard", "int8", "splits" (with
    write_reports), "head_changed"}: sections of the results record (`ham_hf.results`).
    """
    if "validation" not in cached or "train" not in cached:
        raise DataError("calibration needs the train and validation splits of the data the model was trained on")
    check_calibration_split(cached["validation"].labels.numpy())
    if write:
        output_dir.mkdir(parents=True, exist_ok=True)
    val_features, val_logits, val_texture = embed(model, cached["validation"], data_config, bf16=bf16, texture=True)
    val_logits = val_logits * folded_temperature  # the head's logits before any calibration
    labels = cached["validation"].labels.numpy()
    temperature = fit_temperature(val_logits, labels)
    head_changed = not 1 / TEMPERATURE_TOLERANCE < temperature / folded_temperature < TEMPERATURE_TOLERANCE
    temperature = temperature if head_changed else folded_temperature
    sections: dict = {"head": {"temperature": temperature}, "calibration": {}, "head_changed": head_changed}
    for split in ("validation", "test"):
        if split not in cached:
            continue
        logits = val_logits if split == "validation" else (
            embed(model, cached[split], data_config, bf16=bf16)[1] * folded_temperature)
        y = cached[split].labels.numpy()
        before, after = metrics.softmax(logits), metrics.softmax(logits / temperature)
        b, a = metrics.compute(before, y), metrics.compute(after, y)
        sections["calibration"][split] = {"ece_before": b["ece"], "ece_after": a["ece"],
                                          "brier_before": b["brier"], "brier_after": a["brier"]}
        if write:
            report.plot_reliability(before, y, output_dir / f"{split}_reliability_uncalibrated.png",
                                    title=f"{split}, before calibration: ECE {b['ece']:.3f}")
        if write and write_reports:
            sections.setdefault("splits", {})[split] = report.write_split_reports(
                output_dir, split, after, y, cached[split].image_ids, cached[split].groups, cached[split].metadata)
        assert (before.argmax(1) == after.argmax(1)).all()  # T > 0 cannot move the argmax
    if head_changed:
        head.scale_head(model, folded_temperature / temperature)
    ece = sections["calibration"]["validation"]
    logger.info("temperature %.3f %s; validation ECE %.4f -> %.4f", temperature,
                "folded into the head" if head_changed else "already in the head (refit within 2%: kept)",
                ece["ece_before"], ece["ece_after"])

    guard, figures = refit_guard(model, data_config, cached, val_features, bf16, train_sample, seed,
                                 guard_negatives, guard_positives, val_texture)
    if write:
        guard.save(output_dir / guard_lib.GUARD_FILE)
        fidelity = fit_int8(model, data_config, cached, output_dir, guard, tuning_steps=int8_tuning_steps,
                            guard_negatives=guard_negatives, guard_positives=guard_positives) if int8 else {}
        if fidelity:
            sections["int8"] = fidelity
    sections["guard"] = {**figures, **evaluate_guard(guard, _features_of(model, data_config, bf16), data_config,
                                                     val_features, output_dir if write else None,
                                                     colours_of=_colours)}
    return sections


def _features_of(model, data_config, bf16: bool):
    """images -> (features, texture statistics), as Guard.evaluate reads them."""
    return lambda images: embed(model, images, data_config, bf16=bf16, texture=True)[::2]


def _colours(images) -> np.ndarray:
    """Colour statistics of decoded uint8 images (the guard's probe reads them)."""
    return guard_lib.colour_stats((images.images if isinstance(images, CachedImages) else images).numpy())


def refit_guard(model, data_config, cached: dict[str, CachedImages], val_features: np.ndarray, bf16: bool,
                train_sample: int = 3000, seed: int = 0, negatives: str | None = None,
                positives: str | None = None, val_texture: np.ndarray | None = None) -> tuple[guard_lib.Guard, dict]:
    """Fit the guard on (a seeded sample of) train: features do not change with calibration."""
    train = cached["train"]
    if len(train) > train_sample:
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:train_sample]
        train = CachedImages(train.images[pick], train.labels[pick])
    return fit_guard(model, data_config, train, cached["validation"], val_features, bf16, negatives, positives,
                     val_texture)


def retune_logit_adjustment(model, data_config, cached: dict[str, CachedImages], model_dir: Path, bf16: bool,
                            max_ece: float = MAX_ECE) -> tuple[dict, float]:
    """Re-choose a saved model's logit-adjustment tau on validation (`choose_tau`) and refold its head.

    Returns (the results to record, the temperature now folded in the head): the head is unfolded to
    its bare logits minus the new tau's offset (T 1, for calibration to fit) unless tau stays.
    """
    saved = results.load(model_dir).get("head", {})
    if "logit_adjustment_tau" not in saved:
        raise ModelError(f"{model_dir} was not trained with logit adjustment (no logit_adjustment_tau in its "
                         f"{results.FILE}): there is no tau to retune; drop --retune_logit_adjustment")
    check_calibration_split(cached["validation"].labels.numpy())
    old_tau, old_t = float(saved["logit_adjustment_tau"]), head.head_temperature(model_dir)
    prior = head.log_prior(cached["train"].labels).double().numpy()
    raw = head.unfold_logits(embed(model, cached["validation"], data_config, bf16=bf16)[1], old_t, old_tau, prior)
    tau, _ = choose_tau(raw, cached["validation"].labels.numpy(), prior, max_ece=max_ece)
    chosen = {"logit_adjustment_tau": tau, "logit_adjustment_max_ece": max_ece}
    if tau == old_tau:
        return chosen, old_t
    head.unfold_head(model, model_dir, torch.from_numpy(prior))
    head.add_to_head_bias(model, torch.from_numpy(-tau * prior).float())
    logger.info("logit adjustment: tau %.2f -> %.2f refolded into the head bias", old_tau, tau)
    return chosen, 1.0


@dataclass
class CalibrateArguments:
    """Options of `ham-hf calibrate`."""

    model: str = field(metadata={"help": "Model folder written by ham-hf train (or bundled)."})
    data: str = field(metadata={"help": "The data it was trained on: prepared folder, raw folder or Hub dataset id."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Write the calibrated folder here (default: in place).", "aliases": ["--output"]})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast for the forward passes (default: where "
                                                              "the CPU runs it natively)."})
    int8_only: bool = field(default=False, metadata={
        "help": "Refit only the int8 files (ranges, tuned weights) and fidelity record; weights, temperature and "
                "guard stay."})
    int8_tuning_steps: int = field(default=INT8_TUNING_STEPS, metadata={
        "help": "Quantization-aware tuning of the int8 graph's stem and first stage, in steps of 16 training images "
                "(about 18 minutes on 2 CPU cores for the default); 0: post-training int8 with them left float."})
    retune_logit_adjustment: bool = field(default=False, metadata={
        "help": "For a model trained with logit adjustment: choose its tau again on validation (0, 0.25, ..., 1: "
                "the best balanced accuracy among the taus calibrated to --logit_adjustment_max_ece) before "
                "calibrating, and refold the head."})
    logit_adjustment_max_ece: float | None = field(default=None, metadata={
        "help": "With --retune_logit_adjustment: the calibrated validation ECE a tau must meet (default: the "
                "calibration goal, 0.05; 1: no condition)."})
    guard_negatives: str | None = field(default=None, metadata={
        "help": "Real non-dermoscopic images for the guard's kind probe: folders (comma-separated) with a "
                "metadata.csv of file,category (everyday, skin_clinical, document, medical) and where each image "
                "came from (source, source_dataset or source_repo). Figures are leave-one-source-out."})
    guard_positives: str | None = field(default=None, metadata={
        "help": "Dermoscopic images from other sources for the kind probe: folders (comma-separated) with a "
                "metadata.csv of file,dx (and a source column, else the file name's prefix names the source)."})
    guard_only: bool = field(default=False, metadata={
        "help": "Refit only the out-of-distribution guard; weights, temperature, reports and int8 stay."})

    def __post_init__(self):
        if self.logit_adjustment_max_ece is not None and not 0 < self.logit_adjustment_max_ece <= 1:
            raise UserError(f"--logit_adjustment_max_ece must be in (0, 1] (got {self.logit_adjustment_max_ece})")
        if (self.int8_only or self.guard_only) and self.retune_logit_adjustment:
            raise UserError("--int8_only and --guard_only keep the weights: drop --retune_logit_adjustment")
        if self.int8_only and self.guard_only:
            raise UserError("--int8_only and --guard_only each refit one part: pass one of them")
        if self.int8_tuning_steps < 0:
            raise UserError(f"--int8_tuning_steps must be 0 or more (got {self.int8_tuning_steps})")


def calibrate(model_path: str, source: str, output: str | None = None, split_args: data.SplitArguments | None = None,
              bf16: bool | None = None, int8_only: bool = False, retune_tau: bool = False,
              max_ece: float | None = None, cached: dict[str, CachedImages] | None = None,
              guard_only: bool = False, guard_negatives: str | None = None, guard_positives: str | None = None,
              int8_tuning_steps: int = INT8_TUNING_STEPS) -> dict:
    """`ham-hf calibrate`: calibrate a saved model (and fit its guard) on the split it was trained with.

    With `int8_only`, only the int8 ranges and fidelity record are refitted (after an ONNX Runtime
    or int8 recipe change): weights, temperature and guard stay as they are. With `retune_tau`, a
    logit-adjusted model's tau is chosen again first (`retune_logit_adjustment`). Everything is written
    to a staging copy first and swapped in at the end: a failure leaves the model folder as it was.
    `cached`: the splits already decoded at the model's resolution by a caller that checked them.
    """
    from ham_hf.hub import card
    from ham_hf.serve import export

    model_lib.check_fine_tuned(model_path)
    src = Path(model_path)
    if not src.is_dir():
        raise ModelError(f"{model_path} is not a local model folder; download it first (huggingface-cli download)")
    target = Path(output) if output else src
    model = model_lib.load_model(model_path)
    model = model.float().eval().to(memory_format=torch.channels_last)
    dc = model_lib.data_config(model)
    if cached is None:
        dsd = data.load_splits(source, split_args)
        check_same_split(dsd, src / data.SPLIT_FILE)
        splits = ("train", "validation") if int8_only or guard_only else data.SPLITS
        cached = {name: cache_split(dsd[name], dc) for name in splits if len(dsd[name])}
    bf16 = precision.use_bf16("cpu", bf16)
    with tempfile.TemporaryDirectory(dir=target.parent if target.parent.exists() else None) as tmp:
        stage = Path(tmp) / "stage"
        shutil.copytree(src, stage)
        if guard_only:  # the guard alone: weights, temperature, reports and int8 ranges stay as they are
            val_features, _, val_texture = embed(model, cached["validation"], dc, bf16=bf16, texture=True)
            guard, figures = refit_guard(model, dc, cached, val_features, bf16, negatives=guard_negatives,
                                         positives=guard_positives, val_texture=val_texture)
            guard.save(stage / guard_lib.GUARD_FILE)
            report_figures = evaluate_guard(guard, _features_of(model, dc, bf16), dc, val_features, stage,
                                            colours_of=_colours)
            sections = {"guard": {**figures, **report_figures}}
        elif int8_only:
            guard = guard_lib.Guard.load(src / guard_lib.GUARD_FILE) if (src / guard_lib.GUARD_FILE).is_file() else None
            figures = fit_int8(model, dc, cached, stage, guard, tuning_steps=int8_tuning_steps,
                               guard_negatives=guard_negatives, guard_positives=guard_positives)
            sections = {"int8": figures} if figures else {}  # int8 not measurable here: the record stays
        else:
            tau_results, folded = ({}, head.head_temperature(src)) if not retune_tau else (
                retune_logit_adjustment(model, dc, cached, src, bf16, max_ece or MAX_ECE))
            sections = calibrate_model(model, dc, cached, stage, bf16=bf16, write_reports=True,
                                       folded_temperature=folded, guard_negatives=guard_negatives,
                                       guard_positives=guard_positives, int8_tuning_steps=int8_tuning_steps)
            # The head's record: the tau folded before (or just chosen) beside the temperature now in it.
            kept = {k: v for k, v in results.load(src).get("head", {}).items() if k != "temperature"}
            sections["head"] = {**kept, **tau_results, **sections["head"]}
            if sections.pop("head_changed"):
                export.save_weights_like(model, src / "model.safetensors", stage / "model.safetensors")
        results.update(stage, **sections)
        card.render(stage)
        if target.exists() and target != src:
            shutil.rmtree(target)
        if target == src:
            backup = Path(tmp) / "previous"
            src.rename(backup)
        stage.rename(target)
    logger.info("calibrated model and guard in %s", target)
    return sections


def run(args: CalibrateArguments, split_args: data.SplitArguments) -> dict:
    """`ham-hf calibrate` with its parsed options."""
    return calibrate(args.model, args.data, args.output_dir, split_args, args.bf16, args.int8_only,
                     args.retune_logit_adjustment, args.logit_adjustment_max_ece, guard_only=args.guard_only,
                     guard_negatives=args.guard_negatives, guard_positives=args.guard_positives,
                     int8_tuning_steps=args.int8_tuning_steps)
