"""Model soups: the weights of several fine-tuned models averaged into one (Wortsman et al., ICML 2022).

    ham-hf soup --models outputs/run-a outputs/run-b outputs/run-c --data data/ham10000 --output_dir outputs/soup

Models fine-tuned from the same pretrained weights with the same seed (so the same initial head)
tend to lie in one basin of the loss, and the average of their weights is then one model, as fast as
each of them and loadable by `pipeline(...)`, that is often more accurate and more robust to other
image sources than the best of them. The greedy recipe: sort the ingredients by validation balanced
accuracy, start from the best and keep each next one only if neither the soup's validation balanced
accuracy nor its macro AUC drops; the result is never worse on either than the best ingredient.

Each head is unfolded first (its folded temperature and logit adjustment, from its results record),
the soups are scored as the project decides (`choose_tau`: the best balanced accuracy among the taus
whose calibrated ECE meets the calibration goal), and the chosen soup is then calibrated like any
trained model (`calibration.calibrate`: temperature, guard, int8, reports and card; the test split
is scored there, once).

With `--bn_images N` every model scored, ingredient or average, first has its BatchNorm statistics
re-estimated from N training images (SWA's `update_bn`; REPAIR's reset): an average's buffers are the
average of its ingredients' statistics, not the statistics of the averaged weights. Off by default:
on this project's models it moved single models more than souping did, and statistics of clean images
cost colour robustness (research/README.md, "Model soups").
"""

from __future__ import annotations

import csv
import logging
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ham_hf import data, head, hub, precision, results
from ham_hf import model as model_lib
from ham_hf.errors import ModelError, UserError
from ham_hf.finish import calibration
from ham_hf.finish.evaluation import embed
from ham_hf.hub import card
from ham_hf.transforms import CachedImages, Preprocess, cache_split

logger = logging.getLogger(__name__)


@dataclass
class SoupArguments:
    """Options of `ham-hf soup`."""

    models: list[str] = field(metadata={"help": "Two or more model folders written by ham-hf train (same backbone, "
                                                "seed and split)."})
    data: str = field(metadata={"help": "The data they were trained on: prepared folder, raw folder or Hub id."})
    output_dir: str = field(metadata={"help": "Folder to write the soup to (a model folder like ham-hf train's).",
                                      "aliases": ["--output"]})
    greedy: bool = field(default=True, metadata={
        "help": "Greedy soup (keep an ingredient only if neither validation balanced accuracy nor macro AUC "
                "drops); false: the uniform average of all."})
    logit_adjustment_max_ece: float = field(default=calibration.MAX_ECE, metadata={
        "help": "A tau qualifies only if temperature scaling brings its validation ECE to this or below; 1: no "
                "condition."})
    bn_images: int = field(default=0, metadata={
        "help": "Training images (eval preprocessing, a seeded sample) that re-estimate the BatchNorm statistics "
                "of every model scored, ingredients and averages alike, before it is scored; 0: keep their own "
                "(an average keeps the averaged statistics, which are not those of the averaged weights)."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast for the forward passes (default: where "
                                                              "the hardware runs it natively)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})

    def __post_init__(self):
        if len({Path(m).resolve() for m in self.models}) < 2:
            raise UserError(f"a soup needs two or more different models (got {self.models}): list them after --models")
        if self.bn_images < 0:
            raise UserError(f"--bn_images must be >= 0 (got {self.bn_images}); 0 keeps the BatchNorm statistics")
        if not 0 < self.logit_adjustment_max_ece <= 1:
            raise UserError(f"--logit_adjustment_max_ece must be in (0, 1] (got {self.logit_adjustment_max_ece})")
        out = Path(self.output_dir)
        if out.resolve() in {Path(m).resolve() for m in self.models}:
            raise UserError(f"--output_dir {self.output_dir} is one of the ingredients; write the soup elsewhere")
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not self.overwrite:
            raise UserError(f"--output_dir {self.output_dir} exists and is not empty; pass --overwrite true to "
                            "replace it")


def check_ingredients(paths: list[Path]) -> None:
    """Refuse what cannot be averaged: not a HAM10000 classifier, another architecture or another split."""
    for path in paths:
        if not path.is_dir() or not model_lib.is_fine_tuned(str(path)):
            raise ModelError(f"{path} is not a HAM10000 model folder; give folders written by `ham-hf train`")
        if not (path / data.SPLIT_FILE).is_file():
            raise ModelError(f"{path} has no {data.SPLIT_FILE}: without it its held-out validation split is unknown")
    first = paths[0]
    config = model_lib.load_config(str(first))
    size, held_out = (config.pretrained_cfg or {}).get("input_size"), data.read_split_file(
        first / data.SPLIT_FILE, "validation")
    for path in paths[1:]:
        other = model_lib.load_config(str(path))
        if other.architecture != config.architecture:
            raise ModelError(f"{first} is a {config.architecture} and {path} a {other.architecture}: a soup averages "
                             "models of one architecture, fine-tuned from the same pretrained weights")
        if data.read_split_file(path / data.SPLIT_FILE, "validation") != held_out:
            raise ModelError(f"{first} and {path} were validated on different splits: the soup is chosen on "
                             "validation, so every ingredient must have held out the same one (--split_seed)")
        if (other.pretrained_cfg or {}).get("input_size") != size:
            logger.warning("%s was trained at another resolution than %s: the soup is scored and saved at %s's %s",
                           path, first, first, size)


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts (integer buffers such as BatchNorm's step count: the first's)."""
    keys, shapes = states[0].keys(), {k: v.shape for k, v in states[0].items()}
    for state in states[1:]:
        if state.keys() != keys or any(state[k].shape != shapes[k] for k in keys):
            raise ModelError("the ingredients' weights differ in names or shapes: they are not one architecture")
    return {k: torch.stack([s[k] for s in states]).mean(0) if states[0][k].is_floating_point() else states[0][k]
            for k in keys}


def reestimate_batchnorm(model, images: CachedImages, data_config, n: int, bf16: bool, batch_size: int = 64,
                         seed: int = 0) -> None:
    """Replace every BatchNorm's running statistics by those of `n` seeded images through eval preprocessing."""
    device = next(model.parameters()).device
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    pre = Preprocess(data_config).to(device)
    batches = (pre(images.images[i].to(device), train=False) for i in pick.split(batch_size))
    # update_bn resets the statistics and takes their plain (not running) mean over the batches.
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        torch.optim.swa_utils.update_bn(batches, model)
    model.eval()


class Scorer:
    """Scores weights on validation as the project decides: bare logits, then `choose_tau`."""

    def __init__(self, model, data_config, validation: CachedImages, prior: np.ndarray, max_ece: float, bf16: bool,
                 bn_source: CachedImages | None = None, bn_images: int = 0):
        self.model, self.data_config, self.validation = model, data_config, validation
        self.prior, self.max_ece, self.bf16 = prior, max_ece, bf16
        self.bn_source, self.bn_images = bn_source, bn_images

    def prepare(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state as it will be scored and saved: BatchNorm statistics re-estimated where asked."""
        if not self.bn_images:
            return state
        self.model.load_state_dict(state)
        reestimate_batchnorm(self.model, self.bn_source, self.data_config, self.bn_images, self.bf16)
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @torch.inference_mode()
    def __call__(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Validation balanced accuracy and macro AUC at the chosen tau, and that tau, of a state dict."""
        self.model.load_state_dict(state)
        raw = embed(self.model, self.validation, self.data_config, bf16=self.bf16)[1]
        tau, table = calibration.choose_tau(raw, self.validation.labels.numpy(), self.prior, max_ece=self.max_ece)
        return {**{k: float(table[tau][k]) for k in GREEDY_METRICS}, "tau": tau}


# A soup must keep both what the project selects on and its ranking quality: on balanced accuracy
# alone, a near-tie (bf16 noise is a few thousandths) let in a run that cost 0.009 of macro AUC.
GREEDY_METRICS = ("balanced_accuracy", "roc_auc_macro")


def greedy_soup(states: dict[str, dict], scorer, greedy: bool = True,
                prepare=lambda state: state) -> tuple[list[str], dict, float, list]:
    """(kept ingredient names, soup state, its tau, one record per step) of the greedy (or uniform) soup.

    Greedy: ingredients by validation balanced accuracy, each kept only if none of GREEDY_METRICS drops.
    Every state, ingredient or average, goes through `prepare` (BatchNorm re-estimation) before it is scored.
    """
    prepared = {name: prepare(state) for name, state in states.items()}
    scored = {name: scorer(state) for name, state in prepared.items()}
    steps = [{"step": "ingredient", "model": name, **score} for name, score in scored.items()]
    order = sorted(states, key=lambda name: -scored[name]["balanced_accuracy"])
    if not greedy:
        soup = prepare(average([states[n] for n in order]))
        score = scorer(soup)
        steps.append({"step": "uniform soup", "model": "+".join(order), **score})
        return order, soup, score["tau"], steps
    kept, soup, best = [order[0]], prepared[order[0]], scored[order[0]]
    for name in order[1:]:
        candidate = prepare(average([states[n] for n in [*kept, name]]))
        score = scorer(candidate)
        accepted = all(score[k] >= best[k] for k in GREEDY_METRICS)
        steps.append({"step": "add" if accepted else "reject", "model": name, **score})
        logger.info("soup + %s: validation %s (best so far %s): %s", name,
                    ", ".join(f"{k} {score[k]:.4f}" for k in GREEDY_METRICS),
                    ", ".join(f"{best[k]:.4f}" for k in GREEDY_METRICS), "kept" if accepted else "left out")
        if accepted:
            kept, soup, best = [*kept, name], candidate, score
    return kept, soup, best["tau"], steps


def training_record(args: SoupArguments, split_args: data.SplitArguments, kept: list[str], device) -> dict:
    """The soup's training section of its record: its ingredients, the command and how it was chosen."""
    command = shlex.join(["ham-hf", "soup", "--models", *args.models, "--data", args.data,
                          "--output_dir", args.output_dir, "--greedy", str(args.greedy).lower(),
                          *(["--bn_images", str(args.bn_images)] if args.bn_images else [])])
    return {"base_model": card.base_model_of(args.models[0]),  # the backbone, as the first ingredient's record names it
            "dataset": Path(args.data).name, "split": split_args.describe(), "command": command,
            "device": precision.device_name(device.type == "cpu"),
            "lineage": card.lineage([("averaged", m) for m in kept]),
            "ingredients": kept, "offered": list(args.models), "greedy": args.greedy, "bn_images": args.bn_images,
            "settings": {"method": "greedy soup" if args.greedy else "uniform soup", "ingredients": ", ".join(kept),
                         "offered": ", ".join(args.models), "recipes": "each ingredient's own record and card",
                         "steps": f"{hub.SOUP_FILE} (validation balanced accuracy of each ingredient and each soup "
                                  "tried)",
                         "BatchNorm statistics": (f"re-estimated on {args.bn_images} training images"
                                                  if args.bn_images else "the ingredients' own, averaged")}}


def run(args: SoupArguments, split_args: data.SplitArguments | None = None) -> dict:
    """`ham-hf soup`: choose and average the ingredients on validation, save, then calibrate the result."""
    split_args = split_args or data.SplitArguments()
    paths = [Path(p) for p in args.models]
    check_ingredients(paths)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model_lib.load_model(str(paths[0])).float().eval()
    dc = model_lib.data_config(model)
    dsd = data.load_splits(args.data, split_args)
    calibration.check_same_split(dsd, paths[0] / data.SPLIT_FILE)
    cached = {name: cache_split(dsd[name], dc) for name in data.SPLITS if len(dsd[name])}
    calibration.check_calibration_split(cached["validation"].labels.numpy())
    prior = head.log_prior(cached["train"].labels)
    states = {str(p): head.unfolded_state(p, prior) for p in paths}
    bf16 = precision.use_bf16(device, args.bf16)
    model = model.to(device).to(memory_format=torch.channels_last)
    scorer = Scorer(model, dc, cached["validation"], prior.double().numpy(), args.logit_adjustment_max_ece, bf16,
                    cached["train"], args.bn_images)
    kept, soup, tau, steps = greedy_soup(states, scorer, args.greedy, scorer.prepare)
    model.load_state_dict(soup)
    head.add_to_head_bias(model, -tau * prior)  # the decision, folded as training folds it
    output = Path(args.output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:  # a failure leaves no half-written soup
        stage = Path(tmp) / "soup"
        model.cpu().save_pretrained(stage)
        shutil.copy(paths[0] / data.SPLIT_FILE, stage / data.SPLIT_FILE)
        with (stage / hub.SOUP_FILE).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(steps[0]))
            writer.writeheader()
            writer.writerows(steps)
        results.update(stage, training=training_record(args, split_args, kept, device),
                       head={"logit_adjustment_tau": tau, "logit_adjustment_max_ece": args.logit_adjustment_max_ece})
        logger.info("soup of %d of %d models (%s) at tau %g; calibrating", len(kept), len(paths), ", ".join(kept), tau)
        # Calibration runs on the CPU: bf16 there only where the CPU has it (args.bf16 None lets it decide);
        # it records its figures beside the training section and renders the card.
        sections = calibration.calibrate(str(stage), args.data, split_args=split_args, bf16=args.bf16, cached=cached)
        if output.is_dir():  # empty, or --overwrite
            shutil.rmtree(output)
        elif output.exists():
            output.unlink()
        stage.rename(output)
    logger.info("soup in %s", output)
    return {**sections, "ingredients": kept}

