"""Fine-tune a timm model on HAM10000 through the transformers Trainer (Accelerate underneath).

    ham-hf train configs/default-model.json --data data/ham10000 --output_dir outputs/resnet50
    accelerate launch -m ham_hf.cli train --data data/ham10000 --output_dir outputs/resnet50   # several GPUs
    ham-hf train config.json                                                                # all options from JSON

Recipe: head only for `--freeze_backbone_epochs`, then the whole network with the backbone at
`--backbone_lr_multiplier` times the head's learning rate; AdamW with warm-up and a cosine
schedule; cross-entropy (class-weighted with `--class_weighting`, or a logit-adjusted decision with
`--logit_adjustment_tau`, as the default recipe); augmentation on the device; the checkpoint with the best
validation balanced accuracy is kept, and the test split is scored once, at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from transformers import set_seed

from ham_hf import data, hub, metrics, precision
from ham_hf import model as model_lib
from ham_hf import results as results_lib
from ham_hf.errors import DataError, UserError
from ham_hf.finish import report
from ham_hf.head import log_prior, unfold_head
from ham_hf.hub import card
from ham_hf.labels import CLASS_CODES
from ham_hf.train.arguments import DataArguments, HamTrainingArguments, ModelArguments, RecipeArguments
from ham_hf.train.trainer import HamTrainer, Teachers, class_weights
from ham_hf.transforms import AugmentArguments, CachedImages, Preprocess, cache_split

logger = logging.getLogger(__name__)


# Options that say where a run reads and writes or how it logs, not how it trains: left out of its recipe.
RUN_OPTIONS = frozenset({
    "data", "output_dir", "model_name_or_path", "decode_threads", "disable_tqdm", "logging_steps", "logging_dir",
    "report_to", "save_total_limit", "save_only_model", "push_to_hub", "hub_model_id", "hub_private_repo",
    "resume_from_checkpoint", "overwrite_output_dir", "calibrate_int8", "dataloader_num_workers",
    "dataloader_persistent_workers", "dataloader_pin_memory", "use_cpu", "ddp_backend", "ddp_find_unused_parameters",
})


def write_recipe(options: dict, path: Path) -> Path:
    """Write the recipe a run was given (its options less RUN_OPTIONS) as a config `ham-hf train` takes."""
    recipe = {k: v for k, v in options.items() if k not in RUN_OPTIONS}
    path.write_text(json.dumps(recipe, indent=2, default=str) + "\n")
    return path


def resolve_precision(args: HamTrainingArguments) -> HamTrainingArguments:
    """Settle --bf16 by the precision rule: automatic (None) means bf16 where the GPU or the CPU runs it natively."""
    if args.bf16 is None:
        device = "cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu"
        args = dataclasses.replace(args, bf16=precision.use_bf16(device) and not args.fp16)  # __post_init__ rechecks
    logger.info("%s on %s", "bf16 mixed precision" if args.bf16 else precision.name(args.bf16, args.fp16),
                precision.device_name(args.use_cpu))
    return args


def check_unseen(path: Path, dsd) -> None:
    """Refuse a fine-tuned model whose training split holds images this run validates or tests on."""
    if (path / data.SPLIT_FILE).is_file():
        seen = data.read_split_file(path / data.SPLIT_FILE, "train")
        held_out = {i for name in ("validation", "test") if name in dsd for i in dsd[name]["image_id"]}
        if seen & held_out:
            raise DataError(f"{len(seen & held_out)} images this run validates or tests on were in the training split "
                            f"of {path}: use the split it was trained with (--split_seed, fractions)")


def load_teachers(paths: list[str], dc: model_lib.DataConfig, dsd, cached: dict[str, CachedImages]) -> Teachers:
    """Load --distill_from: fine-tuned local folders on this run's split and data config, heads unfolded."""
    models = []
    for name in paths:
        path = Path(name)
        if not path.is_dir() or not model_lib.is_fine_tuned(name):
            raise UserError(f"--distill_from {name}: not a fine-tuned HAM10000 model folder (config.json naming the 7 "
                            "classes, model.safetensors, results.json); download a Hub model first "
                            "(huggingface-cli download REPO --local-dir DIR)")
        check_unseen(path, dsd)
        teacher = model_lib.load_model(name)
        teacher_dc = model_lib.data_config(teacher)
        if teacher_dc != dc:
            raise UserError(f"--distill_from {name}: preprocesses as {teacher_dc}, the student as {dc}; pass "
                            f"--image_size {teacher_dc.size} or distil from a teacher at the student's resolution")
        undone = unfold_head(teacher, path, log_prior(cached["train"].labels))
        logger.info("teacher %s (temperature %.3f, tau %g unfolded)", name, undone["temperature"],
                    undone["logit_adjustment_tau"])
        models.append(teacher.to(memory_format=torch.channels_last))
    return Teachers(models)


def continue_from(model, name_or_path: str, dsd, cached: dict[str, CachedImages]) -> None:
    """Training from a fine-tuned HAM10000 model: refuse a split that tests on its training images, unfold its head.

    Its head holds its folded temperature and logit adjustment; training (and the folding at the
    end) needs the bare logits back, as the run that made it had them.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        logger.warning("continuing from %s with its head as saved (its temperature and logit adjustment are unknown "
                       "here): download the folder first (huggingface-cli download) to continue from its bare logits",
                       name_or_path)
        return
    check_unseen(path, dsd)
    undone = unfold_head(model, path, log_prior(cached["train"].labels))
    logger.info("continuing from the fine-tuned %s: head unfolded (temperature %.3f, tau %g undone)", name_or_path,
                undone["temperature"], undone["logit_adjustment_tau"])


def calibrate_after_training(trainer: HamTrainer, dc, cached: dict[str, CachedImages], output_dir: Path) -> dict:
    """Fold temperature scaling into the trained head and fit the OOD guard (every process; one writes)."""
    from ham_hf.finish import calibration

    try:
        results = calibration.calibrate_model(trainer._unwrapped(), dc, cached, output_dir,
                                              bf16=bool(trainer.args.bf16), write=trainer.is_world_process_zero(),
                                              int8=trainer.recipe.calibrate_int8)
        results.pop("head_changed")  # the trained head is saved either way
        return results
    except DataError as exc:
        logger.warning("not calibrated: %s", exc)
        return {}


def _resume_target(value: str | bool | None):
    """Map --resume_from_checkpoint: a path, or true/latest for the newest checkpoint in output_dir."""
    if isinstance(value, str) and value.lower() in ("true", "latest", "last"):
        return True
    return value or None


def load_cached_splits(data_args: DataArguments, split_args: data.SplitArguments, dc: model_lib.DataConfig):
    """Load the DatasetDict and decode every split once; return (DatasetDict, {split: CachedImages})."""
    dsd = data.load_splits(data_args.data, split_args)
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
              "test": data_args.max_eval_samples}
    for name, limit in limits.items():
        if limit is not None and len(dsd[name]) > limit:
            # A random sample, not the first rows: the metadata is ordered by class.
            dsd[name] = dsd[name].shuffle(seed=split_args.split_seed).select(range(limit))
    cached = {name: cache_split(dsd[name], dc, data_args.decode_threads) for name in data.SPLITS if len(dsd[name])}
    logger.info("decoded %s at %dpx", {k: len(v) for k, v in cached.items()}, dc.resize)
    return dsd, cached


def build_trainer(model, args, dc, cached: dict[str, CachedImages], recipe, augment,
                  teachers: Teachers | None = None) -> HamTrainer:
    """Assemble the HamTrainer for a model and decoded splits."""
    if recipe.channels_last:  # faster on GPUs and on oneDNN CPUs alike (benchmarks/train_throughput.py)
        model = model.to(memory_format=torch.channels_last)
    if args.dataloader_pin_memory and torch.cuda.is_available() and not args.use_cpu:
        # Pinned batches copied without blocking: the next batch's copy overlaps the running step.
        args.accelerator_config.non_blocking = True
    if args.dataloader_num_workers == 0 and args.dataloader_persistent_workers:
        args = dataclasses.replace(args, dataloader_persistent_workers=False)
    train_ds = cached.get("train")
    weights = class_weights(train_ds.labels, recipe.class_weighting) if train_ds is not None else None
    if weights is not None:
        logger.info("class weights %s", dict(zip(CLASS_CODES, [round(w, 3) for w in weights.tolist()])))
    offset = None
    if recipe.logit_adjustment_tau > 0 and train_ds is not None:
        if recipe.class_weighting != "none" or recipe.balanced_sampling:
            logger.warning("logit adjustment on top of class weighting / balanced sampling corrects the prior "
                           "twice; the paper's recipe is --class_weighting none")
        offset = -recipe.logit_adjustment_tau * log_prior(train_ds.labels)
    return HamTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=cached.get("validation"),
        compute_metrics=metrics.compute_metrics, preprocess=Preprocess(dc, augment), recipe=recipe,
        loss_weights=weights, logit_offset=offset, teachers=teachers,
    )


def score(trainer: HamTrainer, split: str, dataset: CachedImages, output_dir: Path) -> dict:
    """Predict a split with the trainer (every process) and write its reports (main process); return the metrics."""
    out = trainer.predict(dataset, metric_key_prefix=split)
    if not trainer.is_world_process_zero():
        return {}
    probs = metrics.softmax(out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions)
    return report.write_split_reports(output_dir, split, probs, dataset.labels.numpy(), dataset.image_ids,
                                      dataset.groups, dataset.metadata)


def training_record(args, recipe, augment, dc, trainer, model_args, data_args, split_args, command) -> dict:
    """The record's training section: the base model, data, split, command, device, run figures and settings."""
    from ham_hf.repo_ids import is_hub_id

    runtime = next((h for h in reversed(trainer.state.log_history) if "train_runtime" in h), {})
    base = model_args.model_name_or_path
    return {
        "base_model": card.describe_base(base), "base_model_id": base if is_hub_id(base) else None,
        "dataset": data_args.data if is_hub_id(data_args.data) else Path(data_args.data).name,
        "split": split_args.describe(), "command": command or "ham-hf train ...",
        "device": precision.device_name(args.use_cpu), "precision": precision.name(args.bf16, args.fp16),
        "epochs": args.num_train_epochs, "image_size": dc.size, "runtime_s": runtime.get("train_runtime"),
        "images_per_s": runtime.get("train_samples_per_second"),
        "train_loss": runtime.get("train_loss"),
        "lineage": card.lineage([("started from", base), *(("taught by", t) for t in recipe.distill_from or ())]),
        "settings": {
            "batch_size": args.per_device_train_batch_size, "learning_rate_head": args.learning_rate,
            "learning_rate_backbone": args.learning_rate * recipe.backbone_lr_multiplier,
            "optimizer": str(args.optim), "scheduler": str(args.lr_scheduler_type), "warmup": args.warmup_steps,
            "weight_decay": args.weight_decay, "seed": args.seed,
            **dataclasses.asdict(recipe), **{f"augment.{k}": v for k, v in dataclasses.asdict(augment).items()}},
    }


def run(model_args: ModelArguments, data_args: DataArguments, recipe: RecipeArguments, augment: AugmentArguments,
        split_args: data.SplitArguments, args: HamTrainingArguments, command: str | None = None,
        options: dict | None = None) -> dict:
    """Train, keep the best validation checkpoint, score validation and (once) test, write the output folder."""
    args = resolve_precision(args)
    # The Trainer's convention: without --hub_model_id the repo is named after output_dir, in the
    # token's namespace.
    push_to = (args.hub_model_id or Path(args.output_dir).absolute().name) if args.push_to_hub else None
    if push_to is not None or args.push_to_hub:
        # The Trainer would push every checkpoint; the finished folder is pushed once, at the end.
        args = dataclasses.replace(args, push_to_hub=False)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    model = model_lib.load_model(model_args.model_name_or_path, model_args.image_size)
    model_lib.stage_parameters(model, recipe.frozen_stages)  # a bad --frozen_stages fails before the decode
    dc = model_lib.data_config(model)
    dsd, cached = load_cached_splits(data_args, split_args, dc)
    if model_lib.is_fine_tuned(model_args.model_name_or_path) and "train" in cached:
        continue_from(model, model_args.model_name_or_path, dsd, cached)
    teachers = load_teachers(recipe.distill_from, dc, dsd, cached) if recipe.distill_from else None
    trainer = build_trainer(model, args, dc, cached, recipe, augment, teachers)
    if trainer.is_world_process_zero():  # under accelerate launch, one process writes the files
        output_dir.mkdir(parents=True, exist_ok=True)
        data.write_split_file(dsd, output_dir / data.SPLIT_FILE)
        for stale in (results_lib.FILE, results_lib.LEGACY_FILE):  # a new model's record starts empty
            (output_dir / stale).unlink(missing_ok=True)
        if options is not None:
            write_recipe(options, output_dir / hub.RECIPE_FILE)
    trainer.train(resume_from_checkpoint=_resume_target(args.resume_from_checkpoint))
    head_values: dict = {}
    if recipe.logit_adjustment_tau > 0 and recipe.tune_logit_adjustment and "validation" in cached:
        tau = trainer.tune_logit_adjustment(cached["validation"], log_prior(cached["train"].labels))
        head_values.update(logit_adjustment_tau=tau, logit_adjustment_max_ece=recipe.logit_adjustment_max_ece)
    elif recipe.logit_adjustment_tau > 0:
        head_values["logit_adjustment_tau"] = recipe.logit_adjustment_tau
    trainer.fold_logit_adjustment()  # before saving: pipeline(...) then decides adjusted with no custom code
    sections = calibrate_after_training(trainer, dc, cached, output_dir) if recipe.calibrate else {}
    sections["head"] = {**head_values, **sections.get("head", {})}
    trainer.save_model()  # config.json + model.safetensors of the best checkpoint
    trainer.save_state()

    final = {}
    for split in ("validation", "test"):  # the test split is scored here, once
        if split in cached:
            final[split] = score(trainer, split, cached[split], output_dir)
    if not trainer.is_world_process_zero():
        return {**sections, "splits": final}
    report.plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
    training = training_record(args, recipe, augment, dc, trainer, model_args, data_args, split_args, command)
    results_lib.update(output_dir, training=training, splits=final, **sections)
    card.render(output_dir)
    logger.info("model and reports in %s", output_dir)
    if push_to:
        logger.info("pushing the model to the Hub repo %s", push_to)
        hub.push_model(output_dir, push_to, private=bool(args.hub_private_repo))
    return {**sections, "splits": final, "training": training}
