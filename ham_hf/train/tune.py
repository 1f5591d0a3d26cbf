"""Hyper-parameter search through `Trainer.hyperparameter_search` (optuna), selected on validation.

    ham-hf tune --data data/ham10000 --model_name_or_path timm/resnet50.a1_in1k \
        --output_dir outputs/tune --n_trials 8                     # 128 px, 2 epochs, 1,500 images a trial
    ham-hf train outputs/tune/best_config.json --output_dir outputs/tuned --image_size 224

Each trial fine-tunes at a small budget (defaults: 128 px, 2 epochs, a seeded sample of 1,500
training images, the whole validation split) and is scored by validation balanced accuracy. The
search covers the head learning rate, the backbone multiplier, weight decay, label smoothing and
the imbalance handling; `--params` picks a subset. Written to --output_dir: `trials.csv` (one row a
trial) and `best_config.json`, which `ham-hf train` reads as its configuration.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ham_hf import metrics, train
from ham_hf import model as model_lib
from ham_hf.errors import UserError
from ham_hf.head import log_prior
from ham_hf.transforms import Preprocess

logger = logging.getLogger(__name__)

# Imbalance handling as one choice, each a set of recipe options.
IMBALANCE = {
    "balanced": {"class_weighting": "balanced", "logit_adjustment_tau": 0.0, "balanced_sampling": False},
    "sqrt": {"class_weighting": "sqrt", "logit_adjustment_tau": 0.0, "balanced_sampling": False},
    "logit-adjusted": {"class_weighting": "none", "logit_adjustment_tau": 0.75, "balanced_sampling": False},
    "balanced-sampling": {"class_weighting": "none", "logit_adjustment_tau": 0.0, "balanced_sampling": True},
}


def _suggest(trial, name: str):
    """One parameter of the search space, drawn by an optuna trial."""
    if name == "learning_rate":
        return trial.suggest_float(name, 1e-4, 3e-3, log=True)
    if name == "backbone_lr_multiplier":
        return trial.suggest_float(name, 0.05, 1.0, log=True)
    if name == "weight_decay":
        return trial.suggest_float(name, 1e-5, 0.1, log=True)
    if name == "label_smoothing":
        return trial.suggest_float(name, 0.0, 0.2)
    return trial.suggest_categorical(name, list(IMBALANCE))


SEARCH_SPACE = ("learning_rate", "backbone_lr_multiplier", "weight_decay", "label_smoothing", "imbalance")


@dataclass
class TuneArguments:
    """Options of `ham-hf tune` beside those of `ham-hf train`."""

    n_trials: int = field(default=8, metadata={"help": "Trials to run."})
    params: str = field(default=",".join(SEARCH_SPACE),
                        metadata={"help": f"Comma list of what to search: {', '.join(SEARCH_SPACE)}."})
    timeout_s: float | None = field(default=None, metadata={"help": "Stop starting trials after this many seconds."})

    def __post_init__(self):
        self.searched = [p.strip() for p in self.params.split(",") if p.strip()]
        unknown = [p for p in self.searched if p not in SEARCH_SPACE]
        if unknown or not self.searched:
            raise UserError(f"unknown tuning parameter(s) {', '.join(unknown) or '(none given)'}; "
                            f"choose from {', '.join(SEARCH_SPACE)}")
        if self.n_trials < 1:
            raise UserError(f"--n_trials must be at least 1 (got {self.n_trials})")


# A trial's budget, put before the user's options (which win): small enough for a 2-core CPU.
TUNE_DEFAULTS = {"image_size": 128, "num_train_epochs": 2, "max_train_samples": 1500, "output_dir": "outputs/tune",
                 "save_strategy": "no", "load_best_model_at_end": False, "logging_steps": 20, "disable_tqdm": True}


class TuneTrainer(train.HamTrainer):
    """HamTrainer whose recipe options (not only TrainingArguments) follow each trial."""

    def _hp_search_setup(self, trial) -> None:
        """Apply a trial: recipe options here (weights, logit offset), TrainingArguments by the Trainer."""
        # Private, kept on purpose: the one point where the Trainer applies a trial before building the model,
        # and the recipe options a trial sets are not TrainingArguments, which is all it applies itself.
        space = self.hp_space
        params = space(trial) if trial is not None and self.hp_search_backend is not None else {}
        recipe = dict(IMBALANCE[params["imbalance"]]) if "imbalance" in params else {}
        recipe.update({k: v for k, v in params.items() if k in ("backbone_lr_multiplier", "label_smoothing")})
        if recipe:
            self.recipe = dataclasses.replace(self.recipe, **recipe)
            self.loss_weights = train.class_weights(self.train_dataset.labels, self.recipe.class_weighting)
            if self.loss_weights is not None:
                self.loss_weights = self.loss_weights.to(self.args.device)
            tau = self.recipe.logit_adjustment_tau
            prior = log_prior(self.train_dataset.labels)
            self.logit_offset = (-tau * prior).to(self.args.device) if tau else None
        self.hp_space = lambda t: {k: v for k, v in space(t).items() if hasattr(self.args, k)}
        try:
            super()._hp_search_setup(trial)
        finally:
            self.hp_space = space


def estimate_trial_seconds(trainer: TuneTrainer, probe_steps: int = 2) -> float:
    """Time a few training steps of a fresh model and scale to one trial (training + evaluations)."""
    model = trainer.model_init().to(trainer.args.device).train()
    model_lib.set_trainable(model_lib.stage_parameters(model, trainer.recipe.frozen_stages), False)  # as trained
    pre, batch = trainer.preprocess, trainer.args.per_device_train_batch_size
    data = trainer.train_dataset
    idx = torch.arange(min(batch, len(data)))
    images, labels = data.images[idx].to(trainer.args.device), data.labels[idx].to(trainer.args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device_type = trainer.args.device.type
    start = time.perf_counter()
    for _ in range(probe_steps):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bool(trainer.args.bf16)):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=pre(images, train=True)).logits.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    per_image = (time.perf_counter() - start) / (probe_steps * len(idx))
    epochs = trainer.args.num_train_epochs
    eval_images = len(trainer.eval_dataset) * math.ceil(epochs)
    return per_image * (len(data) * epochs + eval_images / 3)  # an eval image costs about a third of a train one


def write_results(study, output_dir: Path, base: dict) -> dict:
    """Write trials.csv and best_config.json (base options + the best trial's); return the best config."""
    frame = study.trials_dataframe(attrs=("number", "value", "params", "state", "duration"))
    frame = frame.rename(columns={"value": f"validation_{metrics.SELECTION_METRIC}"})
    frame.to_csv(output_dir / "trials.csv", index=False)
    best = dict(base)
    for key, value in study.best_trial.params.items():
        best.update(IMBALANCE[value] if key == "imbalance" else {key: value})
    if best.get("logit_adjustment_tau"):
        best["tune_logit_adjustment"] = True
    (output_dir / "best_config.json").write_text(json.dumps(best, indent=2) + "\n")
    return best


def run(model_args, data_args, recipe, augment, split_args, args, tune_args: TuneArguments) -> dict:
    """Search the hyper-parameters on validation; write trials.csv and best_config.json to output_dir."""
    import optuna

    args = train.resolve_precision(args)
    output_dir = Path(args.output_dir)
    dc = model_lib.data_config(model_lib.load_model(model_args.model_name_or_path, model_args.image_size))
    _, cached = train.load_cached_splits(data_args, split_args, dc)
    if "validation" not in cached:
        raise UserError("tuning selects on the validation split, and this data has none; give it a validation "
                        "fraction (--validation_fraction)")

    def model_init(trial=None):
        """A fresh model for each trial (channels_last as training uses it)."""
        model = model_lib.load_model(model_args.model_name_or_path, model_args.image_size)
        return model.to(memory_format=torch.channels_last) if recipe.channels_last else model

    trainer = TuneTrainer(
        model_init=model_init, args=args, train_dataset=cached["train"], eval_dataset=cached["validation"],
        compute_metrics=metrics.compute_metrics, preprocess=Preprocess(dc, augment), recipe=recipe)
    if tune_args.timeout_s is not None:
        needed = estimate_trial_seconds(trainer)
        if needed > tune_args.timeout_s:
            raise UserError(f"one trial needs about {needed:.0f} s here and --timeout_s is {tune_args.timeout_s:.0f}: "
                            "raise --timeout_s, or shrink a trial (--max_train_samples, --image_size, "
                            "--num_train_epochs)")
        logger.info("one trial takes about %.0f s", needed)
    output_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The Trainer keeps its optuna study to itself: hand it a storage we hold, to read the trials back.
    storage, name = optuna.storages.InMemoryStorage(), "ham-hf-tune"
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {name: _suggest(trial, name) for name in tune_args.searched},
        compute_objective=lambda m: m[f"eval_{metrics.SELECTION_METRIC}"], n_trials=tune_args.n_trials,
        direction="maximize", backend="optuna", timeout=tune_args.timeout_s,
        sampler=optuna.samplers.TPESampler(seed=args.seed), storage=storage, study_name=name)
    study = optuna.load_study(study_name=name, storage=storage)
    base = {"model_name_or_path": model_args.model_name_or_path, "data": data_args.data}
    config = write_results(study, output_dir, base)
    logger.info("best trial %s: validation %s %.4f, %s; wrote %s", best.run_id, metrics.SELECTION_METRIC,
                best.objective, best.hyperparameters, output_dir / "best_config.json")
    return config
