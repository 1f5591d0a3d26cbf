"""Lesion images that look like other sources: does the app still answer, and answer right?

    .venv/bin/python benchmarks/robustness.py --data-dir "$HAM10000_DIR" \
        --model models/ham10000-resnet50 [--n 400] [--no-field-of-view-crop]

Validation images of the model's own split (`split.csv`), seeded sample, each changed the way other
clinics, cameras and uploads change them (a round dermoscope frame, a black canvas, zoom, JPEG,
blur, colour casts, greyscale, a large photo), then predicted as the app does with TTA off (one view). Per change:
the share the out-of-distribution guard keeps, and the accuracy and balanced accuracy (mean recall over
the classes: the selection metric, which a model tuned for it trades some accuracy for) against the
dermatologists' labels.
`--no-field-of-view-crop` turns the black-frame crop off, to measure what it is worth;
`--shades-of-grey` adds colour constancy after it, at inference only, to measure what that would
be worth without retraining.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from common import arguments, emit, model_folder


def framed(img: Image.Image, radius: float) -> Image.Image:
    """A round black field of view of `radius` x the short side."""
    mask = Image.new("L", img.size, 0)
    r, cx, cy = radius * min(img.size), img.width / 2, img.height / 2
    ImageDraw.Draw(mask).ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    return Image.composite(img, Image.new("RGB", img.size), mask)


def letterboxed(img: Image.Image, factor: float = 0.6) -> Image.Image:
    """The image shrunk onto a black canvas of its own size."""
    small = img.resize((int(img.width * factor), int(img.height * factor)))
    canvas = Image.new("RGB", img.size)
    canvas.paste(small, ((img.width - small.width) // 2, (img.height - small.height) // 2))
    return canvas


def zoomed(img: Image.Image, factor: float) -> Image.Image:
    """The central `factor` of the image, resized back to its size."""
    w, h = int(img.width * factor), int(img.height * factor)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return img.crop((left, top, left + w, top + h)).resize(img.size, Image.BICUBIC)


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    """Re-encoded as a JPEG of `quality`."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def tinted(img: Image.Image, gains: tuple[float, float, float]) -> Image.Image:
    """Per-channel gains: a camera's colour cast."""
    return Image.fromarray(np.clip(np.asarray(img, np.float32) * gains, 0, 255).astype(np.uint8))


def shades_of_grey(img: Image.Image, p: int = 6) -> Image.Image:
    """Colour constancy (Finlayson & Trezzi, 2004): divide each channel by its L^p-norm illuminant estimate."""
    a = np.asarray(img, np.float32)
    illuminant = np.power(np.mean(np.power(a / 255.0, p), axis=(0, 1)), 1 / p)
    illuminant = illuminant / np.linalg.norm(illuminant) * np.sqrt(3)
    return Image.fromarray(np.clip(a / illuminant, 0, 255).astype(np.uint8))


CHANGES = {
    "none": lambda im: im,
    "round frame, radius 0.5": lambda im: framed(im, 0.5),
    "round frame, radius 0.42": lambda im: framed(im, 0.42),
    "on a black canvas at 0.6": letterboxed,
    "zoom in 0.6": lambda im: zoomed(im, 0.6),
    "zoom in 0.4": lambda im: zoomed(im, 0.4),
    "JPEG quality 25": lambda im: jpeg(im, 25),
    "blur radius 2": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
    "warm cast": lambda im: tinted(im, (1.15, 1.0, 0.85)),
    "cool cast": lambda im: tinted(im, (0.85, 1.0, 1.15)),
    "brightness 1.4": lambda im: ImageEnhance.Brightness(im).enhance(1.4),
    "brightness 0.6": lambda im: ImageEnhance.Brightness(im).enhance(0.6),
    "saturation 0.5": lambda im: ImageEnhance.Color(im).enhance(0.5),
    "greyscale": lambda im: im.convert("L").convert("RGB"),
    "4x upscaled (an 800 px photo)": lambda im: im.resize((im.width * 4, im.height * 4), Image.BICUBIC),
}


def main() -> None:
    """Predict every change of the sample and log kept / accuracy per change."""
    p = arguments(__doc__)
    p.add_argument("--model", required=True, help="a model folder with split.csv (the bundled one, or a run)")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--backend", default="auto")
    p.add_argument("--no-field-of-view-crop", action="store_true", help="measure without the black-frame crop")
    p.add_argument("--shades-of-grey", action="store_true", help="colour constancy after the crop (inference only)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ham_hf import transforms
    from ham_hf.labels import CLASS_CODES
    from ham_hf.serve.classifier import Classifier

    crop = (lambda img: img) if a.no_field_of_view_crop else transforms.crop_field_of_view
    # load_rgb looks the name up at call time
    transforms.crop_field_of_view = (lambda img: shades_of_grey(crop(img))) if a.shades_of_grey else crop
    folder = Path(model_folder(a.model))
    rows = [r for r in csv.DictReader((folder / "split.csv").open()) if r["split"] == "validation"]
    rows = [rows[i] for i in np.random.default_rng(0).choice(len(rows), min(a.n, len(rows)), replace=False)]
    found = {p.stem: p for p in Path(a.data_dir).glob("HAM10000_images_part_*/*.jpg")}
    originals = [Image.open(found[r["image_id"]]).convert("RGB") for r in rows]
    labels = np.array([CLASS_CODES.index(r["dx"]) for r in rows])
    clf = Classifier(str(folder), backend=a.backend)
    results: dict = {"n": len(rows), "backend": clf.backend, "field_of_view_crop": not a.no_field_of_view_crop,
                     "shades_of_grey": a.shades_of_grey,
                     "class_counts": {c: int((labels == i).sum()) for i, c in enumerate(CLASS_CODES)}}
    logging.getLogger("bench").info("sample per class: %s", results["class_counts"])
    for name, change in CHANGES.items():
        images = [change(im) for im in originals]
        preds = [p for i in range(0, len(images), 32) for p in clf.predict(images[i:i + 32])]
        kept = float(np.mean([p.in_distribution is not False for p in preds]))
        right = np.array([CLASS_CODES.index(p.top) == y for p, y in zip(preds, labels)])
        balanced = float(np.mean([right[labels == c].mean() for c in np.unique(labels)]))
        results[name] = {"kept": round(kept, 3), "accuracy": round(float(right.mean()), 3),
                         "balanced_accuracy": round(balanced, 3)}
        logging.getLogger("bench").info("%-32s kept %.3f  accuracy %.3f  balanced accuracy %.3f", name, kept,
                                        right.mean(), balanced)
    emit(results, a.json)


if __name__ == "__main__":
    main()
