"""ham_hf.data: readers, the lesion-grouped split, prepare, and every bad input."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import datasets
import pytest
from PIL import Image

from ham_hf import data
from ham_hf.cli import main
from ham_hf.labels import CLASS_CODES

from conftest import tiny_jpeg


def _lesions(dsd) -> dict[str, set[str]]:
    return {name: set(dsd[name]["lesion_id"]) for name in dsd}


def _assert_no_leak(dsd) -> None:
    les = _lesions(dsd)
    assert not les["train"] & les["validation"]
    assert not les["train"] & les["test"]
    assert not les["validation"] & les["test"]


# ----------------------------------------------------------------------------- reading


def test_reads_kaggle_layout_onto_schema(ham_dir_ro):
    ds = data.read_ham10000(ham_dir_ro)
    assert ds.features["label"].names == list(CLASS_CODES)
    assert isinstance(ds.features["image"], datasets.Image)
    assert list(ds.features) == ["image", "label", "image_id", "lesion_id", "dx_type", "age", "sex", "localization"]
    meta = list(csv.DictReader((ham_dir_ro / "HAM10000_metadata.csv").open()))
    assert len(ds) == len(meta)
    first = ds[0]
    assert first["image"].size == (40, 30)
    assert first["image_id"] == meta[0]["image_id"]
    assert CLASS_CODES[first["label"]] == meta[0]["dx"]
    assert first["age"] is None  # the fixture leaves every 7th age empty, starting with the first
    assert ds[1]["age"] == pytest.approx(float(meta[1]["age"]))
    assert set(ds["label"]) == set(range(7))


def test_reads_isic2018_layout(tmp_path):
    root = tmp_path / "isic"
    inputs = root / "ISIC2018_Task3_Training_Input"
    order = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    root.mkdir()
    with (root / "ISIC2018_Task3_Training_GroundTruth.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", *order])
        for i in range(14):
            code = order[i % 7]
            tiny_jpeg(inputs / f"ISIC_{i:07d}.jpg", (100, 50, 50), seed=i)
            writer.writerow([f"ISIC_{i:07d}", *[("1.0" if c == code else "0.0") for c in order]])
    ds = data.read_source(root)
    assert len(ds) == 14
    assert CLASS_CODES[ds[0]["label"]] == "mel" and CLASS_CODES[ds[3]["label"]] == "akiec"
    assert ds["lesion_id"] == ds["image_id"]  # no lesion ids: each image is its own group
    assert ds[0]["age"] is None


def test_reads_imagefolder(tmp_path):
    for i, code in enumerate(CLASS_CODES):
        for j in range(2):
            tiny_jpeg(tmp_path / "folder" / code / f"img_{i}_{j}.jpg", (i * 30, 80, 80), seed=i * 10 + j)
    ds = data.read_source(tmp_path / "folder")
    assert len(ds) == 14
    assert Counter(ds["label"]) == {i: 2 for i in range(7)}


def test_reads_a_labelled_folder_as_external_sets_come(tmp_path):
    """A metadata.csv of file,dx (as Derm7pt / PH2 exports come): empty dx left out, a class may be absent."""
    root = tmp_path / "external"
    rows = ["file,dx,source_dataset"]
    for i, code in enumerate(["mel", "nv", "nv", "bcc", "df", ""]):
        tiny_jpeg(root / "images" / f"x_{i}.jpg", (i * 30, 80, 80), seed=i)
        rows.append(f"images/x_{i}.jpg,{code},somewhere")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    assert data.detect_layout(root) == "labelled"
    ds = data.read_source(root)
    assert len(ds) == 5 and Counter(ds["label"]) == {4: 1, 5: 2, 1: 1, 3: 1}
    assert ds["lesion_id"] == ds["image_id"]  # each image its own lesion
    (root / "metadata.csv").write_text("file,dx\nimages/missing.jpg,mel\n")
    with pytest.raises(data.DataError, match="missing.jpg"):
        data.read_source(root)
    (root / "metadata.csv").write_text("file,dx\nimages/x_0.jpg,\n")
    with pytest.raises(data.DataError, match="no row with a dx"):
        data.read_source(root)


def test_hub_dataset_maps_dx_strings():
    img = Image.new("RGB", (8, 8), (1, 2, 3))
    features = datasets.Features({"image": datasets.Image(), "dx": datasets.Value("string"),
                                  "age": datasets.Value("float32")})
    raw = datasets.Dataset.from_dict({"image": [img, img, img], "dx": ["mel", "nv", "VASC"], "age": [30, None, 5]},
                                     features=features)
    ds = data.from_hub_dataset(datasets.DatasetDict({"train": raw}))
    assert [CLASS_CODES[i] for i in ds["label"]] == ["mel", "nv", "vasc"]
    assert ds["age"] == [30.0, None, 5.0]
    assert ds[0]["image"].size == (8, 8)


def test_hub_dataset_refuses_unknown_dx():
    raw = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 2, "dx": ["mel", "scc"]})
    with pytest.raises(data.DataError, match="unknown dx value.*scc"):
        data.from_hub_dataset(raw)


def test_read_hub_loads_a_dataset_repo_through_load_dataset(tmp_path):
    """A Hub-style dataset repo (parquet with an image and a string dx column), loaded by the real load_dataset."""
    repo = tmp_path / "someone__ham10000"
    (repo / "data").mkdir(parents=True)
    raw = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4), c) for c in ((1, 2, 3), (9, 9, 9))],
                                      "dx": ["df", "MEL"], "lesion_id": ["L1", "L2"]},
                                     features=datasets.Features({"image": datasets.Image(),
                                                                 "dx": datasets.Value("string"),
                                                                 "lesion_id": datasets.Value("string")}))
    raw.to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    ds = data.read_hub(str(repo))
    assert [CLASS_CODES[i] for i in ds["label"]] == ["df", "mel"] and ds["lesion_id"] == ["L1", "L2"]
    assert ds.features == data.features()
    assert data.detect_layout("someone/ham10000") == "hub"  # an id that is not a local path


# ----------------------------------------------------------------------------- split


def test_split_is_grouped_stratified_and_seeded(ham_dir_ro):
    ds = data.read_ham10000(ham_dir_ro)
    a = data.split_dataset(ds, data.SplitArguments(split_seed=1))
    b = data.split_dataset(ds, data.SplitArguments(split_seed=1))
    c = data.split_dataset(ds, data.SplitArguments(split_seed=2))
    _assert_no_leak(a)
    assert sum(len(a[s]) for s in a) == len(ds)
    assert data.split_table(a) == data.split_table(b)
    assert data.split_table(a) != data.split_table(c)
    # Every class with at least 4 lesions reaches all three splits.
    for name in data.SPLITS:
        assert set(a[name]["label"]) == set(range(7)), name


def test_split_fractions_are_configurable(ham_dir_ro):
    ds = data.read_ham10000(ham_dir_ro)
    dsd = data.split_dataset(ds, data.SplitArguments(train_fraction=0.5, validation_fraction=0.5, test_fraction=0.0))
    assert len(dsd["test"]) == 0
    assert abs(len(dsd["train"]) - len(dsd["validation"])) <= 0.25 * len(ds)


def test_bad_fractions_are_refused():
    with pytest.raises(data.DataError, match="sum to 1"):
        data.SplitArguments(train_fraction=0.8, validation_fraction=0.3, test_fraction=0.1)


def test_duplicate_images_are_reported_and_never_straddle(ham_dir):
    meta = list(csv.reader((ham_dir / "HAM10000_metadata.csv").open()))
    a, b = meta[1], meta[-1]  # different lesions, different classes
    src = next(ham_dir.glob(f"*/{a[1]}.jpg"))
    shutil.copyfile(src, next(ham_dir.glob(f"*/{b[1]}.jpg")))
    ds = data.read_ham10000(ham_dir)
    dups = data.find_duplicates(ds)
    assert dups == [sorted([a[1], b[1]])]
    for seed in range(10):
        split = data.split_dataset(ds, data.SplitArguments(split_seed=seed))
        table = {r["image_id"]: r["split"] for r in data.split_table(split)}
        assert table[a[1]] == table[b[1]]


# ----------------------------------------------------------------------------- prepare


def test_prepare_cli_writes_dataset_split_file_and_duplicates(ham_dir_ro, tmp_path):
    out = tmp_path / "prepared"
    assert main(["prepare", "--data-dir", str(ham_dir_ro), "--output", str(out), "--split-seed", "3"]) == 0
    dsd = datasets.load_from_disk(str(out))
    assert set(dsd) == set(data.SPLITS)
    rows = list(csv.DictReader((out / data.SPLIT_FILE).open()))
    assert {r["image_id"]: r["split"] for r in rows} == {
        i: s for s in data.SPLITS for i in dsd[s]["image_id"]
    }
    assert json.loads((out / data.DUPLICATES_FILE).read_text()) == []
    assert data.load_splits(out)["train"]["image_id"] == dsd["train"]["image_id"]
    # Same seed, same split when splitting straight from the raw folder.
    raw = data.load_splits(ham_dir_ro, data.SplitArguments(split_seed=3))
    assert raw["test"]["image_id"] == dsd["test"]["image_id"]


def test_prepare_refuses_non_empty_output_unless_overwrite(ham_dir_ro, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(data.DataError, match="not empty.*--overwrite"):
        data.prepare(ham_dir_ro, out)
    assert (out / "keep.txt").exists()
    data.prepare(ham_dir_ro, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "dataset_dict.json").exists()


def test_push_to_hub_writes_a_dataset_card(ham_dir_ro, tmp_path, monkeypatch):
    from huggingface_hub import DatasetCard, HfApi

    pushed = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://hf.co/datasets/{repo_id}")
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", lambda self, repo_id, **kw: pushed.update(data=repo_id))
    monkeypatch.setattr(DatasetCard, "push_to_hub",
                        lambda self, repo_id, **kw: pushed.update(card=self, card_repo=repo_id))
    argv = ["prepare", "--data-dir", str(ham_dir_ro), "--output", str(tmp_path / "o"), "--push-to-hub", "me/ham"]
    assert main(argv) == 0
    assert pushed["data"] == pushed["card_repo"] == "me/ham"
    card = DatasetCard(str(pushed["card"]))
    assert card.data.license == "cc-by-nc-sa-4.0"
    text = card.text
    assert "Tschandl" in text and "lesion_id" in text and "| mel (Melanoma) |" in text


# ----------------------------------------------------------------------------- bad input


def _rewrite_metadata(ham_dir: Path, edit) -> None:
    path = ham_dir / "HAM10000_metadata.csv"
    rows = list(csv.reader(path.open()))
    rows = edit(rows)
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def _assert_refused(source, out: Path, match: str) -> None:
    with pytest.raises(data.DataError, match=match):
        data.prepare(source, out)
    assert not out.exists(), "nothing may be written on failure"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "staging folder left behind"


def test_missing_metadata_file(ham_dir, tmp_path):
    (ham_dir / "HAM10000_metadata.csv").rename(ham_dir / "other.csv")
    with pytest.raises(data.DataError, match="missing metadata file .*HAM10000_metadata.csv"):
        data.read_ham10000(ham_dir)


def test_missing_metadata_column(ham_dir, tmp_path):
    _rewrite_metadata(ham_dir, lambda rows: [r[:2] + r[3:] for r in rows])  # drop dx
    _assert_refused(ham_dir, tmp_path / "out", r"lacks column\(s\) dx")


def test_image_id_without_file(ham_dir, tmp_path):
    victim = next(ham_dir.glob("HAM10000_images_part_2/*.jpg"))
    victim.unlink()
    _assert_refused(ham_dir, tmp_path / "out", rf"have no image file: {victim.stem}")


def test_image_that_does_not_decode(ham_dir, tmp_path):
    victim = next(ham_dir.glob("HAM10000_images_part_1/*.jpg"))
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])  # truncated JPEG
    other = next(ham_dir.glob("HAM10000_images_part_2/*.jpg"))
    other.write_bytes(b"this is not an image")
    _assert_refused(ham_dir, tmp_path / "out", rf"2 image\(s\) do not decode: .*{victim.name}.*")


def test_unknown_dx_value(ham_dir, tmp_path):
    _rewrite_metadata(ham_dir, lambda rows: rows[:3] + [rows[3][:2] + ["scc"] + rows[3][3:]] + rows[4:])
    _assert_refused(ham_dir, tmp_path / "out", r"unknown dx value 'scc'.*image_id ISIC_0000002")


def test_duplicated_image_id_row(ham_dir, tmp_path):
    _rewrite_metadata(ham_dir, lambda rows: rows + [rows[5]])
    _assert_refused(ham_dir, tmp_path / "out", r"duplicated image_id row\(s\).*ISIC_0000004")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_refused(tmp_path / "empty", tmp_path / "out", "is empty")


def test_missing_source(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.read_source(tmp_path / "nope")


def test_cli_reports_data_errors_without_traceback(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    assert main(["prepare", "--data-dir", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    assert "is empty" in caplog.text


# ----------------------------------------------------------------------------- the real data


def test_real_ham10000_counts(real_ham):
    assert len(real_ham) == 10_015
    assert len(set(real_ham["lesion_id"])) == 7_470
    counts = Counter(CLASS_CODES[i] for i in real_ham["label"])
    assert counts == {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}
    assert sum(a is None for a in real_ham["age"]) == 57


def test_real_ham10000_split(real_ham):
    dups = data.find_duplicates(real_ham)
    assert dups == [["ISIC_0024366", "ISIC_0029861"], ["ISIC_0024777", "ISIC_0029938"]]
    a = data.split_dataset(real_ham, data.SplitArguments(), dups)
    b = data.split_dataset(real_ham, data.SplitArguments(), dups)
    _assert_no_leak(a)
    assert data.split_table(a) == data.split_table(b)
    sizes = {s: len(a[s]) for s in a}
    assert sizes["train"] == pytest.approx(0.70 * 10_015, abs=30)
    assert sizes["validation"] == pytest.approx(0.15 * 10_015, abs=30)
    # What grouping prevents: a plain stratified split leaks hundreds of lesions into the held-out part.
    from ham_hf.data import explore

    leak = explore.plain_split_leakage(real_ham)
    assert leak["lesions_in_train_and_held_out"] > 300
    assert 0 < leak["held_out_images_with_lesion_in_train"] < leak["held_out_images"]
    # Stratified: each class keeps its share in every split.
    for name, per_class in data.class_counts(a).items():
        assert per_class["mel"] / len(a[name]) == pytest.approx(1113 / 10_015, abs=0.01)


def test_prepare_takes_the_common_spellings_and_the_old_ones(ham_dir_ro, tmp_path):
    from ham_hf.cli import parse
    from ham_hf.data import PrepareArguments

    new = parse(["--data", str(ham_dir_ro), "--output_dir", str(tmp_path / "a")], PrepareArguments)[0]
    old = parse(["--data-dir", str(ham_dir_ro), "--output", str(tmp_path / "a")], PrepareArguments)[0]
    assert new == old and new.data == str(ham_dir_ro) and new.output_dir == str(tmp_path / "a")


def test_prepare_refuses_an_image_over_the_pixel_limit_as_training_would(ham_dir, tmp_path):
    """One rule for prepare and the decoders: an image too large to decode safely stops prepare, by name."""
    from ham_hf.transforms import MAX_PIXELS

    victim = next(ham_dir.glob("HAM10000_images_part_1/*.jpg"))
    side = int(MAX_PIXELS ** 0.5) + 100
    Image.new("1", (side, side)).save(victim, format="PNG")  # a small file, a huge image
    with pytest.raises(data.DataError, match=f"{victim.stem}.*too large to decode safely"):
        data.prepare(str(ham_dir), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
