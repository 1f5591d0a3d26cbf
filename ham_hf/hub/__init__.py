"""The Hub stage: dataset and model cards, pushing either to the Hub, and the Space (`ham_hf.hub.deploy`).

The token comes from `HF_TOKEN` or the saved `huggingface-cli login`; it is never printed or logged.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ham_hf.defaults import REPO_ROOT
from ham_hf.labels import CLASS_CODES, LONG_NAMES
from ham_hf.repo_ids import is_hub_id

logger = logging.getLogger(__name__)

LICENSE = "cc-by-nc-sa-4.0"
# Card bodies are Jinja templates (ModelCard / DatasetCard.from_template), filled with the run's figures.
TEMPLATES = Path(__file__).parent / "templates"
CITATION = """@article{tschandl2018ham10000,
  title   = {The HAM10000 dataset, a large collection of multi-source dermatoscopic images of common
             pigmented skin lesions},
  author  = {Tschandl, Philipp and Rosendahl, Cliff and Kittler, Harald},
  journal = {Scientific Data},
  volume  = {5},
  pages   = {180161},
  year    = {2018},
  doi     = {10.1038/sdata.2018.161}
}"""
SOURCE = ("HAM10000 (Tschandl, Rosendahl & Kittler, Scientific Data 5, 180161, 2018), "
          "Harvard Dataverse doi:10.7910/DVN/DBW86T")


def _counts_table(counts: dict[str, dict[str, int]]) -> str:
    """Render {split: {class: n}} as a Markdown table."""
    splits = list(counts)
    lines = ["| class | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    for code in CLASS_CODES:
        lines.append(f"| {code} ({LONG_NAMES[code]}) | " + " | ".join(str(counts[s][code]) for s in splits) + " |")
    lines.append("| **total** | " + " | ".join(str(sum(counts[s].values())) for s in splits) + " |")
    return "\n".join(lines)


def dataset_card(counts: dict[str, dict[str, int]], split_description: str, duplicates: list[list[str]]):
    """Build a `DatasetCard` for a prepared HAM10000 DatasetDict."""
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(
        license=LICENSE,
        task_categories=["image-classification"],
        tags=["medical", "dermatology", "skin-lesion", "ham10000"],
        pretty_name="HAM10000 (lesion-grouped splits)",
        size_categories=["10K<n<100K"] if sum(sum(c.values()) for c in counts.values()) >= 10_000 else ["1K<n<10K"],
    )
    dup_text = "\n".join(f"- {', '.join(ids)}" for ids in duplicates) or "- none found"
    return DatasetCard.from_template(
        data, template_path=str(TEMPLATES / "dataset_card.md"), source=SOURCE, split_description=split_description,
        counts_table=_counts_table(counts), duplicates=dup_text, citation=CITATION)


def push_dataset(dsd, repo_id: str, card, private: bool = False, token: str | None = None) -> str:
    """Push a DatasetDict and its card to the Hub; return the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    dsd.push_to_hub(repo_id, private=private, token=token)
    card.push_to_hub(repo_id, repo_type="dataset", token=token)
    logger.info("pushed dataset to %s", url)
    return str(url)


# ----------------------------------------------------------------------------- models

SOUP_FILE = "soup.csv"  # a model soup's steps (ham_hf.soup): which runs it averages, and why
RECIPE_FILE = "recipe.json"  # the options a model was trained with: `ham-hf train DIR/recipe.json` retrains it
MODEL_FILES = ("config.json", "model.safetensors", "README.md", "all_results.json", "split.csv", RECIPE_FILE,
               "training_curves.png", "ood_guard.safetensors", "ood_images.json", "int8_ranges.json",
               "int8_fidelity.json", SOUP_FILE)
MODEL_PATTERNS = ("*_metrics.json", "*_confusion_matrix.png", "*_per_class.csv", "*_reliability*.png")
CARD_METRICS = (("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy (mean recall)"),
                ("macro_f1", "Macro F1"), ("roc_auc_macro", "Macro one-vs-rest ROC AUC"))


def test_eval_results(test: dict | None, dataset_id: str) -> list:
    """The card's model-index entries (what the Hub shows as the model's results): the test split's metrics."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(task_type="image-classification", dataset_type=dataset_id,
                   dataset_name="HAM10000 (lesion-grouped test split)", dataset_split="test",
                   metric_type=key, metric_name=name, metric_value=round(float(test[key]), 4))
        for key, name in CARD_METRICS if test is not None and test[key] == test[key]  # skip NaN
    ]


LINEAGE_HEADER = "Lineage (read from the cards of the fine-tuned folders it came from):"


def card_base_model(folder: str | Path) -> str:
    """The base model a model folder's card names (the first `name` after "Base model:"), or "unknown"."""
    card = Path(folder) / "README.md"
    return _base_model_in(card.read_text()) if card.is_file() else "unknown"


def _base_model_in(card_text: str) -> str:
    """The first `name` after "Base model:" in a card's text, or "unknown"."""
    found = re.search(r"Base model: [^`\n]*`([^`]+)`", card_text)
    return found.group(1) if found else "unknown"


def _card_facts(folder: Path) -> tuple[str, str, str, list[str]] | None:
    """A local model folder's base model, device, training command and own lineage lines, read from its card."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    text = card.read_text()
    command = re.search(r"## Training\n\n```bash\n(.*?)\n```", text, re.S)
    if command is None:  # not a card this project wrote (an ImageNet backbone's, say): nothing to trace
        return None
    device = re.search(r"^\| device \| (.+?) \|$", text, re.M)
    own = text.partition(LINEAGE_HEADER + "\n\n")[2].split("\n\n", 1)[0] if LINEAGE_HEADER in text else ""
    return (_base_model_in(text), device.group(1) if device else "unknown device",
            command.group(1).strip(), [ln for ln in own.splitlines() if ln])


def lineage(sources: list[tuple[str, str]]) -> str:
    """Markdown bullets naming the fine-tuned folders a model came from, as (role, folder), with how each was made.

    A model trained on from another fine-tuned model (distilled from some, or averaged from several) is
    only reproducible with theirs: each bullet carries that folder's base model, device and command,
    and its own lineage, nested. Folders this project did not write (a bare backbone, a Hub id) are left out.
    """
    lines = []
    for role, name in sources:
        facts = _card_facts(Path(name)) if name and Path(name).is_dir() else None
        if facts is None:
            continue
        base, device, command, own = facts
        lines.append(f"- {role} `{name}` (base model `{base}`, {device}): `{command}`")
        lines += [f"  {ln}" for ln in own]
    return f"{LINEAGE_HEADER}\n\n" + "\n".join(lines) + "\n" if lines else ""


def describe_base(name_or_path: str) -> str:
    """How a card names a base model: its Hub id, or a local timm folder's architecture.tag (never its path)."""
    if is_hub_id(name_or_path) or not (Path(name_or_path) / "config.json").is_file():
        return str(name_or_path)
    import json

    config = json.loads((Path(name_or_path) / "config.json").read_text())
    tag = (config.get("pretrained_cfg") or {}).get("tag")
    return ".".join(filter(None, [config.get("architecture", "timm model"), tag]))


def model_card(results: dict[str, dict], base_model: str, dataset: str, split_description: str,
               training: dict, command: str | None = None, lineage: str = ""):
    """Build the model card (Hub metadata with model-index from the test metrics) for a trained model."""
    from huggingface_hub import ModelCard, ModelCardData


    dataset_id = dataset if is_hub_id(dataset) else "ham10000"
    eval_results = test_eval_results(results.get("test"), dataset_id)
    data = ModelCardData(
        library_name="timm", pipeline_tag="image-classification", license=LICENSE,
        tags=["image-classification", "timm", "transformers", "dermatology", "skin-lesion", "ham10000", "medical"],
        datasets=[dataset_id], base_model=base_model if is_hub_id(base_model) else None,
        model_name="ham10000-classifier", eval_results=eval_results or None,
    )
    command = command or "ham-hf train ..."

    def metric_table(split: str) -> str:
        r = results.get(split)
        if r is None:
            return "_not scored_"
        rows = "\n".join(f"| {name} | {r[key]:.4f} |" for key, name in CARD_METRICS)
        return f"| metric | value |\n|---|---:|\n{rows}\n\nPer class:\n\n{per_class_markdown(r)}"

    hyper = "\n".join(f"| {k} | {v} |" for k, v in training.items())
    classes = "\n".join(f"| {i} | {c} | {LONG_NAMES[c]} |" for i, c in enumerate(CLASS_CODES))
    return ModelCard.from_template(
        data, template_path=str(TEMPLATES / "model_card.md"), base_model=describe_base(base_model), classes=classes,
        source=SOURCE,
        split_description=split_description, command=command, lineage=lineage, hyper=hyper, citation=CITATION,
        validation_table=metric_table("validation"), test_table=metric_table("test"))


def per_class_markdown(result: dict) -> str:
    """Render the per-class report as a Markdown table."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for code in CLASS_CODES:
        s = result["per_class"][code]
        lines.append(f"| {code} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['support']} |")
    return "\n".join(lines)


def model_files(model_dir: str | Path) -> list[str]:
    """List the files of a model folder that belong on the Hub (weights, config, card, metrics, plots)."""
    root = Path(model_dir)
    names = {n for n in MODEL_FILES if (root / n).is_file()}
    for pattern in MODEL_PATTERNS:
        names.update(p.name for p in root.glob(pattern))
    return sorted(names)


def push_model(model_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create the model repo and upload the model folder's Hub files, with example images the card's
    widget shows; return the repo URL. `repo_id` without ORG/ goes to the token's own namespace."""
    import shutil
    import tempfile

    from huggingface_hub import HfApi

    root = Path(model_dir)
    missing = [n for n in ("config.json", "model.safetensors") if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} lacks {', '.join(missing)}: train a model first (ham-hf train) "
                                "or pass its folder")
    api = HfApi(token=token)  # token None: HF_TOKEN or the saved login; never logged
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    repo_id = getattr(url, "repo_id", None) or repo_id  # the namespace the Hub filled in
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        files = model_files(root)
        for name in files:
            shutil.copy2(root / name, stage / name)
        examples = sorted(EXAMPLES_DIR.glob("*.jpg")) if EXAMPLES_DIR.is_dir() else []
        if examples:
            (stage / "examples").mkdir()
            for path in examples:
                shutil.copy2(path, stage / "examples" / path.name)
            add_widget(stage / "README.md", repo_id, [p.name for p in examples])
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(stage),
                          commit_message="Upload HAM10000 classifier")
    logger.info("pushed %d files and %d example images to %s", len(files), len(examples), url)
    return str(url)


# One HAM10000 image per class (CC BY-NC-SA 4.0), shown by the model page's widget.
EXAMPLES_DIR = REPO_ROOT / "examples"


def add_widget(card_path: Path, repo_id: str, example_names: list[str]) -> None:
    """Point the card's inference widget at example images uploaded beside the model."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(card_path)
    card.data.widget = [{"src": f"https://huggingface.co/{repo_id}/resolve/main/examples/{name}",
                         "example_title": LONG_NAMES.get(name.split("_")[0], name)} for name in example_names]
    card.save(card_path)


TRUST_MARKER = "## Calibration and out-of-distribution guard"


CI_ROWS = (("balanced_accuracy", "Balanced accuracy"), ("accuracy", "Accuracy"), ("macro_f1", "Macro F1"),
           ("roc_auc_macro", "Macro one-vs-rest ROC AUC"), ("malignant_roc_auc", "Malignant-vs-benign ROC AUC"),
           ("mel_sensitivity_at_specificity_80", "Melanoma sensitivity at 80% specificity"),
           ("mel_sensitivity_at_specificity_90", "Melanoma sensitivity at 90% specificity"))


def ci_table(split_metrics: dict[str, dict]) -> str:
    """Markdown table of each metric with its 95% bootstrap interval, one column per split."""
    splits = [s for s in ("validation", "test") if s in split_metrics and "ci" in split_metrics[s]]
    if not splits:
        return ""
    n = split_metrics[splits[0]]["ci_resamples"]
    rows = [f"95% confidence intervals: {n} bootstrap resamples of the lesions (seeded).", "",
            "| metric | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    for key, name in CI_ROWS:
        cells = []
        for s in splits:
            m = split_metrics[s]
            low, high = m["ci"].get(key, (float("nan"), float("nan")))
            cells.append(f"{m.get(key, float('nan')):.3f} [{low:.3f}, {high:.3f}]")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def dx_type_table(split_metrics: dict[str, dict]) -> str:
    """Markdown table of accuracy / balanced accuracy by how the diagnosis was confirmed, one column per split."""
    splits = [s for s in ("validation", "test") if "by_dx_type" in split_metrics.get(s, {})]
    if not splits:
        return ""
    rows = ["By how the diagnosis was confirmed (`dx_type`): accuracy / balanced accuracy over the classes present "
            "(images). HAM10000's follow-up images are all nevi and easy; histopathology-confirmed lesions are the "
            "hard ones, and the most like other clinics' data.", "",
            "| dx_type | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    for kind in split_metrics[splits[-1]]["by_dx_type"]:
        cells = [split_metrics[s]["by_dx_type"].get(kind) for s in splits]
        rows.append(f"| {kind} | " + " | ".join(
            f"{c['accuracy']:.3f} / {c['balanced_accuracy']:.3f} ({c['n']})" if c else "-" for c in cells) + " |")
    return "\n".join(rows)


def probe_lines(results: dict) -> list[str]:
    """The guard's kind probe and its leave-one-source-out figures, when it has one."""
    if "ood_probe_kinds" not in results:
        return []
    lines = ["", f"A probe (guard version {results.get('ood_guard_version', '?')}) reads the texture statistics of "
             "every stage (each channel's mean and deviation) and two colour statistics and decides beside the "
             f"score: below P(dermoscopic) {results['ood_probe_min_dermoscopic']:.3f} an image is flagged and said "
             f"to be its likeliest kind ({results['ood_probe_kinds']}); the score alone still flags what is far "
             "from every lesion class. Judged by source: for each source of the guard's folders in turn, the probe "
             "was fitted without it and read on it (HAM10000 validation with the probe fitted on everything):", ""]
    groups = (("ordinary-camera skin photos flagged", "skin_photo_flagged"),
              ("photos, screenshots / charts, other medical images flagged", "far_flagged"),
              ("dermoscopy from other sources kept", "external_kept"))
    for label, key in groups:
        if f"ood_loso_{key}_worst" in results:
            lines.append(f"- {label}: worst source {100 * results[f'ood_loso_{key}_worst']:.1f}%, mean "
                         f"{100 * results[f'ood_loso_{key}_mean']:.1f}% ({results[f'ood_loso_{key}_sources']} sources)")
    by_source = results.get("ood_by_source") or {}
    if by_source:
        lines += ["", "| held-out source | kind | images | flagged / kept |", "|---|---|---:|---:|"]
        for name, v in sorted(by_source.items(), key=lambda kv: (kv[1]["kind"], kv[0])):
            verb = "kept" if v["kind"] == "dermoscopic" else "flagged"
            lines.append(f"| {name} | {v['kind']} | {v['n']} | {100 * v['share']:.1f}% {verb} |")
    return lines


def logit_adjustment_lines(results: dict) -> list[str]:
    """The card's sentence on the logit-adjusted decision (none for a model without it)."""
    tau = results.get("logit_adjustment_tau")
    if not tau:
        return []
    rule = (f", chosen on validation from 0, 0.25, ..., 1 as the best balanced accuracy among the taus whose "
            f"calibrated ECE is at most {results['logit_adjustment_max_ece']:g}"
            if "logit_adjustment_max_ece" in results else "")
    return [f"The decision is logit-adjusted (Menon et al., ICLR 2021): **tau = {tau:g}** times the log of the "
            f"training class frequencies is subtracted from the logits, in the head's bias{rule}. A larger tau "
            "finds more of the rare classes and fewer nevi, and leaves probabilities that no single temperature "
            "calibrates.", ""]


def trust_section(results: dict, split_metrics: dict[str, dict] | None = None) -> str:
    """The card section on uncertainty (CIs), calibration (T, ECE / Brier before and after) and the OOD guard."""
    table = ci_table(split_metrics or {})
    subgroups = dx_type_table(split_metrics or {})
    lines = [TRUST_MARKER, "", *([table, ""] if table else []), *([subgroups, ""] if subgroups else []),
             "Temperature scaling fitted on the validation split, "
             f"**T = {results['temperature']:.3f}**, folded into the "
             "classifier head (weight and bias divided by T): every loader gives calibrated probabilities, and the "
             "predicted class is unchanged.", "",
             *logit_adjustment_lines(results),
             "| split | ECE before | ECE after | Brier before | Brier after |", "|---|---:|---:|---:|---:|"]
    for prefix, split in (("eval", "validation"), ("test", "test")):
        if f"{prefix}_ece_calibrated" in results:
            cells = [results[f"{prefix}_{m}_{when}"] for m in ("ece", "brier")
                     for when in ("uncalibrated", "calibrated")]
            lines.append(f"| {split} | " + " | ".join(f"{v:.4f}" for v in cells) + " |")
    if "ood_threshold" in results:
        lines += ["", "**Out-of-distribution guard** (`ood_guard.safetensors`): the Mahalanobis distance of an "
                  "image's penultimate features to the nearest class centre of the training images (shared, "
                  "shrunk covariance in a PCA subspace). An image scoring above the threshold "
                  f"({results['ood_threshold']:.1f}, the {100 * results['ood_keep_quantile']:.1f}th percentile of the "
                  "validation lesions, times a margin) is reported as not looking like a dermatoscopic image.", "",
                  f"- validation lesions kept: {100 * results['ood_validation_kept']:.1f}%",
                  f"- non-dermoscopic images ({results['ood_n_images']} from scikit-image, scikit-learn and generated "
                  f"colours, noise, gradients, text and charts): AUROC {results['ood_auroc']:.4f}, flagged "
                  f"{100 * results['ood_flagged']:.1f}%"]
        lines += probe_lines(results)
    if "int8_passed" in results:
        lines += ["", f"**int8 on the CPU** (`int8_ranges.json`, `int8_fidelity.json`): against float32 on the "
                  f"validation split, top-1 agreement {results['int8_top1_agreement']:.4f}, balanced accuracy "
                  f"{results['int8_balanced_accuracy_int8']:.4f} vs {results['int8_balanced_accuracy_fp32']:.4f}: "
                  + ("the fidelity gate passed, so the app, `ham-hf predict` and `Classifier` serve int8 on the CPU by "
                     "default (the stock `pipeline` runs the float32 weights)."
                     if results["int8_passed"] else "the fidelity gate failed, so float32 is served.")]
    return "\n".join(lines) + "\n"


def add_trust_section(card_path: str | Path, results: dict, split_metrics: dict[str, dict] | None = None) -> None:
    """Add (or replace) the uncertainty / calibration / guard section of a model card; refresh its model-index."""
    path = Path(card_path)
    text = path.read_text() if path.is_file() else ""
    if TRUST_MARKER in text:
        head, _, rest = text.partition(TRUST_MARKER)
        tail = rest[rest.find("\n## ") + 1:] if "\n## " in rest else ""
        text = head + trust_section(results, split_metrics) + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + trust_section(results, split_metrics)
    path.write_text(text)
    if text.startswith("---") and (split_metrics or {}).get("test"):
        # The model-index follows the figures just written (a re-decided head scores differently).
        from huggingface_hub import ModelCard

        card = ModelCard.load(path)
        old = card.data.eval_results or []
        card.data.eval_results = test_eval_results(split_metrics["test"], old[0].dataset_type if old else "ham10000")
        card.data.model_name = card.data.model_name or "ham10000-classifier"
        card.save(path)


EXTERNAL_MARKER = "## External validation"


def external_section(source: str, result: dict, guard_kept: float | None, command: str) -> str:
    """A card section: the model on labelled images from another source, beside the internal test split."""
    present = [c for c in CLASS_CODES if result["per_class"][c]["support"] > 0]
    n = sum(result["per_class"][c]["support"] for c in present)
    rows = ["| metric | value [95% CI] |", "|---|---:|"]
    for key, name in CI_ROWS:
        if key in result and key in result.get("ci", {}):
            low, high = result["ci"][key]
            rows.append(f"| {name} | {result[key]:.3f} [{low:.3f}, {high:.3f}] |")
    recalls = ", ".join(f"{c} {result['per_class'][c]['recall']:.2f} ({result['per_class'][c]['support']})"
                        for c in present)
    kept = "" if guard_kept is None else (f" The out-of-distribution guard keeps **{guard_kept:.1%}** of them "
                                          "(turned away, they get no diagnosis).")
    absent = [c for c in CLASS_CODES if c not in present]
    return "\n".join([
        f"{EXTERNAL_MARKER}: {source}", "",
        f"{n} dermatoscopic images from {source}, none from HAM10000, scored with `{command}`. Balanced accuracy "
        "is the mean recall over the classes present" + (f" ({', '.join(absent)} absent)." if absent else "."), "",
        *rows, "", f"Recall per class (images): {recalls}.{kept}", ""])


def add_external_section(card_path: str | Path, source: str, result: dict, guard_kept: float | None,
                         command: str) -> None:
    """Add (or replace) a card's external-validation section for one source."""
    path = Path(card_path)
    text = path.read_text() if path.is_file() else ""
    marker = f"{EXTERNAL_MARKER}: {source}"
    section = external_section(source, result, guard_kept, command)
    if marker in text:
        head, _, rest = text.partition(marker)
        tail = rest[rest.find("\n## ") + 1:] if "\n## " in rest else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)

