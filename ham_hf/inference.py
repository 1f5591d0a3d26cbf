"""One loaded classifier: preprocess, predict (optionally with test-time augmentation), label.

    clf = Classifier("outputs/ham10000-resnet50")            # or a Hub id
    clf.predict(["lesion.jpg"], tta=True)[0].label()          # {"Melanoma (mel)": 0.81, ...}

Preprocessing is the model's own eval transform (the same as `pipeline("image-classification")`).
On the CPU the forward pass runs in ONNX Runtime when it is installed (exported here from the
safetensors weights, cached by digest), otherwise in PyTorch (inference mode, channels_last);
both give the same probabilities. Weights are read only as safetensors; no remote code runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ham_hf import model as model_lib
from ham_hf.errors import ImageError, ModelError
from ham_hf.labels import CLASS_CODES, MALIGNANT, display_name
from ham_hf.metrics import softmax
from ham_hf.transforms import Preprocess, decode_images, load_rgb, resize_square

logger = logging.getLogger(__name__)

# Test-time augmentation views: the 8 symmetries of the square (4 rotations x optional flip).
TTA_VIEWS = 8


@dataclass(frozen=True)
class Prediction:
    """Class probabilities of one image."""

    probabilities: dict[str, float]  # class code -> probability, all 7

    @property
    def top(self) -> str:
        """The most probable class code."""
        return max(self.probabilities, key=self.probabilities.get)

    @property
    def malignant_probability(self) -> float:
        """Summed probability of the malignant classes (akiec, bcc, mel)."""
        return float(sum(p for c, p in self.probabilities.items() if c in MALIGNANT))

    @property
    def group(self) -> str:
        """"malignant" or "benign", by the larger summed probability."""
        return "malignant" if self.malignant_probability >= 0.5 else "benign"

    def label(self) -> dict[str, float]:
        """Long names with codes -> probability, as gr.Label takes it."""
        return {display_name(c): p for c, p in self.probabilities.items()}


def tta_views(x: torch.Tensor) -> torch.Tensor:
    """Stack the 8 dihedral views of a (B, 3, H, W) batch into (8B, 3, H, W)."""
    views = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(-2, -1))
        views += [r, r.flip(-1)]
    return torch.cat(views)


def resolve_model(explicit: str | None, default_dir: str | Path | None) -> str:
    """Pick the model: explicit value, else HAM_MODEL, else the bundled default folder; explain if none."""
    chosen = explicit or os.environ.get("HAM_MODEL")
    if chosen:
        return chosen
    if default_dir and (Path(default_dir) / "config.json").is_file():
        return str(default_dir)
    raise ModelError(
        "No model to serve. Pass --model DIR_OR_HUB_ID or set HAM_MODEL (a folder written by `ham-hf train`, "
        "or a Hub id such as ORG/ham10000-resnet50); to train one: `ham-hf prepare --data-dir "
        "../shared/data/ham10000 --output data/ham10000 && ham-hf train --data data/ham10000 "
        "--model_name_or_path ../shared/weights/resnet50-imagenet --output_dir models/ham10000-resnet50`."
    )


class Classifier:
    """A HAM10000 classifier loaded once from a Hub id or a local folder."""

    def __init__(self, name_or_path: str, backend: str = "auto", device: str | None = None):
        if not model_lib.is_fine_tuned(name_or_path):
            raise ModelError(f"{name_or_path} is not a HAM10000 classifier (its labels are not "
                             f"{', '.join(CLASS_CODES)}); fine-tune it with `ham-hf train` first")
        from transformers import TimmWrapperForImageClassification

        self.name = name_or_path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.model = TimmWrapperForImageClassification.from_pretrained(name_or_path, use_safetensors=True)
        except OSError as exc:
            raise ModelError(f"cannot load weights from {name_or_path!r}: only model.safetensors is read "
                             f"(pickled checkpoints are refused) ({exc})") from None
        self.model = self.model.float().eval().to(self.device).to(memory_format=torch.channels_last)
        self.data_config = model_lib.data_config(self.model)
        self.preprocess = Preprocess(self.data_config).to(self.device)
        self.backend = self._choose_backend(backend)
        logger.info("loaded %s (%s, %d px, backend %s)", name_or_path, self.device, self.data_config.size, self.backend)

    def _choose_backend(self, backend: str) -> str:
        """Use ONNX Runtime on the CPU when available (auto), else PyTorch."""
        if backend == "torch" or (backend == "auto" and self.device.type != "cpu"):
            return "torch"
        try:
            import onnxruntime as ort

            from ham_hf.export import cached_onnx
        except ImportError:
            if backend == "onnx":
                raise ModelError("the onnx backend needs `pip install onnx onnxruntime`") from None
            return "torch"
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        path = cached_onnx(self.model, self.data_config.size)
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return "onnx"

    def images_to_tensor(self, images: Sequence) -> torch.Tensor:
        """Decode and preprocess images (paths, bytes or PIL) into a normalised batch on the device."""
        dc = self.data_config
        if len(images) == 1:  # the app's path: no thread pool
            cached = torch.from_numpy(resize_square(load_rgb(images[0], dc.resize), dc.resize, dc.interpolation))[None]
        else:
            cached = decode_images(list(images), dc.resize, dc.interpolation, threads=min(4, len(images)))
        return self.preprocess(cached.to(self.device), train=False)

    @torch.inference_mode()
    def logits(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Run the model on a preprocessed batch; return float64 logits."""
        if self.backend == "onnx":
            out = self._session.run(None, {"pixel_values": pixel_values.contiguous().cpu().numpy()})[0]
            return out.astype(np.float64)
        return self.model(pixel_values=pixel_values).logits.double().cpu().numpy()

    def predict_proba(self, images: Sequence, tta: bool = False) -> np.ndarray:
        """Return (N, 7) probabilities; with tta, averaged over the 8 flip / 90-degree views."""
        x = self.images_to_tensor(images)
        if not tta:
            return softmax(self.logits(x))
        probs = softmax(self.logits(tta_views(x)))
        return probs.reshape(TTA_VIEWS, len(images), -1).mean(axis=0)

    def predict(self, images: Sequence, tta: bool = False) -> list[Prediction]:
        """Return one Prediction per image."""
        probs = self.predict_proba(images, tta)
        return [Prediction(dict(zip(CLASS_CODES, map(float, row)))) for row in probs]


def list_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image files."""
    from ham_hf.data import IMAGE_SUFFIXES

    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(p)
    return found


def predict_files(classifier: Classifier, files: Sequence[Path], batch_size: int = 32, tta: bool = False,
                  progress: bool = True) -> tuple[list[dict], list[tuple[str, str]]]:
    """Predict image files in batches; return (rows with all 7 probabilities, [(file, reason) skipped])."""
    from tqdm.auto import tqdm

    rows, skipped, batch, names = [], [], [], []

    def flush():
        for name, row in zip(names, classifier.predict_proba(batch, tta)):
            pred = Prediction(dict(zip(CLASS_CODES, map(float, row))))
            rows.append({"path": name, "predicted": pred.top, "group": pred.group,
                         "malignant_probability": round(pred.malignant_probability, 6),
                         **{f"prob_{c}": round(p, 6) for c, p in pred.probabilities.items()}})
        batch.clear()
        names.clear()

    for path in tqdm(files, desc="predict", unit="img", disable=not progress):
        try:
            batch.append(load_rgb(str(path), reduce_to=classifier.data_config.resize))
            names.append(str(path))
        except (ImageError, OSError) as exc:
            logger.warning("skipped %s: %s", path, exc)
            skipped.append((str(path), str(exc)))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return rows, skipped
