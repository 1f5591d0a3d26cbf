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
from typing import Callable

from ham_hf.errors import UserError

logger = logging.getLogger("ham_hf")


def read_config(argv: list[str]) -> tuple[dict, list[str]]:
    """A leading config.json's options (HfArgumentParser's JSON form) and the rest of the command line."""
    if argv and argv[0].endswith(".json"):
        import json
        from pathlib import Path

        return json.loads(Path(argv[0]).read_text()), argv[1:]
    return {}, argv


def parser_for(dataclass_types, usage: str | None = None, preset: dict | None = None):
    """An HfArgumentParser of the dataclasses whose defaults are `preset` (options the command line overrides)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, usage=usage)
    if preset:
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(preset) - known)
        if unknown:
            raise UserError(f"unknown option(s) in the config file: {', '.join(unknown)}; `--help` lists them")
        for action in parser._actions:  # a required option the file gives is no longer required on the line
            if action.dest in preset:
                action.required = False
        parser.set_defaults(**preset)
    return parser


def parse(argv: list[str], *dataclass_types, defaults: dict | None = None, usage: str | None = None):
    """Parse argv into the given dataclasses with HfArgumentParser; a leading config.json supplies defaults.

    `defaults` come first, then the config file's options, then the command line's, each overriding the
    one before; `usage` replaces the generated usage line of `--help`.
    """
    config, line = read_config(argv)
    parser = parser_for(dataclass_types, usage, {**(defaults or {}), **config})
    return parser.parse_args_into_dataclasses(args=line)


def options_given(argv: list[str], parsed) -> dict:
    """The options a command line (with its leading config.json) sets, by field name, as parsed (JSON-ready)."""
    import dataclasses
    import enum

    config, line = read_config(argv)
    actions = parser_for([type(obj) for obj in parsed])._option_string_actions  # every spelling, aliases too
    named = {actions[t.split("=", 1)[0]].dest for t in line if t.split("=", 1)[0] in actions}
    values = {f.name: getattr(obj, f.name) for obj in parsed for f in dataclasses.fields(obj)}
    return {key: value.value if isinstance(value, enum.Enum) else value
            for key, value in values.items() if key in set(config) | named}


def cmd_prepare(argv: list[str]) -> int:
    """Read, split and save a data set; optionally push it with a dataset card."""
    from ham_hf import data, hub

    args, split_args = parse(argv, data.PrepareArguments, data.SplitArguments)
    dsd = data.prepare(args.data, args.output_dir, split_args, overwrite=args.overwrite)
    if args.push_to_hub:
        hub.push_prepared(dsd, args.output_dir, split_args, args.push_to_hub, private=args.private)
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


def cmd_calibrate(argv: list[str]) -> int:
    """Fold temperature scaling (fitted on validation) into the head and fit the OOD guard."""
    from ham_hf import data
    from ham_hf.finish import calibration

    calibration.run(*parse(argv, calibration.CalibrateArguments, data.SplitArguments))
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    """Score a saved model on a split of any data source, write the reports and record them."""
    from ham_hf import data
    from ham_hf.finish import evaluation

    evaluation.run(*parse(argv, evaluation.EvaluateArguments, data.SplitArguments))
    return 0


def cmd_predict(argv: list[str]) -> int:
    """Predict image files and folders into a CSV; unreadable files are reported and skipped."""
    from ham_hf.serve import classifier

    split_at = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    (args,) = parse(argv[split_at:], classifier.PredictArguments, usage=classifier.PREDICT_USAGE)
    return 0 if classifier.write_predictions(argv[:split_at], args) else 1


def cmd_push(argv: list[str]) -> int:
    """Upload a model folder (weights, config, card, metrics, plots) to the Hub."""
    from ham_hf import hub

    (args,) = parse(argv, hub.PushArguments)
    hub.push_model(args.model, args.repo_id, private=args.private)
    return 0


def cmd_card(argv: list[str]) -> int:
    """Render a model folder's card from its results record (an earlier version's files converted first)."""
    from ham_hf.hub import card

    card.run(*parse(argv, card.CardArguments))
    return 0


def cmd_export(argv: list[str]) -> int:
    """Export a model to ONNX (float32, dynamic batch) for ONNX Runtime."""
    from ham_hf.serve import export

    export.run_export(*parse(argv, export.ExportArguments))
    return 0


def cmd_bundle(argv: list[str]) -> int:
    """Copy a trained model's Hub files into a compact folder (weights in half precision)."""
    from ham_hf.serve import export

    (args,) = parse(argv, export.BundleArguments)
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
    except (UserError, FileNotFoundError) as exc:  # the user's mistake: one line, no traceback
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
