"""Readers: the Kaggle HAM10000 layout, ISIC 2018 Task 3, a class-per-folder tree and a Hub
dataset id, each read onto the one schema (`ham_hf.data.schema`); `read_source` detects which.

Images are kept as bytes (decoded only when used) and each is checked with the decoders' own rule
(`ham_hf.images`), in threads, so a broken or oversized file stops reading with its name.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from ham_hf.data.schema import ISIC2018_COLUMNS, METADATA_COLUMNS, METADATA_FILE, _listing, features
from ham_hf.errors import DataError
from ham_hf.images import IMAGE_SUFFIXES, open_image
from ham_hf.labels import CLASS_CODES
from ham_hf.repo_ids import is_hub_id

logger = logging.getLogger(__name__)


def _image_files(folder: Path) -> list[Path]:
    """List the image files directly in a folder, sorted."""
    if not folder.is_dir():
        return []
    return sorted(
        Path(e.path) for e in os.scandir(folder) if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES
    )


def _index_images(folders: Sequence[Path]) -> dict[str, Path]:
    """Map image id (file stem) to its path across folders; the first folder wins a repeated id."""
    index: dict[str, Path] = {}
    for folder in folders:
        for path in _image_files(folder):
            index.setdefault(path.stem, path)
    return index


def _check_decodes(paths: Sequence[Path], payloads: Sequence[bytes]) -> None:
    """Raise DataError naming every image that does not decode (decoded at reduced size, threaded)."""

    def bad(i: int) -> str | None:
        try:
            with open_image(payloads[i]) as im:  # the decoders' own rule: pixel limit, readable format
                # JPEG draft mode decodes at 1/8 scale: every byte is still read, so truncation and
                # corruption surface, at a fraction of the cost of a full decode.
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
            return None
        except Exception as exc:  # PIL raises many types for broken files
            return f"{paths[i]} ({type(exc).__name__}: {exc})"

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        failures = [b for b in pool.map(bad, range(len(paths))) if b]
    if failures:
        raise DataError(f"{len(failures)} image(s) do not decode: {_listing(failures)}")


def _read_bytes(paths: Sequence[Path]) -> list[bytes]:
    """Read files as raw bytes (no decoding), threaded."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(Path.read_bytes, paths))


def _build(rows: list[dict], paths: list[Path]):
    """Validate images and build a `datasets.Dataset` on the common schema from rows and image paths."""
    import datasets

    if not rows:
        raise DataError("no images found: the folder holds no labelled image")
    payloads = _read_bytes(paths)
    _check_decodes(paths, payloads)
    images = [{"bytes": b, "path": p.name} for b, p in zip(payloads, paths)]
    columns = {name: images if name == "image" else [r.get(name) for r in rows] for name in features()}
    return datasets.Dataset.from_dict(columns, features=features())


def _label_of(dx: str, where: str) -> int:
    """Return the class id of a dx code (case-insensitive)."""
    try:
        return CLASS_CODES.index(dx.strip().lower())
    except ValueError:
        raise DataError(f"unknown dx value {dx!r} in {where}; expected one of {', '.join(CLASS_CODES)}") from None


def _parse_age(value: str | None) -> float | None:
    """Parse an age field; empty or non-numeric -> None."""
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _none_if_empty(value: str | None) -> str | None:
    """Map an empty CSV field to None."""
    return value if value not in (None, "") else None


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Read a CSV into dict rows, checking that the required columns are there."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path} lacks column(s) {', '.join(missing)}; found {', '.join(reader.fieldnames or [])}")
        return list(reader)


def _check_unique(ids: Sequence[str], where: Path) -> None:
    """Raise DataError if an image id appears in more than one row."""
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        raise DataError(f"duplicated image_id row(s) in {where}: {_listing(repeated)}")


def _match_images(ids: Sequence[str], index: dict[str, Path], where: Path) -> list[Path]:
    """Return the image path of each id, or raise DataError naming the ids without a file."""
    missing = [i for i in ids if i not in index]
    if missing:
        raise DataError(f"{len(missing)} image_id(s) in {where} have no image file: {_listing(missing)}")
    return [index[i] for i in ids]


def read_ham10000(data_dir: str | Path):
    """Read the Kaggle HAM10000 layout (metadata CSV + HAM10000_images_part_* folders)."""
    root = Path(data_dir)
    meta = root / METADATA_FILE
    if not meta.is_file():
        raise DataError(f"missing metadata file {meta}: the HAM10000 layout needs {METADATA_FILE} in {root}")
    records = _read_csv(meta, METADATA_COLUMNS)
    ids = [r["image_id"] for r in records]
    _check_unique(ids, meta)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("ham10000_images"))
    paths = _match_images(ids, _index_images([root, *folders]), meta)
    rows = [
        {
            "label": _label_of(r["dx"], f"{meta} (image_id {r['image_id']})"),
            "image_id": r["image_id"],
            "lesion_id": r["lesion_id"] or r["image_id"],
            "dx_type": _none_if_empty(r["dx_type"]),
            "age": _parse_age(r["age"]),
            "sex": _none_if_empty(r["sex"]),
            "localization": _none_if_empty(r["localization"]),
        }
        for r in records
    ]
    return _build(rows, paths)


def read_isic2018(data_dir: str | Path):
    """Read the ISIC 2018 Task 3 layout: an `*_Input/` folder and a one-hot ground-truth CSV."""
    root = Path(data_dir)
    truths = sorted(root.glob("*GroundTruth*.csv"))
    inputs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.endswith("_Input"))
    if not truths or not inputs:
        raise DataError(f"{root} is not an ISIC 2018 Task 3 folder: it needs a *GroundTruth*.csv and an "
                        "*_Input/ folder")
    records = _read_csv(truths[0], ISIC2018_COLUMNS)
    ids = [r["image"] for r in records]
    _check_unique(ids, truths[0])
    # The optional lesion-groupings file of ISIC 2018 gives HAM10000 lesion ids; without it each
    # image is its own group.
    lesions: dict[str, str] = {}
    for grouping in root.glob("*LesionGroupings*.csv"):
        lesions.update({r["image"]: r["lesion_id"] for r in _read_csv(grouping, ("image", "lesion_id"))})
    paths = _match_images(ids, _index_images(inputs), truths[0])
    rows = []
    for r in records:
        hot = [c for c in ISIC2018_COLUMNS[1:] if float(r[c] or 0) >= 0.5]
        if len(hot) != 1:
            raise DataError(f"image {r['image']} in {truths[0]} has {len(hot)} classes set; expected exactly one")
        rows.append({"label": _label_of(hot[0], str(truths[0])), "image_id": r["image"],
                     "lesion_id": lesions.get(r["image"], r["image"])})
    return _build(rows, paths)


def read_imagefolder(data_dir: str | Path):
    """Read a folder with one sub-folder per class code (akiec/, bcc/, ...); each image is its own lesion.

    Kept rather than `load_dataset("imagefolder")`: that builds an Arrow cache copying every image
    (a second copy of the data on disk before `prepare` writes its own), and it takes any folder name
    as a class, where this reader maps names onto the 7 codes and refuses others by name; the image
    check is the same one the other readers use.
    """
    root = Path(data_dir)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    rows, paths = [], []
    for sub in subdirs:
        label = _label_of(sub.name, f"folder name {sub}")
        for path in _image_files(sub):
            rows.append({"label": label, "image_id": path.stem, "lesion_id": path.stem})
            paths.append(path)
    if not paths:
        raise DataError(f"no images found in {root}: expected one sub-folder per class code ({', '.join(CLASS_CODES)})")
    _check_unique([r["image_id"] for r in rows], root)
    return _build(rows, paths)


LABELS_FILE = "metadata.csv"


def read_labelled_folder(data_dir: str | Path):
    """Read a folder of images with a `metadata.csv` of `file,dx` (paths relative to it, or to its `images/`).

    The form external test sets come in (Derm7pt, PH2, ISIC Archive exports): each image its own
    lesion unless a `lesion_id` column says otherwise; rows with an empty dx (a diagnosis with no
    HAM10000 class) are left out and counted in the log.
    """
    root = Path(data_dir)
    table = _read_csv(root / LABELS_FILE, ("file", "dx"))
    kept = [r for r in table if (r.get("dx") or "").strip()]
    if len(kept) < len(table):
        logger.info("%s: %d of %d rows have no dx (no HAM10000 class): left out", root, len(table) - len(kept),
                    len(table))
    if not kept:
        raise DataError(f"{root / LABELS_FILE} has no row with a dx ({', '.join(CLASS_CODES)})")
    # `file` is relative to the folder (or to its images/ sub-folder).
    index = {r["file"]: next((c for c in (root / r["file"], root / "images" / r["file"]) if c.is_file()), None)
             for r in kept}
    paths = _match_images([r["file"] for r in kept], {k: v for k, v in index.items() if v}, root / LABELS_FILE)
    rows = [{"label": _label_of(r["dx"].strip(), f"{LABELS_FILE} row {r['file']}"), "image_id": Path(r["file"]).stem,
             "lesion_id": _none_if_empty(r.get("lesion_id")) or Path(r["file"]).stem,
             "dx_type": _none_if_empty(r.get("dx_type"))} for r in kept]
    _check_unique([r["image_id"] for r in rows], root)
    return _build(rows, paths)


def from_hub_dataset(raw):
    """Map a loaded dataset (or DatasetDict) with an `image` and a string `dx` column onto the schema."""
    import datasets

    if isinstance(raw, datasets.DatasetDict):
        raw = datasets.concatenate_datasets([raw[k] for k in raw])
    for col in ("image", "dx"):
        if col not in raw.column_names:
            raise DataError(f"the Hub dataset lacks a {col!r} column; found {', '.join(raw.column_names)}")
    unknown = sorted({str(d) for d in raw.unique("dx")} - set(CLASS_CODES) - {c.upper() for c in CLASS_CODES})
    if unknown:
        raise DataError(f"unknown dx value(s) in the Hub dataset: {_listing(unknown)}; "
                        f"expected {', '.join(CLASS_CODES)}")
    n = len(raw)
    image_ids = raw["image_id"] if "image_id" in raw.column_names else [f"hub_{i:06d}" for i in range(n)]
    _check_unique(image_ids, Path("<hub dataset>"))

    def column(name):
        return raw[name] if name in raw.column_names else [None] * n

    lesion_ids = [lesion or i for lesion, i in zip(column("lesion_id"), image_ids)]
    ages = [_parse_age(str(a)) if a is not None else None for a in column("age")]
    table = {
        "image": raw.cast_column("image", datasets.Image(decode=False))["image"],
        "label": [_label_of(d, "the Hub dataset") for d in raw["dx"]],
        "image_id": image_ids,
        "lesion_id": lesion_ids,
        "dx_type": column("dx_type"),
        "age": ages,
        "sex": column("sex"),
        "localization": column("localization"),
    }
    return datasets.Dataset.from_dict(table, features=features())


def read_hub(repo_id: str):
    """Load a Hub dataset id (cached or reachable) whose label is a string `dx` column."""
    import datasets

    return from_hub_dataset(datasets.load_dataset(repo_id))


def detect_layout(source: str | Path) -> str:
    """Name the layout of a source: saved, ham10000, isic2018, imagefolder or hub."""
    path = Path(source)
    if not path.exists():
        if is_hub_id(source):
            return "hub"
        raise DataError(f"data source {source} does not exist (give a folder, or a Hub dataset id ORG/NAME)")
    if not path.is_dir():
        raise DataError(f"data source {source} is not a folder")
    if (path / "dataset_dict.json").is_file():
        return "saved"
    if (path / METADATA_FILE).is_file():
        return "ham10000"
    if any(path.glob("*GroundTruth*.csv")) or any(p.name.endswith("_Input") for p in path.iterdir() if p.is_dir()):
        return "isic2018"
    if (path / LABELS_FILE).is_file():
        return "labelled"
    if any(p.is_dir() for p in path.iterdir() if not p.name.startswith(".")):
        return "imagefolder"
    if not any(path.iterdir()):
        raise DataError(f"data folder {source} is empty")
    raise DataError(
        f"cannot tell the layout of {source}: expected {METADATA_FILE}, an ISIC 2018 *GroundTruth*.csv, "
        f"a {LABELS_FILE} of file,dx, or one sub-folder per class code"
    )


READERS = {"ham10000": read_ham10000, "isic2018": read_isic2018, "labelled": read_labelled_folder,
           "imagefolder": read_imagefolder, "hub": read_hub}


def read_source(source: str | Path):
    """Read any supported raw source into one unsplit `datasets.Dataset`."""
    layout = detect_layout(source)
    if layout == "saved":
        raise DataError(f"{source} is an already prepared dataset: load it with load_splits, not read_source")
    logger.info("reading %s as %s", source, layout)
    return READERS[layout](source)
