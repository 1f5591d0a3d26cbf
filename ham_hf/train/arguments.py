"""The options of `ham-hf train`: dataclasses that HfArgumentParser reads from the command line or a JSON recipe."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from ham_hf import defaults, metrics, precision
from ham_hf.errors import UserError
from ham_hf.finish.calibration import MAX_ECE


@dataclass
class ModelArguments:
    """Which backbone to fine-tune, at which resolution."""

    model_name_or_path: str = field(
        default=defaults.DEFAULT_BACKBONE,
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
        metadata={"help": "With --calibrate: also make the int8 graph (quantization-aware tuning of the whole "
                          "network, about 20 minutes on 2 CPU cores; else with float32 for its close calls; else "
                          "the stem and first stage float) and gate "
                          "it against fp32 (ONNX Runtime, on the CPU cores). false leaves it to `ham-hf calibrate "
                          "--int8_only true` on the chosen model: on a GPU machine int8 runs on its CPU cores, which "
                          "parallel runs share."},
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
            if not precision.cpu_bf16_native():
                raise UserError("--bf16 true: this CPU has no native bf16 (AVX512-BF16 or AMX), where autocast "
                                "would be slower than fp32; drop --bf16 or pass --bf16 false")
            self.use_cpu = True  # transformers takes CPU bf16 (Accelerate's CPU autocast) only with use_cpu
        super().__post_init__()
