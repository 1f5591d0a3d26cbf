"""HAM10000 (and compatible sources) as a Hugging Face `datasets.DatasetDict`.

Reads the public Kaggle layout, the ISIC 2018 Task 3 layout, a plain class-per-folder tree or a
Hub dataset id onto one schema, then splits it into train / validation / test grouped by lesion
(no lesion in two splits), stratified by class and seeded. `prepare` writes the result with
`save_to_disk`, together with `split.csv` (image_id -> split) so that a run can be audited.

    ham-hf prepare --data-dir ../shared/data/ham10000 --output data/ham10000
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ham_hf.errors import DataError
from ham_hf.images import open_image
from ham_hf.labels import CLASS_CODES
from ham_hf.repo_ids import is_hub_id

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
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


@dataclass
class SplitArguments:
    """How a data set is split: fractions and seed (the one place that decides the split)."""

    train_fraction: float = field(default=0.70, metadata={"help": "Share of images for training."})
    validation_fraction: float = field(
        default=0.15, metadata={"help": "Share of images for validation (model selection)."}
    )
    test_fraction: float = field(default=0.15, metadata={"help": "Share of images held out for the final test."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the lesion-grouped split."})

    def __post_init__(self):
        fractions = self.fractions
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6 or self.train_fraction <= 0:
            raise DataError(
                f"split fractions must be >= 0, sum to 1 and give training a share; got train="
                f"{self.train_fraction}, validation={self.validation_fraction}, test={self.test_fraction}"
            )

    def describe(self) -> str:
        """Say in one paragraph how the split is made (for cards and reports)."""
        t, v, s = (round(100 * f) for f in self.fractions)
        return (
            f"Train / validation / test = {t} / {v} / {s} % of the images, grouped by `lesion_id` (all images of "
            "one lesion, and byte-identical images, fall in one split), stratified by diagnosis, seed "
            f"{self.split_seed}. `split.csv` lists every image_id with its split."
        )

    @property
    def fractions(self) -> tuple[float, float, float]:
        """Return (train, validation, test) fractions."""
        return (self.train_fraction, self.validation_fraction, self.test_fraction)


# ----------------------------------------------------------------------------- reading


def _listing(ids: Iterable[str]) -> str:
    """Format offending ids for an error message, at most _MAX_LISTED of them."""
    ids = sorted(set(map(str, ids)))
    shown = ", ".join(ids[:_MAX_LISTED])
    more = len(ids) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


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
    """Read a folder with one sub-folder per class code (akiec/, bcc/, ...); each image is its own lesion."""
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
    if any(p.is_dir() for p in path.iterdir() if not p.name.startswith(".")):
        return "imagefolder"
    if not any(path.iterdir()):
        raise DataError(f"data folder {source} is empty")
    raise DataError(
        f"cannot tell the layout of {source}: expected {METADATA_FILE}, an ISIC 2018 *GroundTruth*.csv, "
        "or one sub-folder per class code"
    )


READERS = {"ham10000": read_ham10000, "isic2018": read_isic2018, "imagefolder": read_imagefolder, "hub": read_hub}


def read_source(source: str | Path):
    """Read any supported raw source into one unsplit `datasets.Dataset`."""
    layout = detect_layout(source)
    if layout == "saved":
        raise DataError(f"{source} is an already prepared dataset: load it with load_splits, not read_source")
    logger.info("reading %s as %s", source, layout)
    return READERS[layout](source)


# ----------------------------------------------------------------------------- duplicates & split


def find_duplicates(dataset) -> list[list[str]]:
    """Return groups of image_ids whose image files are byte-identical."""
    import datasets

    raw = dataset.cast_column("image", datasets.Image(decode=False))
    by_hash: dict[str, list[str]] = defaultdict(list)
    for image, image_id in zip(raw["image"], raw["image_id"]):
        by_hash[hashlib.sha256(image["bytes"]).hexdigest()].append(image_id)
    return sorted(sorted(ids) for ids in by_hash.values() if len(ids) > 1)


def _groups(lesion_ids: Sequence[str], image_ids: Sequence[str], duplicates: list[list[str]]) -> list[int]:
    """Assign each row a group: one per lesion, with lesions joined where they share a duplicate image.

    The groups are the connected components of a lesion graph whose edges are the duplicates,
    numbered in order of first appearance (so a split depends only on the data and the seed).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    index = {lesion: i for i, lesion in enumerate(dict.fromkeys(lesion_ids))}
    lesion_of = dict(zip(image_ids, lesion_ids))
    edges = [(index[lesion_of[ids[0]]], index[lesion_of[other]]) for ids in duplicates for other in ids[1:]]
    rows, cols = (list(e) for e in zip(*edges)) if edges else ([], [])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(index), len(index)))
    component = connected_components(graph, directed=False)[1]
    of_row = [component[index[lesion]] for lesion in lesion_ids]
    numbering = {c: i for i, c in enumerate(dict.fromkeys(of_row))}
    return [numbering[c] for c in of_row]


def assign_splits(labels: Sequence[int], groups: Sequence[int], args: SplitArguments) -> np.ndarray:
    """Return the split index (0 train, 1 validation, 2 test) of each row, grouped and stratified."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    rng = np.random.default_rng(args.split_seed)
    members: dict[int, list[int]] = defaultdict(list)
    for row, g in enumerate(groups):
        members[int(g)].append(row)
    # A group is stratified by its most common label (HAM10000 lesions carry a single dx).
    group_label = {g: Counter(labels[rows].tolist()).most_common(1)[0][0] for g, rows in members.items()}
    split = np.empty(len(labels), dtype=np.int64)
    fractions = np.asarray(args.fractions)
    for cls in sorted(set(group_label.values())):
        cls_groups = [g for g in members if group_label[g] == cls]
        rng.shuffle(cls_groups)
        # Large groups first, so the small ones can even out the fractions at the end.
        cls_groups.sort(key=lambda g: -len(members[g]))
        target = fractions * sum(len(members[g]) for g in cls_groups)
        filled = np.zeros(3)
        for g in cls_groups:
            s = int(np.argmax(target - filled))
            filled[s] += len(members[g])
            split[members[g]] = s
    return split


def split_dataset(dataset, args: SplitArguments | None = None, duplicates: list[list[str]] | None = None):
    """Split a dataset into a DatasetDict(train, validation, test) grouped by lesion and duplicates."""
    import datasets

    args = args or SplitArguments()
    duplicates = find_duplicates(dataset) if duplicates is None else duplicates
    groups = _groups(dataset["lesion_id"], dataset["image_id"], duplicates)
    split = assign_splits(dataset["label"], groups, args)
    return datasets.DatasetDict(
        {name: dataset.select(np.flatnonzero(split == i)) for i, name in enumerate(SPLITS)}
    )


def split_table(dsd) -> list[dict[str, str]]:
    """Return one row per image: image_id, lesion_id, dx, split (what split.csv holds)."""
    rows = []
    for name in SPLITS:
        ds = dsd[name]
        for image_id, lesion_id, label in zip(ds["image_id"], ds["lesion_id"], ds["label"]):
            rows.append({"image_id": image_id, "lesion_id": lesion_id, "dx": CLASS_CODES[label], "split": name})
    return rows


def write_split_file(dsd, path: str | Path) -> Path:
    """Write split.csv (image_id -> split) for reproduction and audit."""
    path = Path(path)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image_id", "lesion_id", "dx", "split"])
        writer.writeheader()
        writer.writerows(split_table(dsd))
    return path


def class_counts(dsd) -> dict[str, dict[str, int]]:
    """Return {split: {class code: image count}}."""
    out = {}
    for name in dsd:
        counts = Counter(dsd[name]["label"])
        out[name] = {code: counts.get(i, 0) for i, code in enumerate(CLASS_CODES)}
    return out


# ----------------------------------------------------------------------------- prepare & load


def _check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output folder that already holds something, unless overwrite is set."""
    if output.exists() and not output.is_dir():
        raise DataError(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise DataError(f"output folder {output} is not empty; pass --overwrite to replace it")


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
    return dsd


def load_splits(source: str | Path, split_args: SplitArguments | None = None):
    """Return a DatasetDict from a prepared folder (as saved) or from any raw source (split now)."""
    import datasets

    if detect_layout(source) == "saved":
        return datasets.load_from_disk(str(source))
    return split_dataset(read_source(source), split_args)


# ----------------------------------------------------------------------------- exploration


def metadata_frame(dataset):
    """Return the metadata (no images) as a pandas DataFrame with a `dx` code column."""
    frame = dataset.remove_columns("image").to_pandas()
    frame["dx"] = [CLASS_CODES[i] for i in frame["label"]]
    return frame


def plain_split_leakage(dataset, args: SplitArguments | None = None) -> dict[str, int]:
    """Count what a plain (not lesion-grouped) stratified split with the same fractions would leak.

    Returns how many lesions would have images both in training and in the held-out part
    (validation + test), and how many held-out images have a sibling of the same lesion in training.
    """
    from sklearn.model_selection import train_test_split

    args = args or SplitArguments()
    idx = np.arange(len(dataset))
    labels = np.asarray(dataset["label"])
    lesions = np.asarray(dataset["lesion_id"])
    held_out = args.validation_fraction + args.test_fraction
    train_idx, rest = train_test_split(idx, test_size=held_out, stratify=labels, random_state=args.split_seed)
    train_lesions = set(lesions[train_idx])
    return {
        "lesions_in_train_and_held_out": len(train_lesions & set(lesions[rest])),
        "held_out_images_with_lesion_in_train": int(sum(lesions[i] in train_lesions for i in rest)),
        "held_out_images": int(len(rest)),
    }
