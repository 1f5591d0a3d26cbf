"""The `ham-hf` command: a thin face over the stages.

    ham-hf prepare  --data DIR --output_dir DIR [--push_to_hub ORG/NAME]
    ham-hf train    --data DIR --output_dir DIR [TrainingArguments...]   (or: ham-hf train config.json [overrides])
    ham-hf tune     --data DIR --output_dir DIR [--n_trials 8] [--params learning_rate,...]
    ham-hf calibrate --model DIR --data DIR [--output_dir DIR] [--int8_only]   (temperature scaling + OOD guard + int8)
    ham-hf evaluate --model DIR --data DIR [--split test] [--source_name NAME]   (recorded in DIR's card)
    ham-hf card     --model DIR   (render DIR/README.md from DIR/results.json)
    ham-hf predict  PATHS... --model DIR --output preds.csv [--tta]
    ham-hf push     --model DIR --repo-id ORG/NAME [--private]
    ham-hf export   --model DIR --output model.onnx
    ham-hf deploy   --space_id ORG/NAME [--model HUB_ID_OR_DIR] [--private] [--hardware cpu-basic]
    ham-hf bundle   --model DIR --output_dir models/ham10000-resnet50 [--dtype float16]
    ham-hf soup     --models DIR DIR... --data DIR --output_dir DIR [--greedy true]   (weight averaging)

Each sub-command's options come from dataclasses parsed by `HfArgumentParser`; `--help` lists them.
One spelling per option across commands: `--data` for a data source, `--model` for a model,
`--output_dir` for a folder written, `--output` for a single file written (predict, export); the
older `--data-dir` and folder `--output` spellings still work as aliases.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Callable

from ham_hf.defaults import BUNDLED_DIR
from ham_hf.errors import UserError

logger = logging.getLogger("ham_hf")


def json_to_argv(path: str) -> list[str]:
    """Turn a JSON config file into command-line options (so later options can override it)."""
    import json

    argv: list[str] = []
    for key, value in json.loads(open(path).read()).items():
        values = value if isinstance(value, list) else [value]
        # A dict option (lr_scheduler_kwargs, ...) travels as JSON, which TrainingArguments parses back.
        argv += [f"--{key}", *(json.dumps(v) if isinstance(v, dict) else str(v) for v in values)]
    return argv


def options_given(argv: list[str], parsed) -> dict:
    """The options a command line (with its leading config.json) sets, by field name, as parsed (JSON-ready)."""
    import dataclasses
    import enum

    if argv and argv[0].endswith(".json"):
        argv = json_to_argv(argv[0]) + argv[1:]
    aliases = {alias.lstrip("-").replace("-", "_"): f.name for obj in parsed for f in dataclasses.fields(obj)
               for alias in f.metadata.get("aliases", [])}
    values = {f.name: getattr(obj, f.name) for obj in parsed for f in dataclasses.fields(obj)}
    given = {}
    for token in argv:
        if token.startswith("--"):
            key = token[2:].split("=", 1)[0].replace("-", "_")
            key = aliases.get(key, key)
            if key in values:
                value = values[key]
                given[key] = value.value if isinstance(value, enum.Enum) else value
    return given


def parse(argv: list[str], *dataclass_types, defaults: list[str] | None = None, usage: str | None = None):
    """Parse argv into the given dataclasses with HfArgumentParser; a leading config.json supplies defaults.

    `defaults` (options) come first, so the config file and then the command line override them;
    `usage` replaces the generated usage line of `--help`.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, usage=usage)
    if argv and argv[0].endswith(".json"):
        argv = json_to_argv(argv[0]) + argv[1:]
    return parser.parse_args_into_dataclasses(args=[*(defaults or []), *argv])


@dataclass
class PrepareArguments:
    """Options of `ham-hf prepare`."""

    data: str = field(metadata={"help": "Raw source: HAM10000 / ISIC 2018 / class-folder tree, or a Hub id.",
                                "aliases": ["--data_dir", "--data-dir"]})
    output_dir: str = field(metadata={"help": "Folder to save the DatasetDict in (save_to_disk).",
                                      "aliases": ["--output"]})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output folder."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Also push to this Hub dataset repo id."})
    private: bool = field(default=False, metadata={"help": "Make the pushed dataset private."})


def cmd_prepare(argv: list[str]) -> int:
    """Read, split and save a data set; optionally push it with a dataset card."""
    import json
    from pathlib import Path

    from ham_hf import data, hub

    args, split_args = parse(argv, PrepareArguments, data.SplitArguments)
    dsd = data.prepare(args.data, args.output_dir, split_args, overwrite=args.overwrite)
    counts = data.class_counts(dsd)
    for name, per_class in counts.items():
        logger.info("%s: %d images %s", name, sum(per_class.values()), per_class)
    if args.push_to_hub:
        duplicates = json.loads((Path(args.output_dir) / data.DUPLICATES_FILE).read_text())
        card = hub.dataset_card(counts, split_args.describe(), duplicates)
        hub.push_dataset(dsd, args.push_to_hub, card, private=args.private)
    return 0


def cmd_train(argv: list[str]) -> int:
    """Fine-tune through the Trainer and write a Hub-ready output folder."""
    import shlex

    from ham_hf import data, train
    from ham_hf.transforms import AugmentArguments

    parsed = parse(argv, train.ModelArguments, train.DataArguments, train.RecipeArguments, AugmentArguments,
                   data.SplitArguments, train.HamTrainingArguments)
    train.run(*parsed, command=shlex.join(["ham-hf", "train", *argv]), options=options_given(argv, parsed))
    return 0


def cmd_tune(argv: list[str]) -> int:
    """Search learning rates, regularisation and imbalance handling on validation (optuna)."""
    from ham_hf import data, train
    from ham_hf.train import tune
    from ham_hf.transforms import AugmentArguments

    *parsed, tune_args = parse(argv, train.ModelArguments, train.DataArguments, train.RecipeArguments,
                               AugmentArguments, data.SplitArguments, train.HamTrainingArguments, tune.TuneArguments,
                               defaults=tune.TUNE_DEFAULTS)
    tune.run(*parsed, tune_args)
    return 0


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
        "help": "Refit only the int8 ranges and fidelity record; weights, temperature and guard stay."})
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


def cmd_calibrate(argv: list[str]) -> int:
    """Fold temperature scaling (fitted on validation) into the head and fit the OOD guard."""
    from ham_hf import data
    from ham_hf.finish import calibration

    args, split_args = parse(argv, CalibrateArguments, data.SplitArguments)
    calibration.calibrate(args.model, args.data, args.output_dir, split_args, args.bf16, args.int8_only,
                          args.retune_logit_adjustment, args.logit_adjustment_max_ece, guard_only=args.guard_only,
                          guard_negatives=args.guard_negatives, guard_positives=args.guard_positives)
    return 0


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


def cmd_evaluate(argv: list[str]) -> int:
    """Score a saved model on a split of any data source, write the reports and record them."""
    from ham_hf import data
    from ham_hf.finish import evaluation

    args, split_args = parse(argv, EvaluateArguments, data.SplitArguments)
    evaluation.evaluate_model(args.model, args.data, args.split, args.output_dir, split_args, args.batch_size,
                              tta=args.tta, record=args.record, source_name=args.source_name)
    return 0


@dataclass
class PredictArguments:
    """Options of `ham-hf predict PATHS...`."""

    model: str = field(metadata={"help": "Model folder or Hub id."})
    output: str = field(default="predictions.csv", metadata={"help": "CSV to write (one row per image)."})
    tta: bool = field(default=False, metadata={"help": "Average 8 flipped / rotated views."})
    batch_size: int = field(default=32, metadata={"help": "Images per forward pass."})
    backend: str = field(default="auto", metadata={
        "help": "auto (int8 ONNX on the CPU when the model's fidelity check passed, else fp32 ONNX), onnx-int8, "
                "onnx or torch.", "choices": ["auto", "onnx-int8", "onnx", "torch"]})


PREDICT_USAGE = """ham-hf predict PATHS... --model MODEL [--output predictions.csv] [options]

PATHS are image files and folders (searched recursively for JPEG, PNG, HEIC, WebP, TIFF, BMP and
GIF files); unreadable files are reported and skipped. One CSV row per image: all 7 probabilities,
the benign / malignant grouping and the out-of-distribution guard's verdict."""


def cmd_predict(argv: list[str]) -> int:
    """Predict image files and folders into a CSV; unreadable files are reported and skipped."""
    import csv
    import os
    from pathlib import Path

    from ham_hf.serve.classifier import Classifier, list_images, predict_files

    split_at = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    paths, (args,) = argv[:split_at], parse(argv[split_at:], PredictArguments, usage=PREDICT_USAGE)
    files = list_images(paths)
    if not files:
        logger.error("no images given: ham-hf predict PATHS... --model MODEL (files or folders)")
        return 2
    rows, skipped = predict_files(Classifier(args.model, backend=args.backend), files, args.batch_size, args.tta)
    output = Path(args.output)
    if not rows:  # an old CSV from an earlier run must not pass for this run's answer
        output.unlink(missing_ok=True)
        logger.error("no image could be read (%d skipped): nothing written to %s", len(skipped), output)
        return 1
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    with partial.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(output)  # whole or not at all
    logger.info("wrote %d predictions to %s; skipped %d unreadable file(s)", len(rows), output, len(skipped))
    return 0


@dataclass
class PushArguments:
    """Options of `ham-hf push`."""

    model: str = field(metadata={"help": "Model folder written by ham-hf train."})
    repo_id: str = field(metadata={"help": "Hub model repo, ORG/NAME."})
    private: bool = field(default=False, metadata={"help": "Create the repo private."})


def cmd_push(argv: list[str]) -> int:
    """Upload a model folder (weights, config, card, metrics, plots) to the Hub."""
    from ham_hf import hub

    (args,) = parse(argv, PushArguments)
    hub.push_model(args.model, args.repo_id, private=args.private)
    return 0


@dataclass
class CardArguments:
    """Options of `ham-hf card`."""

    model: str = field(metadata={"help": "Local model folder whose card (README.md) to render from its record."})


def cmd_card(argv: list[str]) -> int:
    """Render a model folder's card from its results record (an earlier version's files converted first)."""
    from pathlib import Path

    from ham_hf import results
    from ham_hf.hub import card

    (args,) = parse(argv, CardArguments)
    if not (Path(args.model) / "config.json").is_file():
        raise UserError(f"{args.model} is not a local model folder (no config.json)")
    results.update(args.model)  # writes results.json (converting an earlier folder's files), even unchanged
    card.render(args.model)
    return 0


@dataclass
class ExportArguments:
    """Options of `ham-hf export`."""

    model: str = field(metadata={"help": "Model folder or Hub id."})
    output: str = field(default="model.onnx", metadata={"help": "ONNX file to write."})


def cmd_export(argv: list[str]) -> int:
    """Export a model to ONNX (float32, dynamic batch) for ONNX Runtime."""
    from ham_hf import model as model_lib
    from ham_hf.serve import export

    (args,) = parse(argv, ExportArguments)
    model = model_lib.load_model(args.model)
    export.export_onnx(model, model_lib.data_config(model).size, args.output)
    return 0


@dataclass
class BundleArguments:
    """Options of `ham-hf bundle`."""

    model: str = field(metadata={"help": "Model folder written by ham-hf train."})
    output_dir: str = field(default=str(BUNDLED_DIR), metadata={
        "help": "Folder to write (the app's default).", "aliases": ["--output"]})
    dtype: str = field(default="float16", metadata={"help": "Storage dtype of weight tensors.",
                                                    "choices": ["float16", "bfloat16", "float32"]})


def cmd_bundle(argv: list[str]) -> int:
    """Copy a trained model's Hub files into a compact folder (weights in half precision)."""
    from ham_hf.serve import export

    (args,) = parse(argv, BundleArguments)
    export.bundle(args.model, args.output_dir, args.dtype)
    return 0


def cmd_soup(argv: list[str]) -> int:
    """Average fine-tuned models into one (greedy model soup, chosen on validation), then calibrate it."""
    from ham_hf import data
    from ham_hf.train import soup

    args, split_args = parse(argv, soup.SoupArguments, data.SplitArguments)
    soup.run(args, split_args)
    return 0


def cmd_deploy(argv: list[str]) -> int:
    """Create or update the Hugging Face Space of the app, with exactly the files it needs."""
    from ham_hf.hub import deploy

    (args,) = parse(argv, deploy.DeployArguments)
    print(deploy.deploy(args))
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "bundle": cmd_bundle,
    "calibrate": cmd_calibrate,
    "card": cmd_card,
    "deploy": cmd_deploy,
    "predict": cmd_predict,
    "push": cmd_push,
    "export": cmd_export,
    "prepare": cmd_prepare,
    "soup": cmd_soup,
    "train": cmd_train,
    "tune": cmd_tune,
    "evaluate": cmd_evaluate,
}


def main(argv: list[str] | None = None) -> int:
    """Run `ham-hf SUBCOMMAND ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2

    try:
        return COMMANDS[argv[0]](argv[1:])
    except (UserError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
