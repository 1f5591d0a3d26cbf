"""Hugging Face Hub: dataset and model cards, and pushing either to the Hub.

The token comes from `HF_TOKEN` or the saved `huggingface-cli login`; it is never printed or logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ham_hf.labels import CLASS_CODES, LONG_NAMES

logger = logging.getLogger(__name__)

LICENSE = "cc-by-nc-sa-4.0"
CITATION = """@article{tschandl2018ham10000,
  title   = {The HAM10000 dataset, a large collection of multi-source dermatoscopic images of common pigmented skin lesions},
  author  = {Tschandl, Philipp and Rosendahl, Cliff and Kittler, Harald},
  journal = {Scientific Data},
  volume  = {5},
  pages   = {180161},
  year    = {2018},
  doi     = {10.1038/sdata.2018.161}
}"""
SOURCE = "HAM10000 (Tschandl, Rosendahl & Kittler, Scientific Data 5, 180161, 2018), Harvard Dataverse doi:10.7910/DVN/DBW86T"


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
    content = f"""---
{data.to_yaml()}
---

# HAM10000, lesion-grouped train / validation / test

Dermatoscopic images of pigmented skin lesions in 7 diagnostic classes, prepared with the
ham-hf command `ham-hf prepare`.

**Source:** {SOURCE}.

**Licence:** CC BY-NC-SA 4.0 (non-commercial, share-alike, attribution to the authors).

## Split protocol

{split_description}

## Images per class and split

{_counts_table(counts)}

## Byte-identical images (kept together in one split)

{dup_text}

## Citation

```bibtex
{CITATION}
```
"""
    return DatasetCard(content)


def push_dataset(dsd, repo_id: str, card, private: bool = False, token: str | None = None) -> str:
    """Push a DatasetDict and its card to the Hub; return the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    dsd.push_to_hub(repo_id, private=private, token=token)
    card.push_to_hub(repo_id, repo_type="dataset", token=token)
    logger.info("pushed dataset to %s", url)
    return str(url)


def read_json(path: str | Path) -> dict:
    """Read a JSON file (empty dict when absent)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}
