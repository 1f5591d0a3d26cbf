"""HamTrainer: the transformers Trainer with this task's loss, freezing, learning rates, averaging and distillation."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.utils import ModelEmaV3
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ham_hf import model as model_lib
from ham_hf.finish.calibration import choose_tau
from ham_hf.head import add_to_head_bias
from ham_hf.labels import CLASS_CODES
from ham_hf.train.arguments import RecipeArguments
from ham_hf.transforms import CachedImages, Preprocess

logger = logging.getLogger(__name__)


def class_weights(labels: torch.Tensor, mode: str, num_classes: int = len(CLASS_CODES)) -> torch.Tensor | None:
    """Cross-entropy weights from train counts, scaled so an average training image weighs 1."""
    if mode == "none":
        return None
    counts = torch.bincount(labels, minlength=num_classes).double()
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    if mode == "sqrt":
        w = w.sqrt()
    w = w / ((w * counts).sum() / counts.sum())
    return w.float()


# In a checkpoint of an averaging run: the weights being trained (model.safetensors holds the average).
TRAINED_WEIGHTS = "trained_weights.safetensors"


def _copy_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a state dict into a module's tensors in place."""
    with torch.no_grad():
        for name, value in module.state_dict().items():
            value.copy_(state[name])


class WeightAverage(TrainerCallback):
    """Keeps a HamTrainer's exponential moving average of the weights, updated after every optimiser step."""

    def __init__(self, trainer: "HamTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the average from the weights training starts (or resumes) from."""
        self.trainer.start_average(resumed=state.global_step > 0)

    def on_step_end(self, args, state, control, **kwargs):
        """Fold the step's weights into the average."""
        self.trainer.ema.update(self.trainer._unwrapped(), step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        """Leave the average in the model: the best one scored, or the last."""
        best_loaded = args.load_best_model_at_end and state.best_model_checkpoint is not None
        self.trainer.end_average(keep_model=best_loaded)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, times T^2 so its gradients keep their scale."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), log_target=True,
                  reduction="batchmean")
    return kl * t * t


class Teachers(torch.nn.Module):
    """Frozen fine-tuned models; their answer is the mean of their log-probabilities (a geometric ensemble)."""

    def __init__(self, models: list):
        super().__init__()
        # Never put in train mode: the Trainer only ever switches its own model.
        self.models = torch.nn.ModuleList(models).eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Ensemble logits (mean log-softmax) for a preprocessed batch."""
        logps = [F.log_softmax(m(pixel_values=pixel_values).logits.float(), dim=-1) for m in self.models]
        return torch.stack(logps).mean(0)


class HamTrainer(Trainer):
    """Trainer with on-device preprocessing, weighted cross-entropy, head/backbone learning rates and freezing."""

    def __init__(self, *args, preprocess: Preprocess, recipe: RecipeArguments | None = None,
                 loss_weights: torch.Tensor | None = None, logit_offset: torch.Tensor | None = None,
                 teachers: Teachers | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teachers = teachers.to(self.args.device) if teachers is not None else None
        self.preprocess = preprocess.to(self.args.device)
        self.recipe = recipe or RecipeArguments(freeze_backbone_epochs=0)
        self.loss_weights = loss_weights.to(self.args.device) if loss_weights is not None else None
        # Logit adjustment: added to the logits for every decision (evaluation), never to the training loss.
        self.logit_offset = logit_offset.to(self.args.device) if logit_offset is not None else None
        # Which parameters and normalisation layers stay frozen, per model (a search makes one per trial).
        self.layout_of = None
        self.stage_params: list = []
        self.backbone_params: list = []
        self.frozen_norms: dict[bool, list] = {False: [], True: []}
        self.backbone_frozen: bool | None = None
        # --ema_decay: the average (timm's ModelEmaV3, made when training starts) and whether the model holds it
        # now; evaluation and checkpoints see the average, training steps the weights being trained.
        self.ema: ModelEmaV3 | None = None
        self.average_in_model = False
        self.resumed_from: str | None = None
        if self.recipe.ema_decay > 0:
            self.add_callback(WeightAverage(self))
        # The loss is a per-batch mean: let the Trainer scale it for gradient accumulation.
        self.model_accepts_loss_kwargs = False

    def _unwrapped(self):
        """The bare TimmWrapper model (without DDP or compile wrappers)."""
        return self.accelerator.unwrap_model(self.model)

    def _sync_freeze(self) -> None:
        """Freeze the backbone while epoch < freeze_backbone_epochs, then all but --frozen_stages (resume-safe)."""
        net = self._unwrapped()
        if net is not self.layout_of:
            self.layout_of, self.backbone_frozen = net, None
            self.stage_params = model_lib.stage_parameters(net, self.recipe.frozen_stages)
            self.backbone_params, _ = model_lib.split_parameters(net)
            self.frozen_norms = {False: model_lib.norm_layers(net, self.stage_params),
                                 True: model_lib.norm_layers(net, self.backbone_params)}
        frozen = (self.state.epoch or 0.0) < self.recipe.freeze_backbone_epochs - 1e-9
        if frozen != self.backbone_frozen:
            model_lib.set_trainable(self.backbone_params, not frozen)
            model_lib.set_trainable(self.stage_params, False)
            self.backbone_frozen = frozen
            stages = self.recipe.frozen_stages
            logger.info("epoch %.2f: backbone %s", self.state.epoch or 0.0,
                        "frozen (head only)" if frozen else
                        f"trainable above its stem and first {stages} stages" if stages else "trainable")

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One optimisation step, on the trained weights, after applying the freeze schedule."""
        if self.average_in_model:
            self._swap_average()
        self._sync_freeze()
        return super().training_step(model, inputs, num_items_in_batch)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Train; remember which checkpoint a resumed run starts from (its trained weights, under averaging)."""
        latest = resume_from_checkpoint is True and Path(self.args.output_dir).is_dir()
        # The Trainer itself resolves `True` (and refuses when there is no checkpoint): this only notes which.
        self.resumed_from = get_last_checkpoint(self.args.output_dir) if latest else resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def start_average(self, resumed: bool = False) -> None:
        """Begin the weight average from the model as loaded; a resumed run then takes back its trained weights."""
        self.ema = ModelEmaV3(self._unwrapped(), decay=self.recipe.ema_decay, use_warmup=True, warmup_power=3 / 4)
        self.average_in_model = False
        trained = Path(self.resumed_from or "") / TRAINED_WEIGHTS
        if resumed and trained.is_file():
            # The checkpoint's model file is the average (what was scored); training goes on from its own weights.
            _copy_state(self._unwrapped(), load_file(str(trained), device=str(self.args.device)))
        elif resumed:
            logger.warning("%s has no %s: training goes on from the averaged weights", self.resumed_from,
                           TRAINED_WEIGHTS)
        logger.info("averaging the weights (EMA, decay warming up to %g): validation and checkpoints see the average",
                    self.recipe.ema_decay)

    def _swap_average(self) -> None:
        """Exchange the model's weights with the average in place (the optimiser keeps its tensors)."""
        with torch.no_grad():
            for live, average in zip(self._unwrapped().state_dict().values(), self.ema.module.state_dict().values()):
                trained = live.clone()
                live.copy_(average)
                average.copy_(trained)
        self.average_in_model = not self.average_in_model

    def end_average(self, keep_model: bool) -> None:
        """Finish averaging: the model keeps what it holds (`keep_model`, a best checkpoint) or takes the average."""
        if not keep_model and not self.average_in_model:
            self._swap_average()
        self.ema, self.average_in_model = None, False

    def _hold_average(self) -> None:
        """During an averaging run, have the model hold the average (for evaluation and checkpoints)."""
        if self.ema is not None and not self.average_in_model:
            self._swap_average()

    def evaluate(self, *args, **kwargs):
        """Evaluate; during an averaging run, the averaged weights."""
        self._hold_average()
        return super().evaluate(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        """Checkpoint; during an averaging run, the averaged weights (what validation scored and selects)."""
        # Private, kept on purpose: the Trainer has no public hook before a checkpoint is written
        # (callbacks' on_save runs after it), and the file must hold the average that validation scored.
        self._hold_average()
        super()._save_checkpoint(model, trial)
        if self.ema is not None and self.args.should_save and not self.args.save_only_model:
            # The trained weights too, so that a resumed run goes on from them exactly.
            folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            trained = {k: v.contiguous() for k, v in self.ema.module.state_dict().items()}
            save_file(trained, str(folder / TRAINED_WEIGHTS))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Preprocess the uint8 batch on the device, forward, and return weighted cross-entropy."""
        if model.training:  # frozen layers keep their statistics too (the Trainer puts the model in train mode)
            for layer in self.frozen_norms[bool(self.backbone_frozen)]:
                layer.eval()
        pixel_values = self.preprocess(inputs["pixel_values"], train=model.training)
        outputs = model(pixel_values=pixel_values)
        loss = F.cross_entropy(outputs.logits.float(), inputs["labels"], weight=self.loss_weights,
                               label_smoothing=self.recipe.label_smoothing)
        if self.teachers is not None and model.training:  # evaluation scores the labels alone
            alpha = self.recipe.distill_alpha
            with self.accelerator.autocast():  # Accelerate casts only the prepared model's forward itself
                target = self.teachers(pixel_values)
            soft = distillation_loss(outputs.logits.float(), target, self.recipe.distill_temperature)
            loss = (1 - alpha) * loss + alpha * soft
        if return_outputs and self.logit_offset is not None:
            outputs.logits = outputs.logits.float() + self.logit_offset
        return (loss, outputs) if return_outputs else loss

    def tune_logit_adjustment(self, dataset: CachedImages, log_prior_: torch.Tensor) -> float:
        """Pick tau on `dataset` (validation) with `choose_tau` and make it the offset; return it."""
        self.logit_offset = None  # raw logits
        out = self.predict(dataset, metric_key_prefix="tau")
        logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
        tau, _ = choose_tau(logits, dataset.labels.numpy(), log_prior_.numpy(),
                            max_ece=self.recipe.logit_adjustment_max_ece)
        self.logit_offset = (-tau * log_prior_).to(self.args.device)
        return tau

    def fold_logit_adjustment(self) -> None:
        """Add the logit offset to the head's bias (so the saved model decides adjusted) and stop adding it."""
        if self.logit_offset is None:
            return
        add_to_head_bias(self._unwrapped(), self.logit_offset)
        logger.info("logit adjustment folded into the head bias: %s",
                    dict(zip(CLASS_CODES, [round(v, 3) for v in self.logit_offset.tolist()])))
        self.logit_offset = None

    def create_optimizer(self, model=None):
        """AdamW (or --optim) with the head at --learning_rate and the backbone at a multiple of it.

        Every parameter is in the optimizer from the start, frozen or not, so unfreezing later needs
        no new optimizer (a frozen parameter has no gradient and is skipped).
        """
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        backbone, head = model_lib.split_parameters(self._unwrapped())
        decay = set(self.get_decay_parameter_names(opt_model))
        names = {id(p): n for n, p in opt_model.named_parameters()}
        groups = []
        # Head first: the Trainer logs the first group's learning rate.
        for params, lr in ((head, self.args.learning_rate),
                           (backbone, self.args.learning_rate * self.recipe.backbone_lr_multiplier)):
            for wd, keep in ((self.args.weight_decay, True), (0.0, False)):
                chosen = [p for p in params if (names.get(id(p)) in decay) == keep]
                if chosen:
                    groups.append({"params": chosen, "lr": lr, "weight_decay": wd})
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        """Class-balanced sampling when asked for; the Trainer's default otherwise."""
        # Private, kept on purpose: the Trainer's only sampler hook; the public get_train_dataloader would
        # mean rebuilding its DataLoader (workers, pinning, Accelerate's distributed sharding) by hand.
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.recipe.balanced_sampling:
            return super()._get_train_sampler(train_dataset)
        counts = torch.bincount(dataset.labels, minlength=len(CLASS_CODES)).double()
        weights = (1.0 / counts.clamp(min=1))[dataset.labels]
        generator = torch.Generator().manual_seed(self.args.seed)
        return torch.utils.data.WeightedRandomSampler(weights, len(dataset), replacement=True, generator=generator)
