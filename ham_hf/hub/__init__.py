"""The Hub stage: dataset and model cards, pushing either to the Hub, and the Space (`ham_hf.hub.deploy`).

The token comes from `HF_TOKEN` or the saved `huggingface-cli login`; it is never printed or logged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ham_hf.defaults import REPO_ROOT
from ham_hf.labels import CLASS_CODES, LONG_NAMES

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


def push_prepared(dsd, folder: str | Path, split_args, repo_id: str, private: bool = False) -> str:
    """Push a prepared DatasetDict (its folder written by `ham_hf.data.prepare`) with its dataset card."""
    from ham_hf import data

    duplicates = json.loads((Path(folder) / data.DUPLICATES_FILE).read_text())
    card = dataset_card(data.class_counts(dsd), split_args.describe(), duplicates)
    return push_dataset(dsd, repo_id, card, private=private)


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

SOUP_FILE = "soup.csv"  # a model soup's steps (ham_hf.train.soup): which runs it averages, and why
RECIPE_FILE = "recipe.json"  # the options a model was trained with: `ham-hf train DIR/recipe.json` retrains it
MODEL_FILES = ("config.json", "model.safetensors", "README.md", "results.json", "split.csv", RECIPE_FILE,
               "training_curves.png", "ood_guard.safetensors", "ood_images.json", "int8_ranges.json",
               "int8_weights.safetensors", SOUP_FILE)
MODEL_PATTERNS = ("*_metrics.json", "*_confusion_matrix.png", "*_per_class.csv", "*_reliability*.png")


def model_files(model_dir: str | Path) -> list[str]:
    """List the files of a model folder that belong on the Hub (weights, config, card, metrics, plots)."""
    root = Path(model_dir)
    names = {n for n in MODEL_FILES if (root / n).is_file()}
    for pattern in MODEL_PATTERNS:
        names.update(p.name for p in root.glob(pattern))
    return sorted(names)


@dataclass
class PushArguments:
    """Options of `ham-hf push`."""

    model: str = field(metadata={"help": "Model folder written by ham-hf train."})
    repo_id: str = field(metadata={"help": "Hub model repo, ORG/NAME."})
    private: bool = field(default=False, metadata={"help": "Create the repo private."})


def push_model(model_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create the model repo and upload the model folder's Hub files, with example images the card's
    widget shows, in one commit; return the repo URL. `repo_id` without ORG/ goes to the token's own namespace."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from ham_hf import results
    from ham_hf.hub import card

    root = Path(model_dir)
    missing = [n for n in ("config.json", "model.safetensors") if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} lacks {', '.join(missing)}: train a model first (ham-hf train) "
                                "or pass its folder")
    api = HfApi(token=token)  # token None: HF_TOKEN or the saved login; never logged
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    repo_id = getattr(url, "repo_id", None) or repo_id  # the namespace the Hub filled in
    files = [n for n in model_files(root) if n != card.CARD_FILE]
    examples = sorted(EXAMPLES_DIR.glob("*.jpg")) if EXAMPLES_DIR.is_dir() else []
    # One commit of files from two folders and two generated ones (no staging copy): the card, rendered
    # from the record with the widget pointing at this repo's examples, and a converted record for a
    # folder written before results.json.
    record = results.load(root)
    generated = {card.CARD_FILE: str(card.card(record, widget(repo_id, [p.name for p in examples]) if examples
                                               else None))}
    if not (root / results.FILE).is_file():
        generated[results.FILE] = results.dumps(record)
    operations = ([CommitOperationAdd(name, str(root / name)) for name in files]
                  + [CommitOperationAdd(f"examples/{p.name}", str(p)) for p in examples]
                  + [CommitOperationAdd(name, text.encode()) for name, text in generated.items()])
    api.create_commit(repo_id=repo_id, repo_type="model", operations=operations,
                      commit_message="Upload HAM10000 classifier")
    logger.info("pushed %d files and %d example images to %s", len(files) + len(generated), len(examples), url)
    return str(url)


# One HAM10000 image per class (CC BY-NC-SA 4.0), shown by the model page's widget.
EXAMPLES_DIR = REPO_ROOT / "examples"


def widget(repo_id: str, example_names: list[str]) -> list[dict]:
    """The card's inference widget: example images uploaded beside the model."""
    return [{"src": f"https://huggingface.co/{repo_id}/resolve/main/examples/{name}",
             "example_title": LONG_NAMES.get(name.split("_")[0], name)} for name in example_names]
