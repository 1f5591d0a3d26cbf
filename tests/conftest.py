"""Shared fixtures: tiny synthetic HAM10000-shaped data sets, tiny timm models, the real data when present."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

# Offline before any Hugging Face import: nothing in the tests may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
from PIL import Image

from ham_hf.labels import CLASS_CODES

REPO = Path(__file__).resolve().parents[1]
# The offline ImageNet ResNet-50 (a timm folder), named by RESNET50_DIR: the tests that need it skip without it.
RESNET50_DIR = Path(os.environ["RESNET50_DIR"]).resolve() if os.environ.get("RESNET50_DIR") else None

# Per class: how many lesions, and images per lesion cycle through 1, 2, 3.
LESIONS_PER_CLASS = {"akiec": 4, "bcc": 4, "bkl": 5, "df": 4, "mel": 5, "nv": 8, "vasc": 4}
# A distinct mean colour per class so tiny models can learn something.
CLASS_COLOURS = {
    "akiec": (200, 80, 80), "bcc": (220, 160, 160), "bkl": (140, 100, 60), "df": (180, 140, 110),
    "mel": (50, 30, 30), "nv": (120, 70, 40), "vasc": (180, 30, 60),
}


def tiny_jpeg(path: Path, colour, seed: int, size=(40, 30)) -> None:
    """Write a small noisy JPEG of one dominant colour."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, colour)
    px = img.load()
    for _ in range(60):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        px[x, y] = tuple(min(255, max(0, c + rng.randint(-40, 40))) for c in colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=90)


def make_ham_folder(root: Path, lesions_per_class=None) -> Path:
    """Build a HAM10000-shaped folder (metadata CSV + two part folders) and return it."""
    lesions_per_class = lesions_per_class or LESIONS_PER_CLASS
    root.mkdir(parents=True, exist_ok=True)
    rows, n_img, n_lesion = [], 0, 0
    for code in CLASS_CODES:
        for _ in range(lesions_per_class[code]):
            lesion = f"HAM_{n_lesion:07d}"
            for _ in range(1 + n_lesion % 3):
                image_id = f"ISIC_{n_img:07d}"
                part = "HAM10000_images_part_1" if n_img % 2 == 0 else "HAM10000_images_part_2"
                tiny_jpeg(root / part / f"{image_id}.jpg", CLASS_COLOURS[code], seed=n_img)
                age = "" if n_img % 7 == 0 else str(20.0 + n_img % 60)
                rows.append([lesion, image_id, code, "histo", age, ["male", "female"][n_img % 2], "back"])
                n_img += 1
            n_lesion += 1
    with (root / "HAM10000_metadata.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
        writer.writerows(rows)
    return root


@pytest.fixture
def ham_dir(tmp_path) -> Path:
    """A fresh synthetic HAM10000 folder (safe to modify)."""
    return make_ham_folder(tmp_path / "ham")


@pytest.fixture(scope="session")
def ham_dir_ro(tmp_path_factory) -> Path:
    """A synthetic HAM10000 folder shared by the session (do not modify)."""
    return make_ham_folder(tmp_path_factory.mktemp("ham_ro"))


@pytest.fixture(scope="session")
def real_ham_dir() -> Path:
    """The real HAM10000 copy named by HAM10000_DIR (tests using it skip without it)."""
    value = os.environ.get("HAM10000_DIR")
    if not value or not (Path(value) / "HAM10000_metadata.csv").is_file():
        pytest.skip("HAM10000_DIR is not set to a HAM10000 folder")
    return Path(value)


def _beside_ham(name: str) -> Path:
    """A development folder beside HAM10000_DIR (ood-dev, dermoscopy-external); the test skips without it."""
    value = os.environ.get("HAM10000_DIR")
    folder = Path(value).parent / name if value else None
    if folder is None or not (folder / "metadata.csv").is_file():
        pytest.skip(f"no {name} folder beside HAM10000_DIR")
    return folder


@pytest.fixture(scope="session")
def ood_dev_dir() -> Path:
    """Real non-dermoscopic images by category (an ood-dev folder beside HAM10000_DIR)."""
    return _beside_ham("ood-dev")


@pytest.fixture(scope="session")
def external_dir() -> Path:
    """Dermoscopic images from other sources, with diagnoses (a dermoscopy-external folder beside HAM10000_DIR)."""
    return _beside_ham("dermoscopy-external")


@pytest.fixture(scope="session")
def real_ham(real_ham_dir):
    """The real HAM10000 read once as an unsplit Dataset."""
    from ham_hf import data

    return data.read_ham10000(real_ham_dir)


def make_tiny_backbone(folder: Path, image_size: int = 40) -> Path:
    """Save a tiny randomly initialised timm model with a 1,000-class head, in timm's Hub format."""
    import timm
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, image_size, image_size))
    save_for_hf(model, str(folder), safe_serialization=True)
    return folder


def train_argv(data_dir, backbone, output_dir, *extra) -> list[str]:
    """Arguments of a fast `ham-hf train` run on a tiny model."""
    return ["train", "--data", str(data_dir), "--model_name_or_path", str(backbone), "--output_dir", str(output_dir),
            "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
            "--learning_rate", "1e-2", "--logging_steps", "1", "--seed", "0", *map(str, extra)]


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A tiny ImageNet-style backbone folder (config.json + model.safetensors, 1,000 labels)."""
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, ham_dir_ro, tiny_backbone) -> Path:
    """A tiny model fine-tuned once by `ham-hf train` on the synthetic data: a complete output folder."""
    from ham_hf.cli import main

    out = tmp_path_factory.mktemp("tiny_model")
    # Uncalibrated and without a guard: a guard fitted on these coloured squares would flag real lesions.
    assert main(train_argv(ham_dir_ro, tiny_backbone, out, "--calibrate", "false")) == 0
    return out


@pytest.fixture(scope="session")
def calibrated_tiny_model(tmp_path_factory, ham_dir_ro, tiny_backbone) -> Path:
    """A tiny model trained with the default calibration (temperature folded in, OOD guard fitted)."""
    from ham_hf.cli import main

    out = tmp_path_factory.mktemp("calibrated_tiny_model")
    assert main(train_argv(ham_dir_ro, tiny_backbone, out)) == 0
    return out


BUNDLED_MODEL = REPO / "models" / "ham10000-resnet50"


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    """The bundled default model folder (tests using it skip without it)."""
    if not (BUNDLED_MODEL / "model.safetensors").is_file():
        pytest.skip("no bundled default model in models/ham10000-resnet50")
    return BUNDLED_MODEL


@pytest.fixture(scope="session")
def resnet50_dir() -> Path:
    """The offline ImageNet ResNet-50 folder named by RESNET50_DIR (tests using it skip without it)."""
    if RESNET50_DIR is None or not (RESNET50_DIR / "model.safetensors").is_file():
        pytest.skip("RESNET50_DIR is not set to a timm folder of ImageNet ResNet-50 weights")
    return RESNET50_DIR


@pytest.fixture(scope="session")
def real_images(real_ham_dir) -> dict[str, Path]:
    """One real HAM10000 image path per class (the first listed in the metadata)."""
    chosen: dict[str, Path] = {}
    with (real_ham_dir / "HAM10000_metadata.csv").open() as fh:
        for row in csv.DictReader(fh):
            if row["dx"] not in chosen:
                chosen[row["dx"]] = next(real_ham_dir.glob(f"HAM10000_images_part_*/{row['image_id']}.jpg"))
    return chosen
