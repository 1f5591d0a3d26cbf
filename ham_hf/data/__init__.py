"""HAM10000 (and compatible sources) as a Hugging Face `datasets.DatasetDict`: the data stage.

Reads the public Kaggle layout, the ISIC 2018 Task 3 layout, a plain class-per-folder tree or a
Hub dataset id onto one schema (`readers`, `schema`), then splits it into train / validation /
test grouped by lesion (no lesion in two splits), stratified by class and seeded (`split`).
`prepare` writes the result with `save_to_disk`, together with `split.csv` (image_id -> split)
so that a run can be audited; `load_splits` reads it back (or splits a raw source on the fly).

    ham-hf prepare --data HAM10000_FOLDER --output_dir data/ham10000
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ham_hf.data.readers import (  # noqa: F401 (the data stage's public names)
    READERS,
    detect_layout,
    from_hub_dataset,
    read_ham10000,
    read_hub,
    read_imagefolder,
    read_isic2018,
    read_source,
)
from ham_hf.data.schema import (  # noqa: F401
    DUPLICATES_FILE,
    METADATA_COLUMNS,
    METADATA_FILE,
    SPLIT_FILE,
    SPLITS,
    features,
)
from ham_hf.data.split import (  # noqa: F401
    SplitArguments,
    assign_splits,
    class_counts,
    find_duplicates,
    read_split_file,
    split_dataset,
    split_table,
    write_split_file,
)
from ham_hf.errors import DataError
from ham_hf.images import IMAGE_SUFFIXES  # noqa: F401 (the data stage's public names)

logger = logging.getLogger(__name__)


def _check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output folder that already holds something, unless overwrite is set."""
    if output.exists() and not output.is_dir():
        raise DataError(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise DataError(f"output folder {output} is not empty; pass --overwrite to replace it")


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


def prepare(source: str | Path, output: str | Path, split_args: SplitArguments | None = None, overwrite: bool = False):
    """Read, check, split and save a source; write split.csv and duplicates.json; return the DatasetDict.

    The data set is written to a temporary folder beside `output` and moved into place only when
    complete, so a failure never leaves a half-written output folder.
    """
    output = Path(output)
    _check_output(output, overwrite)
    dataset = read_source(source)
    duplicates = find_duplicates(dataset)
    for ids in duplicates:
        logger.warning("byte-identical images (kept in one split): %s", ", ".join(ids))
    dsd = split_dataset(dataset, split_args, duplicates)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        dsd.save_to_disk(str(staging / "data"))
        for item in (staging / "data").iterdir():
            item.rename(staging / item.name)
        (staging / "data").rmdir()
        write_split_file(dsd, staging / SPLIT_FILE)
        (staging / DUPLICATES_FILE).write_text(json.dumps(duplicates, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved %s to %s", {k: len(v) for k, v in dsd.items()}, output)
    for name, per_class in class_counts(dsd).items():
        logger.info("%s: %d images %s", name, sum(per_class.values()), per_class)
    return dsd


def load_splits(source: str | Path, split_args: SplitArguments | None = None):
    """Return a DatasetDict from a prepared folder (as saved) or from any raw source (split now)."""
    import datasets

    if detect_layout(source) == "saved":
        return datasets.load_from_disk(str(source))
    return split_dataset(read_source(source), split_args)
