"""Training throughput of the whole pipeline against the model's bare train step, in one run.

    .venv/bin/python benchmarks/train_throughput.py --data "$HAM10000_DIR" \
        --model "$RESNET50_DIR" --batch-size 16 --steps 6          # this CPU
    python benchmarks/train_throughput.py --data ham10000 --model resnet50-imagenet \
        --batch-size 256 --steps 60                                                     # a GPU

"Pipeline" is `HamTrainer` as `ham-hf train` runs it (batches of the decoded uint8 cache ->
host-to-device copy -> on-device augmentation -> forward / backward / AdamW step), backbone
unfrozen, in each of --precisions (fp32, and bf16 autocast where the GPU or CPU runs it natively)
and --memory-formats. "Bare" is the same model's forward / backward / step
on synthetic tensors already on the device. The one-off decode of the images is timed apart.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from transformers import TrainerCallback

from ham_hf import data, defaults, precision, train
from ham_hf import model as model_lib
from ham_hf.transforms import AugmentArguments, cache_split

from common import emit


class StepTimer(TrainerCallback):
    """Wall time of the optimisation steps after `warmup` steps."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_step_end(self, args, state, control, **kwargs):
        # Synchronise only where the clock is read: a sync every step would stop the host from running
        # ahead of the GPU, as it does in real training.
        timed = state.global_step in (self.warmup, state.max_steps)
        if timed and torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step == self.warmup:
            self.start = time.perf_counter()
        elif state.global_step > self.warmup:
            self.steps += 1
            if timed:
                self.end = time.perf_counter()


def bare_step_rate(model, dc, batch_size: int, steps: int, warmup: int, bf16: bool, channels_last: bool,
                   frozen_stages: int = 0) -> float:
    """Images/s of forward + backward + AdamW on synthetic on-device tensors."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device).train().to(memory_format=fmt)
    frozen = model_lib.stage_parameters(model, frozen_stages)
    model_lib.set_trainable(frozen, False)
    for layer in model_lib.norm_layers(model, frozen):
        layer.eval()
    x = torch.randn(batch_size, 3, dc.size, dc.size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 7, (batch_size,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for i in range(warmup + steps):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - start)


def pipeline_rate(a, dc, cached, bf16: bool, channels_last: bool) -> float:
    """Images/s of HamTrainer.train() as `ham-hf train` runs it (cache -> device -> augment -> step)."""
    args = train.HamTrainingArguments(
        output_dir="/tmp/ham-bench", max_steps=a.steps + a.warmup, per_device_train_batch_size=a.batch_size,
        eval_strategy="no", save_strategy="no", load_best_model_at_end=False, logging_steps=10_000,
        disable_tqdm=True, report_to="none", bf16=bf16)
    recipe = train.RecipeArguments(freeze_backbone_epochs=0, channels_last=channels_last,
                                   frozen_stages=a.frozen_stages)
    model = model_lib.load_model(a.model, a.image_size, a.random_init)
    trainer = train.build_trainer(model, train.resolve_precision(args), dc,
                                  {"train": cached}, recipe, AugmentArguments())
    timer = StepTimer(a.warmup)
    trainer.add_callback(timer)
    trainer.train()
    return a.batch_size * timer.steps / (timer.end - timer.start)


def main() -> None:
    """Measure decode, and pipeline and bare-step throughput per precision; log them (and JSON with --json)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="HAM10000 folder or prepared dataset")
    p.add_argument("--model", default=defaults.DEFAULT_BACKBONE)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32 / bf16 (bf16 where native)")
    p.add_argument("--memory-formats", default="channels_last",
                   help="comma list of channels_last / contiguous (each measured for every precision)")
    p.add_argument("--frozen-stages", type=int, default=0,
                   help="as ham-hf train's --frozen_stages: the stem and the first N stages stay frozen")
    p.add_argument("--random-init", action="store_true",
                   help="build the model from --model's config.json alone (same speed, no weights needed)")
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args()
    if a.steps < 1 or a.warmup < 1:
        p.error("--steps and --warmup must be at least 1 (the timer starts after the warm-up)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    model = model_lib.load_model(a.model, a.image_size, a.random_init)
    dc = model_lib.data_config(model)
    n_images = a.batch_size * (a.steps + a.warmup + 1)
    split = data.load_splits(a.data)["train"]
    split = split.select(range(min(n_images, len(split))))
    t0 = time.perf_counter()
    cached = cache_split(split, dc)
    decode_rate = len(cached) / (time.perf_counter() - t0)

    figures = {"device": precision.device_name(), "image_size": dc.size, "batch_size": a.batch_size,
               "frozen_stages": a.frozen_stages,
               "threads": torch.get_num_threads(), "decode_images_per_s": round(decode_rate, 1)}
    native = precision.bf16_native("cuda" if torch.cuda.is_available() else "cpu")
    for prec in a.precisions.split(","):
        if prec == "bf16" and not native:
            logging.warning("skipping bf16: %s has no native bf16", figures["device"])
            continue
        for fmt in a.memory_formats.split(","):
            cl = fmt == "channels_last"
            pipe = pipeline_rate(a, dc, cached, prec == "bf16", cl)
            fresh = model_lib.load_model(a.model, a.image_size, a.random_init)
            bare = bare_step_rate(fresh, dc, a.batch_size, a.steps, a.warmup,
                                  prec == "bf16", cl, a.frozen_stages)
            key = prec if fmt == "channels_last" else f"{prec}_{fmt}"
            figures[key] = {"pipeline_images_per_s": round(pipe, 1), "bare_step_images_per_s": round(bare, 1),
                            "pipeline_share_of_bare": round(pipe / bare, 3)}
            logging.info("%s: %s", key, figures[key])
    emit(figures, a.json)


if __name__ == "__main__":
    main()
