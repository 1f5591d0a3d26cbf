"""Fine-tune a timm model on HAM10000 through the transformers Trainer (Accelerate underneath).

    ham-hf train --data data/ham10000 --output_dir outputs/resnet50 \
        --model_name_or_path ../shared/weights/resnet50-imagenet
    accelerate launch -m ham_hf.cli train --data data/ham10000 --output_dir outputs/resnet50   # several GPUs
    ham-hf train config.json                                                                # all options from JSON

Recipe: head only for `--freeze_backbone_epochs`, then the whole network with the backbone at
`--backbone_lr_multiplier` times the head's learning rate; AdamW with warm-up and a cosine
schedule; class-weighted cross-entropy; augmentation on the device; the checkpoint with the best
validation balanced accuracy is kept, and the test split is scored once, at the end.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.utils import ModelEmaV3
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ham_hf import data, hub, metrics, report
from ham_hf import model as model_lib
from ham_hf.calibration import MAX_ECE, choose_tau, log_prior, unfold_head
from ham_hf.errors import DataError, UserError
from ham_hf.labels import CLASS_CODES
from ham_hf.model import cpu_bf16_native
from ham_hf.transforms import AugmentArguments, CachedImages, Preprocess, cache_split

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which backbone to fine-tune, at which resolution."""

    model_name_or_path: str = field(
        default=model_lib.DEFAULT_BACKBONE,
        metadata={"help": "Hub id or local timm/Hub folder (config.json + model.safetensors) of the backbone."},
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Train/eval resolution; default: the model's own pretrained config."}
    )


@dataclass
class DataArguments:
    """Where the data comes from."""

    data: str = field(
        default="data/ham10000",
        metadata={"help": "A prepared dataset folder (ham-hf prepare), a raw folder, or a Hub dataset id."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use a seeded random sample of N training images (quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use a seeded random sample of N validation and of N test images."}
    )
    decode_threads: int | None = field(default=None, metadata={"help": "Threads for the one-off decode."})


@dataclass
class RecipeArguments:
    """Transfer learning and class imbalance."""

    freeze_backbone_epochs: float = field(
        default=1.0, metadata={"help": "Train only the head for this many epochs, then unfreeze the backbone."}
    )
    frozen_stages: int = field(
        default=0,
        metadata={"help": "Keep the backbone's stem and its first N stages frozen all through training, weights and "
                          "normalisation statistics (the original project's frozen base layers): backward stops "
                          "above them, so a step is faster (ResNet-50 has 4 stages; 2 freezes the stem, layer1 and "
                          "layer2). 0 trains the whole backbone after the head-only epochs."},
    )
    backbone_lr_multiplier: float = field(
        default=0.1, metadata={"help": "Backbone learning rate = this x the head's --learning_rate."}
    )
    class_weighting: str = field(
        default="balanced",
        metadata={"help": "Cross-entropy class weights from train counts: balanced | sqrt | none.",
                  "choices": ["balanced", "sqrt", "none"]},
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "Cross-entropy label smoothing."})
    balanced_sampling: bool = field(
        default=False, metadata={"help": "Sample training images class-balanced (with replacement)."}
    )
    logit_adjustment_tau: float = field(
        default=0.0,
        metadata={"help": "Post-hoc logit adjustment (Menon et al., ICLR 2021): subtract tau x log(train prior) "
                          "from the logits for the decision, folded into the saved head's bias. Use with "
                          "--class_weighting none (plain cross-entropy); 0 turns it off, 1 is the paper's choice."},
    )
    tune_logit_adjustment: bool = field(
        default=False,
        metadata={"help": "After training, choose tau from 0, 0.25, ..., 1 by validation balanced accuracy among the "
                          "taus whose calibrated validation ECE meets --logit_adjustment_max_ece (ties go to the "
                          "smaller tau, which keeps more accuracy); --logit_adjustment_tau is then the value used "
                          "for checkpoint selection during training."},
    )
    logit_adjustment_max_ece: float = field(
        default=MAX_ECE,
        metadata={"help": "With --tune_logit_adjustment: a tau qualifies only if temperature scaling brings its "
                          "validation ECE to this or below (the calibration goal); 1 turns the condition off."},
    )
    calibrate: bool = field(
        default=True,
        metadata={"help": "After training: temperature scaling fitted on validation and folded into the head, and "
                          "the out-of-distribution guard fitted on train (see ham-hf calibrate)."},
    )
    calibrate_int8: bool = field(
        default=True,
        metadata={"help": "With --calibrate: also measure the int8 ranges and gate int8 against fp32 (ONNX Runtime, "
                          "on the CPU cores). false leaves it to `ham-hf calibrate --int8_only true` on the chosen "
                          "model: on a GPU sweep it took 2 to 3 minutes a run, more than half the training time."},
    )
    channels_last: bool = field(default=True, metadata={"help": "channels_last memory format (GPU and CPU)."})
    ema_decay: float = field(
        default=0.0,
        metadata={"help": "Exponential moving average of the weights (Polyak averaging; e.g. 0.999, 0 = off): "
                          "validation scores, selects and saves the average, training goes on from the last "
                          "step's weights. The decay warms up as 1 - (1 + step)^-3/4 to this cap, so a short run "
                          "averages over a horizon that fits it."},
    )

    distill_from: list[str] | None = field(
        default=None,
        metadata={"help": "Knowledge distillation (Hinton et al., 2015): fine-tuned HAM10000 model folders (trained "
                          "on this split) whose averaged predictions on the same augmented batch are soft targets "
                          "beside the labels, e.g. an ensemble of two runs distilled into one model that "
                          "pipeline(...) loads. Teachers answer from their bare logits (their temperature and logit "
                          "adjustment unfolded), at the student's data config."},
    )
    distill_alpha: float = field(
        default=0.5,
        metadata={"help": "With --distill_from: loss = (1 - alpha) x cross-entropy + alpha x distillation."},
    )
    distill_temperature: float = field(
        default=2.0, metadata={"help": "With --distill_from: softmax temperature of teachers and student in the "
                                       "distillation term (scaled by its square, as in the paper)."}
    )

    def __post_init__(self):
        if not 0 < self.distill_alpha <= 1:
            raise UserError(f"--distill_alpha must be in (0, 1] (got {self.distill_alpha}); drop --distill_from "
                            "to train on the labels alone")
        if self.distill_temperature <= 0:
            raise UserError(f"--distill_temperature must be > 0 (got {self.distill_temperature})")
        if self.frozen_stages < 0:
            raise UserError(f"--frozen_stages must be >= 0 (got {self.frozen_stages}); 0 freezes nothing")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema_decay must be in [0, 1) (got {self.ema_decay}); 0 turns the average off")
        if self.logit_adjustment_tau < 0:
            raise UserError(f"--logit_adjustment_tau must be >= 0 (got {self.logit_adjustment_tau})")
        if not 0 < self.logit_adjustment_max_ece <= 1:
            raise UserError(f"--logit_adjustment_max_ece must be in (0, 1] (got {self.logit_adjustment_max_ece}); "
                            "1 turns the calibration condition off")


@dataclass
class HamTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments with this task's defaults."""

    output_dir: str = field(default="outputs/ham10000-resnet50", metadata={"help": "Where the model and reports go."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Head learning rate (AdamW)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    num_train_epochs: float = field(default=12, metadata={"help": "Epochs."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Batch size per device."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Eval batch size per device."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps (a value < 1 is a share of all)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate on validation."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (the best is kept too)."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Keep the best validation checkpoint."})
    metric_for_best_model: str | None = field(default=metrics.SELECTION_METRIC, metadata={"help": "Selection metric."})
    greater_is_better: bool | None = field(default=True, metadata={"help": "Selection metric: higher is better."})
    logging_steps: float = field(default=20, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep inputs as they are."})
    # Images are decoded already, so workers only gather batches; on a GPU that gathering (tens of ms
    # for 256 images) would otherwise stall every step, on the CPU it would compete for the cores.
    dataloader_num_workers: int = field(
        default=4 if torch.cuda.is_available() else 0,
        metadata={"help": "Batch-gathering worker processes (default: 4 on a GPU, 0 on the CPU)."})
    dataloader_persistent_workers: bool = field(
        default=torch.cuda.is_available(), metadata={"help": "Keep the workers between epochs."})
    dataloader_pin_memory: bool = field(default=torch.cuda.is_available(), metadata={"help": "Pin host memory (GPU)."})
    # transformers checks every step's loss for NaN/inf, reading it back from the device: a host sync per
    # step that keeps the host from queueing the next step (about a quarter of a fast GPU's throughput).
    logging_nan_inf_filter: bool = field(
        default=False, metadata={"help": "Drop non-finite losses from the logs (costs a device sync per step)."})
    # None = automatic: bf16 autocast wherever the hardware runs bf16 natively (a recent GPU, or a CPU
    # with AVX512-BF16 / AMX); `--bf16 false` keeps fp32, `--bf16 true` insists.
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision (master weights stay fp32). Default: on where the GPU or CPU "
                          "runs bf16 natively; false turns it off."},
    )

    def __post_init__(self):
        if self.bf16 and not (torch.cuda.is_available() and not self.use_cpu):
            if not cpu_bf16_native():
                raise UserError("--bf16 true: this CPU has no native bf16 (AVX512-BF16 or AMX), where autocast "
                                "would be slower than fp32; drop --bf16 or pass --bf16 false")
            self.use_cpu = True  # transformers takes CPU bf16 (Accelerate's CPU autocast) only with use_cpu
        super().__post_init__()


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
        model_lib.add_to_head_bias(self._unwrapped(), self.logit_offset)
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
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.recipe.balanced_sampling:
            return super()._get_train_sampler(train_dataset)
        counts = torch.bincount(dataset.labels, minlength=len(CLASS_CODES)).double()
        weights = (1.0 / counts.clamp(min=1))[dataset.labels]
        generator = torch.Generator().manual_seed(self.args.seed)
        return torch.utils.data.WeightedRandomSampler(weights, len(dataset), replacement=True, generator=generator)


def device_name(args: TrainingArguments | None = None) -> str:
    """The device training runs on, in words (GPU name, or CPU with its thread count)."""
    if torch.cuda.is_available() and not (args is not None and args.use_cpu):
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


def precision(args: TrainingArguments) -> str:
    """The precision a run uses, in words: bf16, fp16 or fp32."""
    return "bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32")


def resolve_precision(args: HamTrainingArguments) -> HamTrainingArguments:
    """Settle --bf16: automatic (None) means bf16 autocast where the GPU or the CPU runs it natively."""
    if args.bf16 is None:
        on_gpu = torch.cuda.is_available() and not args.use_cpu
        native = torch.cuda.is_bf16_supported() if on_gpu else cpu_bf16_native()
        args = dataclasses.replace(args, bf16=native and not args.fp16)  # __post_init__ checks it again
    logger.info("%s on %s", "bf16 mixed precision" if args.bf16 else precision(args), device_name(args))
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
                            "classes, model.safetensors, all_results.json); download a Hub model first "
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
    from ham_hf import calibration

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
                                      dataset.groups, dataset.dx_types)


def training_summary(args, recipe, augment, dc, trainer) -> dict:
    """Collect the hyper-parameters and the run's figures for the model card."""
    device = device_name(args)
    runtime = next((h for h in reversed(trainer.state.log_history) if "train_runtime" in h), {})
    return {
        "image_size": dc.size, "epochs": args.num_train_epochs, "batch_size": args.per_device_train_batch_size,
        "learning_rate_head": args.learning_rate,
        "learning_rate_backbone": args.learning_rate * recipe.backbone_lr_multiplier,
        "optimizer": str(args.optim), "scheduler": str(args.lr_scheduler_type), "warmup": args.warmup_steps,
        "weight_decay": args.weight_decay, "precision": "bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32"),
        "seed": args.seed, "device": device,
        "train_runtime_s": runtime.get("train_runtime"), "train_images_per_s": runtime.get("train_samples_per_second"),
        **{f"recipe.{k}": v for k, v in dataclasses.asdict(recipe).items()},
        **{f"augment.{k}": v for k, v in dataclasses.asdict(augment).items()},
    }


def run(model_args: ModelArguments, data_args: DataArguments, recipe: RecipeArguments, augment: AugmentArguments,
        split_args: data.SplitArguments, args: HamTrainingArguments, command: str | None = None) -> dict:
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
    train_result = trainer.train(resume_from_checkpoint=_resume_target(args.resume_from_checkpoint))
    results = {k if k.startswith("train_") else f"train_{k}": v for k, v in train_result.metrics.items()}
    results.update(precision=precision(args), device=device_name(args))
    if recipe.logit_adjustment_tau > 0 and recipe.tune_logit_adjustment and "validation" in cached:
        tau = trainer.tune_logit_adjustment(cached["validation"], log_prior(cached["train"].labels))
        results.update(logit_adjustment_tau=tau, logit_adjustment_max_ece=recipe.logit_adjustment_max_ece)
    elif recipe.logit_adjustment_tau > 0:
        results["logit_adjustment_tau"] = recipe.logit_adjustment_tau
    trainer.fold_logit_adjustment()  # before saving: pipeline(...) then decides adjusted with no custom code
    if recipe.calibrate:
        results.update(calibrate_after_training(trainer, dc, cached, output_dir))
    trainer.save_model()  # config.json + model.safetensors of the best checkpoint
    trainer.save_state()

    final = {}
    for split in ("validation", "test"):  # the test split is scored here, once
        if split in cached:
            final[split] = score(trainer, split, cached[split], output_dir)
            results.update({f"{'eval' if split == 'validation' else 'test'}_{k}": v
                            for k, v in metrics.flatten(final[split]).items()})
    if not trainer.is_world_process_zero():
        return results
    report.update_all_results(output_dir, results)
    report.plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
    card = hub.model_card(
        final, base_model=model_args.model_name_or_path, dataset=data_args.data,
        split_description=split_args.describe(), training=training_summary(args, recipe, augment, dc, trainer),
        command=command, lineage=hub.lineage(
            [("started from", model_args.model_name_or_path), *(("taught by", t) for t in recipe.distill_from or ())]),
    )
    card.save(output_dir / "README.md")
    if "temperature" in results:
        hub.add_trust_section(output_dir / "README.md", results, final)
    logger.info("model and reports in %s", output_dir)
    if push_to:
        logger.info("pushing the model to the Hub repo %s", push_to)
        hub.push_model(output_dir, push_to, private=bool(args.hub_private_repo))
    return results
