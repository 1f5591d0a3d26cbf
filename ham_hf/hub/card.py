"""The model card, rendered whole from the model folder's results record (`ham_hf.results`) through one template.

    ham-hf card --model models/ham10000-resnet50

Every step that measures something updates the record and renders the card again (the way timm's
`generate_readme` and transformers' `create_model_card` build a card from a dict): the model-index
and every table come from the same numbers, and nothing is appended to the card or read back from it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from ham_hf import results
from ham_hf.errors import UserError
from ham_hf.labels import CLASS_CODES, LONG_NAMES
from ham_hf.repo_ids import is_hub_id

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
CARD_METRICS = (("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy (mean recall)"),
                ("macro_f1", "Macro F1"), ("roc_auc_macro", "Macro one-vs-rest ROC AUC"))
CI_ROWS = (("balanced_accuracy", "Balanced accuracy"), ("accuracy", "Accuracy"), ("macro_f1", "Macro F1"),
           ("roc_auc_macro", "Macro one-vs-rest ROC AUC"), ("malignant_roc_auc", "Malignant-vs-benign ROC AUC"),
           ("mel_sensitivity_at_specificity_80", "Melanoma sensitivity at 80% specificity"),
           ("mel_sensitivity_at_specificity_90", "Melanoma sensitivity at 90% specificity"))
NOT_YET = "_Not measured yet: {step}._"


@dataclass
class CardArguments:
    """Options of `ham-hf card`."""

    model: str = field(metadata={"help": "Local model folder whose card (README.md) to render from its record."})


def run(args: CardArguments) -> Path:
    """`ham-hf card`: write the folder's record (converting an earlier folder's files) and render its card."""
    if not (Path(args.model) / "config.json").is_file():
        raise UserError(f"{args.model} is not a local model folder (no config.json)")
    results.update(args.model)  # writes results.json, even unchanged
    return render(args.model)


def render(folder: str | Path, widget: list[dict] | None = None, output: str | Path | None = None) -> Path:
    """Render a model folder's card from its record into output (default: the folder's README.md)."""
    folder = Path(folder)
    path = Path(output) if output else folder / CARD_FILE
    card(results.load(folder), widget).save(path)
    logger.info("model card rendered to %s", path)
    return path


def card(record: dict, widget: list[dict] | None = None):
    """The `ModelCard` of a results record (Hub metadata with the model-index from its test split)."""
    from huggingface_hub import ModelCard, ModelCardData

    from ham_hf.hub import CITATION, LICENSE, SOURCE, TEMPLATES

    training = record.get("training", {})
    dataset = training.get("dataset") or "ham10000"
    dataset_id = dataset if is_hub_id(dataset) else "ham10000"
    base = training.get("base_model") or "unknown"
    data = ModelCardData(
        library_name="timm", pipeline_tag="image-classification", license=LICENSE,
        tags=["image-classification", "timm", "transformers", "dermatology", "skin-lesion", "ham10000", "medical"],
        datasets=[dataset_id], base_model=training.get("base_model_id"), model_name="ham10000-classifier",
        eval_results=eval_results(record.get("splits", {}).get("test"), dataset_id) or None, widget=widget or None)
    classes = "\n".join(f"| {i} | {c} | {LONG_NAMES[c]} |" for i, c in enumerate(CLASS_CODES))
    return ModelCard.from_template(
        data, template_path=str(TEMPLATES / "model_card.md"), base_model=base, classes=classes, source=SOURCE,
        imbalance=imbalance_sentence(record), citation=CITATION,
        split_description=training.get("split") or "`split.csv` lists every image_id with its split.",
        selection=selection_sentence(record), results=results_section(record),
        subgroups=subgroup_section(record.get("splits", {}).get("test")), calibration=calibration_section(record),
        guard=guard_section(record.get("guard")), int8=int8_section(record.get("int8")),
        evaluations=evaluations_section(record.get("evaluations", {})), training=training_section(training))


def eval_results(test: dict | None, dataset_id: str) -> list:
    """The model-index entries (what the Hub shows as the model's results): the test split's metrics."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(task_type="image-classification", dataset_type=dataset_id,
                   dataset_name="HAM10000 (lesion-grouped test split)", dataset_split="test",
                   metric_type=key, metric_name=name, metric_value=round(float(test[key]), 4))
        for key, name in CARD_METRICS if test is not None and _number(test.get(key))
    ]


def _number(value) -> bool:
    """Whether a figure is a finite number (NaN and missing are left out of tables)."""
    return isinstance(value, (int, float)) and not math.isnan(value)


def _ci(result: dict, key: str) -> str:
    """A figure with its 95% interval where the record has one: 0.759 [0.714, 0.801]."""
    value = result.get(key)
    if not _number(value):
        return "-"
    low_high = result.get("ci", {}).get(key)
    return f"{value:.3f} [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else f"{value:.3f}"


# ----------------------------------------------------------------------------- sections


def imbalance_sentence(record: dict) -> str:
    """How the training handled nv being two thirds of the data, as the recipe says."""
    settings = record.get("training", {}).get("settings", {})
    tau = results.head_values(record)["logit_adjustment_tau"]
    weighting = settings.get("class_weighting", settings.get("recipe.class_weighting", "none"))
    how = []
    if weighting and weighting != "none":
        how.append(f"the loss weighs classes ({weighting})")
    if settings.get("balanced_sampling", settings.get("recipe.balanced_sampling")):
        how.append("batches are drawn class-balanced")
    if tau:
        how.append(f"the decision is logit-adjusted (tau {tau:g}, see Calibration)")
    done = ("; ".join(how) + ", trading some accuracy for recall on the rare classes") if how else \
        "training used no class weights, so rare classes are found less often"
    return (f"nv (melanocytic nevus) is 67% of the data: {done}. Balanced accuracy (mean recall) is the "
            "selection metric.")


def selection_sentence(record: dict) -> str:
    """How the checkpoint was chosen and when test was scored."""
    if "training" not in record:
        return ""
    return "The checkpoint was selected on validation balanced accuracy; the test split was scored after training."


def results_section(record: dict) -> str:
    """Each split's figures with 95% lesion-bootstrap intervals, and the per-class tables."""
    splits = _in_order(record.get("splits", {}))
    if not splits:
        return NOT_YET.format(step="train with `ham-hf train`, or score a split with `ham-hf evaluate`")
    names = list(splits)
    resamples = next((r["ci_resamples"] for r in splits.values() if "ci_resamples" in r), None)
    lines = ([f"95% confidence intervals: {resamples:,} bootstrap resamples of the lesions (seeded).", ""]
             if resamples else [])
    lines += ["| metric | " + " | ".join(f"{s} ({_images(r)} images)" for s, r in splits.items()) + " |",
              "|---|" + "---:|" * len(names)]
    for key, name in CI_ROWS:
        if any(_number(r.get(key)) for r in splits.values()):
            lines.append(f"| {name} | " + " | ".join(_ci(r, key) for r in splits.values()) + " |")
    for split, r in splits.items():
        lines += ["", f"Per class, {split} (`{split}_per_class.csv`):", "", per_class_table(r)]
    dx = dx_type_table(splits)
    return "\n".join(lines + (["", dx] if dx else []))


def _in_order(by_split: dict) -> dict:
    """Validation, then test (a record's keys are sorted)."""
    return {s: by_split[s] for s in ("validation", "test") if s in by_split}


def _images(result: dict) -> str:
    """The number of images a split result scored, with a thousands separator."""
    return f"{sum(v['support'] for v in result.get('per_class', {}).values()):,}"


def per_class_table(result: dict) -> str:
    """A per-class precision / recall / F1 / support table."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for code in CLASS_CODES:
        s = result["per_class"][code]
        lines.append(f"| {code} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['support']} |")
    return "\n".join(lines)


def dx_type_table(splits: dict[str, dict]) -> str:
    """Accuracy / balanced accuracy by how the diagnosis was confirmed, one column per split."""
    names = [s for s, r in splits.items() if "by_dx_type" in r]
    if not names:
        return ""
    rows = ["By how the diagnosis was confirmed (`dx_type`): accuracy / balanced accuracy over the classes present "
            "(images). HAM10000's follow-up images are all nevi and easy; histopathology-confirmed lesions are the "
            "hard ones, and the most like other clinics' data.", "",
            "| dx_type | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for kind in splits[names[-1]]["by_dx_type"]:
        cells = [splits[s]["by_dx_type"].get(kind) for s in names]
        rows.append(f"| {kind} | " + " | ".join(
            f"{c['accuracy']:.3f} / {c['balanced_accuracy']:.3f} ({c['n']})" if c else "-" for c in cells) + " |")
    return "\n".join(rows)


SUBGROUP_TITLES = {"sex": "Sex", "age": "Age", "site": "Body site (the commonest)"}


def subgroup_section(test: dict | None) -> str:
    """The test split by sex, age band and body site, with intervals and counts; too-small groups said so."""
    groups = (test or {}).get("subgroups")
    if not groups:
        return NOT_YET.format(step="score the test split with `ham-hf evaluate --split test` (needs the data's "
                                   "sex, age and localization)")
    rule = groups.get("rule", {})
    lines = [f"The test split by patient group: balanced accuracy (over the classes present), melanoma sensitivity "
             f"(the share of melanomas the model calls mel) and the malignant-vs-benign ROC AUC (akiec, bcc, mel "
             f"against the rest), each with a 95% interval from {rule.get('resamples', 0):,} bootstrap resamples of "
             f"the group's lesions. A figure is left out (\"too small\") where the group has fewer than "
             f"{rule.get('min_images', '?')} images, or, for the melanoma and malignant figures, fewer than "
             f"{rule.get('min_positives', '?')} melanomas / malignant and benign lesions: intervals that wide say "
             "nothing. HAM10000 records no skin type, so there is no figure by skin tone.", ""]
    for kind, title in SUBGROUP_TITLES.items():
        if kind not in groups:
            continue
        lines += [f"**{title}**", "", "| group | images (lesions) | melanomas | balanced accuracy | "
                  "melanoma sensitivity | malignant ROC AUC |", "|---|---:|---:|---:|---:|---:|"]
        for name, g in groups[kind].items():
            cells = [_subgroup_cell(g, m) for m in ("balanced_accuracy", "mel_sensitivity", "malignant_roc_auc")]
            lines.append(f"| {name} | {g['n']} ({g['lesions']}) | {g['melanomas']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def _subgroup_cell(group: dict, metric: str) -> str:
    """One subgroup figure with its interval, or "too small"."""
    value = group.get(metric)
    if not _number(value):
        return "too small"
    low, high = group["ci"][metric]
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def calibration_section(record: dict) -> str:
    """The temperature and logit adjustment folded into the head, and ECE / Brier before and after."""
    head, calibration = record.get("head", {}), record.get("calibration", {})
    if "temperature" not in head:
        return NOT_YET.format(step="calibrate with `ham-hf calibrate`")
    lines = [f"Temperature scaling fitted on the validation split, **T = {head['temperature']:.3f}**, folded into "
             "the classifier head (weight and bias divided by T): every loader gives calibrated probabilities, and "
             "the predicted class is unchanged.", ""]
    tau = head.get("logit_adjustment_tau")
    if tau:
        rule = (f", chosen on validation from 0, 0.25, ..., 1 as the best balanced accuracy among the taus whose "
                f"calibrated ECE is at most {head['logit_adjustment_max_ece']:g}"
                if "logit_adjustment_max_ece" in head else "")
        lines += [f"The decision is logit-adjusted (Menon et al., ICLR 2021): **tau = {tau:g}** times the log of the "
                  f"training class frequencies is subtracted from the logits, in the head's bias{rule}. A larger tau "
                  "finds more of the rare classes and fewer nevi, and leaves probabilities that no single "
                  "temperature calibrates.", ""]
    if calibration:
        lines += ["| split | ECE before | ECE after | Brier before | Brier after |", "|---|---:|---:|---:|---:|"]
        for split, c in _in_order(calibration).items():
            cells = (c["ece_before"], c["ece_after"], c["brier_before"], c["brier_after"])
            lines.append(f"| {split} | " + " | ".join(f"{v:.4f}" for v in cells) + " |")
    return "\n".join(lines).rstrip()


GUARD_GROUPS = (("ordinary-camera skin photos flagged", "skin_photo_flagged"),
                ("photos, screenshots / charts, other medical images flagged", "far_flagged"),
                ("dermoscopy from other sources kept", "external_kept"))


def guard_section(guard: dict | None) -> str:
    """What the out-of-distribution guard does and how it held on each source it never saw."""
    if not guard:
        return NOT_YET.format(step="fit the guard with `ham-hf calibrate`")
    lines = ["`ood_guard.safetensors`: the Mahalanobis distance of an image's penultimate features to the nearest "
             "class centre of the training images (shared, shrunk covariance in a PCA subspace). An image scoring "
             f"above the threshold ({guard['threshold']:.1f}, the {100 * guard['keep_quantile']:.1f}th percentile of "
             "the validation lesions, times a margin) is reported as not looking like a dermatoscopic image.", "",
             f"- validation lesions kept: {100 * guard['validation_kept']:.1f}%",
             f"- non-dermoscopic images ({guard['n_images']} from scikit-image, scikit-learn and generated colours, "
             f"noise, gradients, text and charts): AUROC {guard['auroc']:.4f}, flagged {100 * guard['flagged']:.1f}%"]
    if "probe_kinds" in guard:
        lines += ["", f"A probe (guard version {guard.get('guard_version', '?')}) reads the texture statistics of "
                  "every stage (each channel's mean and deviation) and two colour statistics and decides beside the "
                  f"score: below P(dermoscopic) {guard['probe_min_dermoscopic']:.3f} an image is flagged and said to "
                  f"be its likeliest kind ({guard['probe_kinds']}); the score alone still flags what is far from "
                  "every lesion class. Judged by source: for each source of the guard's folders in turn, the probe "
                  "was fitted without it and read on it (HAM10000 validation with the probe fitted on everything):",
                  ""]
        for label, key in GUARD_GROUPS:
            if f"loso_{key}_worst" in guard:
                lines.append(f"- {label}: worst source {100 * guard[f'loso_{key}_worst']:.1f}%, mean "
                             f"{100 * guard[f'loso_{key}_mean']:.1f}% ({guard[f'loso_{key}_sources']} sources)")
        by_source = guard.get("by_source") or {}
        if by_source:
            lines += ["", "| held-out source | kind | images | flagged / kept |", "|---|---|---:|---:|"]
            for name, v in sorted(by_source.items(), key=lambda kv: (kv[1]["kind"], kv[0])):
                verb = "kept" if v["kind"] == "dermoscopic" else "flagged"
                lines.append(f"| {name} | {v['kind']} | {v['n']} | {100 * v['share']:.1f}% {verb} |")
    return "\n".join(lines)


def int8_section(int8: dict | None) -> str:
    """How the int8 graph was made, the fidelity gate's figures and what they decided."""
    if not int8:
        return NOT_YET.format(step="measure int8 with `ham-hf calibrate --int8_only true` (needs onnxruntime)")
    verdict = ("the fidelity gate passed, so the app, `ham-hf predict` and `Classifier` serve int8 on the CPU by "
               "default (the stock `pipeline` runs the float32 weights)." if int8.get("passed") else
               "the fidelity gate failed, so float32 is served.")
    recipe = int8.get("recipe") or {}
    tuning = recipe.get("tuning")
    if tuning:
        made = (f"The whole network before the head runs in int8 (`int8_ranges.json`, `int8_weights.safetensors`): "
                f"the stem and first stage were fine-tuned quantization-aware for {tuning['steps']} steps of "
                f"{tuning['batch_size']} training images to give the float32 model's outputs "
                f"(`ham-hf calibrate --int8_only true --int8_tuning_steps {tuning['steps']}`).")
        made += f" Float32 answers the close calls {_cascade(recipe, int8)}." if recipe.get("cascade") else ""
    elif recipe:
        made = (f"Post-training int8 (`int8_ranges.json`), float until input stride "
                f"{recipe.get('float_until_stride')} (the stem and first stage) and in the head.")
    else:
        made = "`int8_ranges.json` (made by an older ham-hf: not served until `ham-hf calibrate --int8_only true`)."
    external = (f", {int8['top1_agreement_external']:.4f} on {int8['n_external']} dermoscopic images from other "
                "archives" if _number(int8.get("top1_agreement_external")) else "")
    guard = (f", the guard's verdicts agree on {100 * int8['ood_verdict_agreement']:.2f}% of "
             f"{int8.get('n_guard_images', 0):,} images" if _number(int8.get("ood_verdict_agreement")) else "")
    rejected = "".join(_rejected(r) for r in int8.get("rejected", []) if (r.get("recipe") or {}).get("tuning"))
    return (f"{made} Against float32: top-1 agreement {int8['top1_agreement']:.4f} on the "
            f"{int8.get('n_validation', 0):,} validation images{external}, balanced accuracy "
            f"{int8['balanced_accuracy_int8']:.4f} vs {int8['balanced_accuracy_fp32']:.4f}{guard}: {verdict}{rejected}")


def _rejected(figures: dict) -> str:
    """' Not kept: the whole network in int8 after N tuning steps ..., which failed the gate.'"""
    recipe = figures["recipe"]
    cascade = f", with float32 answering the close calls {_cascade(recipe, figures)}" if recipe.get("cascade") else ""
    return (f" Not kept: the whole network in int8 after {recipe['tuning']['steps']} tuning steps{cascade} (top-1 "
            f"agreement {figures['top1_agreement']:.4f} on validation{_external(figures)}), which failed the gate.")


def _cascade(recipe: dict, figures: dict) -> str:
    """Which answers of a cascade float32 gives: '(int8's top logit ahead of the second by less than ...)'."""
    cascade = recipe["cascade"]
    sent = figures.get("sent_to_fp32")
    return (f"(int8's top logit ahead of the second by less than "
            f"{cascade['margin']:.3f}, fitted on {cascade['fitted_on']}"
            + (f"; {100 * sent:.1f}% of validation images)" if _number(sent) else ")"))


def _external(figures: dict) -> str:
    """', X on other archives' dermoscopy' when the int8 figures have it."""
    value = figures.get("top1_agreement_external")
    return f", {value:.4f} on other archives' dermoscopy" if _number(value) else ""


def evaluations_section(evaluations: dict) -> str:
    """Each other data source the model was scored on, beside the internal test split."""
    if not evaluations:
        return "_No other data scored yet: `ham-hf evaluate --model FOLDER --data OTHER --split all` records it here._"
    parts = []
    for name, e in evaluations.items():
        r = e["result"]
        present = [c for c in CLASS_CODES if r["per_class"][c]["support"] > 0]
        absent = [c for c in CLASS_CODES if c not in present]
        rows = ["| metric | value [95% CI] |", "|---|---:|"] + [
            f"| {label} | {_ci(r, key)} |" for key, label in CI_ROWS if _number(r.get(key))]
        recalls = ", ".join(f"{c} {r['per_class'][c]['recall']:.2f} ({r['per_class'][c]['support']})"
                            for c in present)
        kept = ("" if not _number(e.get("guard_kept")) else
                f" The out-of-distribution guard keeps **{e['guard_kept']:.1%}** of them (turned away, they get no "
                "diagnosis).")
        tta = " with the 8-view test-time augmentation" if e.get("tta") else ""
        parts += [f"**{name}**: {_images(r)} images, scored{tta} with `{e['command']}`. Balanced accuracy is the mean "
                  "recall over the classes present" + (f" ({', '.join(absent)} absent)." if absent else "."), "",
                  *rows, "", f"Recall per class (images): {recalls}.{kept}", ""]
    return "\n".join(parts).rstrip()


def training_section(training: dict) -> str:
    """How the model was trained: device, command, lineage and settings."""
    if not training:
        return NOT_YET.format(step="train with `ham-hf train`")
    run = [f"for {training['epochs']:g} epochs" if _number(training.get("epochs")) else None,
           f"at {training['image_size']} px" if training.get("image_size") else None,
           f"on {training['device']}" if training.get("device") else None,
           f"({training['precision']})" if training.get("precision") else None,
           f"in {training['runtime_s']:.0f} s, {training['images_per_s']:.0f} images/s"
           if _number(training.get("runtime_s")) and _number(training.get("images_per_s")) else None]
    lines = ["Trained " + " ".join(filter(None, run)) + "."]
    if training.get("command"):
        lines += ["", "```bash", training["command"], "```"]
    if training.get("lineage"):
        lines += ["", "Lineage (the fine-tuned folders it came from, as their records say):", "",
                  *lineage_lines(training["lineage"])]
    settings = training.get("settings") or {}
    if settings:
        lines += ["", "| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in settings.items())]
    return "\n".join(lines)


def lineage_lines(lineage: list[dict], indent: str = "") -> list[str]:
    """Nested Markdown bullets of a lineage (each with its own)."""
    lines = []
    for item in lineage:
        lines.append(f"{indent}- {item['role']} `{item['name']}` (base model `{item['base_model']}`, "
                     f"{item.get('device') or 'unknown device'}): `{item.get('command') or 'unknown command'}`")
        lines += lineage_lines(item.get("lineage", []), indent + "  ")
    return lines


def lineage(sources: list[tuple[str, str]]) -> list[dict]:
    """The fine-tuned folders a model came from, as (role, folder), each with its record's base model and command.

    A model trained on from another fine-tuned model (distilled from some, or averaged from several) is
    only reproducible with theirs. Folders without a record of their training (a bare backbone, a Hub
    id) are left out.
    """
    out = []
    for role, name in sources:
        if not name or not Path(name).is_dir():
            continue
        training = results.load(name).get("training")
        if not training:
            continue
        out.append({"role": role, "name": str(name), "base_model": training.get("base_model") or "unknown",
                    "device": training.get("device"), "command": training.get("command"),
                    "lineage": training.get("lineage", [])})
    return out


def base_model_of(folder: str | Path) -> str:
    """The base model a model folder's record names, or "unknown"."""
    return results.load(folder).get("training", {}).get("base_model") or "unknown"


def describe_base(name_or_path: str) -> str:
    """How a card names a base model: its Hub id, or a local timm folder's architecture.tag (never its path)."""
    if is_hub_id(name_or_path) or not (Path(name_or_path) / "config.json").is_file():
        return str(name_or_path)
    import json

    config = json.loads((Path(name_or_path) / "config.json").read_text())
    tag = (config.get("pretrained_cfg") or {}).get("tag")
    return ".".join(filter(None, [config.get("architecture", "timm model"), tag]))
