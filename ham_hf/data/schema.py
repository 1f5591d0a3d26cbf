"""The schema every data source is read onto, and the names the data stage shares.

One place for these facts: the columns and their types, the split names, the files written
beside a prepared dataset, and how error messages list offending ids.
"""

from __future__ import annotations

from typing import Iterable

from ham_hf.labels import CLASS_CODES

SPLITS = ("train", "validation", "test")
METADATA_FILE = "HAM10000_metadata.csv"
METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
ISIC2018_COLUMNS = ("image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
SPLIT_FILE = "split.csv"
DUPLICATES_FILE = "duplicates.json"
# How many offending ids an error message lists before it says "and N more".
_MAX_LISTED = 10


def features():
    """Return the `datasets.Features` every source is read onto."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(CLASS_CODES)),
            "image_id": datasets.Value("string"),
            "lesion_id": datasets.Value("string"),
            "dx_type": datasets.Value("string"),
            "age": datasets.Value("float32"),
            "sex": datasets.Value("string"),
            "localization": datasets.Value("string"),
        }
    )


def _listing(ids: Iterable[str]) -> str:
    """Format offending ids for an error message, at most _MAX_LISTED of them."""
    ids = sorted(set(map(str, ids)))
    shown = ", ".join(ids[:_MAX_LISTED])
    more = len(ids) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")
