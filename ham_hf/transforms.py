"""Decode once, augment on the device.

CPU-side PIL augmentation is what limits a ResNet-50 fine-tune on a fast GPU, so training decodes
every image once into a uint8 cache (short side resized to the model's eval resize, centre square
kept: exactly the region timm's eval transform crops from), and then does all augmentation for a
whole batch on the device in a few tensor operations:

- random resized crop, rotation and horizontal / vertical flips as one affine warp (`grid_sample`);
- colour jitter (brightness, contrast, saturation, hue) as per-image matrix operations.

Evaluation takes the deterministic centre crop and normalises. Size, interpolation, mean and std
come from the model's `DataConfig`, never from constants.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data.transforms import str_to_pil_interp
from torch import nn

from ham_hf.errors import ImageError
from ham_hf.images import MAX_PIXELS, open_image  # noqa: F401 (MAX_PIXELS re-exported)
from ham_hf.model import DataConfig


@dataclass
class AugmentArguments:
    """Training augmentation, applied on the device to whole batches."""

    crop_scale_min: float = field(default=0.35, metadata={"help": "Random resized crop: smallest area fraction."})
    crop_ratio: float = field(default=4 / 3, metadata={"help": "Random resized crop: aspect ratios in [1/r, r]."})
    rotation: float = field(default=180.0, metadata={"help": "Random rotation in degrees (+-); lesions have no up."})
    hflip: float = field(default=0.5, metadata={"help": "Horizontal flip probability."})
    vflip: float = field(default=0.5, metadata={"help": "Vertical flip probability."})
    brightness: float = field(default=0.2, metadata={"help": "Colour jitter: brightness factor range (+-)."})
    contrast: float = field(default=0.2, metadata={"help": "Colour jitter: contrast factor range (+-)."})
    saturation: float = field(default=0.2, metadata={"help": "Colour jitter: saturation factor range (+-)."})
    hue: float = field(default=0.02, metadata={"help": "Colour jitter: hue shift in turns (+-)."})
    channel_gain: float = field(default=0.0, metadata={
        "help": "Colour cast: each of R, G, B scaled by its own factor in [1 - g, 1 + g] (cameras and lights "
                "differ; docs/evaluation.md, 'Robustness')."})
    blur_sigma: float = field(default=0.0, metadata={
        "help": "Defocus: half of the images blurred by a Gaussian of sigma uniform in (0, this] pixels (focus and "
                "optics differ; docs/evaluation.md, 'Robustness')."})


# ----------------------------------------------------------------------------- decoding

def load_rgb(source, reduce_to: int | None = None) -> Image.Image:
    """Open an image (path, bytes or PIL) as RGB, EXIF-rotated, cropped to its field of view (no black frame).

    `reduce_to` lets a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) while keeping
    its short side at least twice that size, so a 4000x3000 photo costs little more than a small one.
    Raises ImageError with a readable message for anything that is not a usable image.
    """
    if isinstance(source, Image.Image):
        img = source
    else:
        img = open_image(source)  # size and shape checked before any pixel is decoded
        if reduce_to and img.format == "JPEG" and min(img.size) > 4 * reduce_to:
            img.draft("RGB", (2 * reduce_to, 2 * reduce_to))
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"the image file is damaged or incomplete ({exc}).") from None
        if reduce_to and min(img.size) > 4 * reduce_to and img.mode in ("L", "LA", "RGB", "RGBA", "I", "F"):
            # Every copy below scales with the image: shrink a large decode first (box filter, like the draft).
            img = img.reduce(min(img.size) // (2 * reduce_to))
    if img.width < 1 or img.height < 1:
        raise ImageError("the image is empty (zero pixels).")
    img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        # 16-bit, palette, CMYK, LA, RGBA ...: flatten onto white where there is transparency.
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grey: scale 0..65535 to 0..255 (Pillow's own convert would clip at 255).
            arr = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(np.clip(arr / 257.0, 0, 255).round().astype(np.uint8), "L")
        img = img.convert("RGB")
    return crop_field_of_view(img)


# The dermoscope's black frame: luma below DARK counts as frame. A frame is there when at least 3 of
# the 4 corner patches (CORNER x the short side) are mostly dark: one corner may carry a scale bar.
DARK = 30
CORNER = 0.06


def _dark_corners(bright: np.ndarray) -> int:
    """How many of the 4 corner patches of a boolean 'bright' mask are mostly dark."""
    k = max(1, round(CORNER * min(bright.shape)))
    return sum(patch.mean() < 0.5 for patch in (bright[:k, :k], bright[:k, -k:], bright[-k:, :k], bright[-k:, -k:]))


def field_of_view_box(img: Image.Image) -> tuple[int, int, int, int] | None:
    """The box (left, top, right, bottom) inside a black dermoscope frame, or None when there is no frame.

    Lesion images from other clinics and cameras often sit in a round field of view or on a black
    canvas. Left in, the frame dominates what the network sees (measured on validation images given a
    tight round frame: accuracy 0.19 and 99% flagged as not a lesion; cropped: 0.79 and 0.5%).
    A round field (the box's own corners dark) gives the square inscribed in the circle.
    """
    scale = min(1.0, 128 / max(img.size))  # the decision needs no detail: decide on a thumbnail
    small = img if scale == 1.0 else img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                                                Image.BILINEAR)
    bright = np.asarray(small.convert("L")) > DARK
    if min(bright.shape) < 8 or _dark_corners(bright) < 3:
        return None
    rows, cols = np.flatnonzero(bright.mean(axis=1) > 0.02), np.flatnonzero(bright.mean(axis=0) > 0.02)
    if len(rows) < 4 or len(cols) < 4:
        return None  # all (or almost all) dark: nothing to crop to
    top, bottom, left, right = rows[0], rows[-1] + 1.0, cols[0], cols[-1] + 1.0
    if _dark_corners(bright[int(top):int(bottom), int(left):int(right)]) >= 3:
        # A circle of diameter max(width, height) of the box: keep its inscribed square, one thumbnail
        # pixel inside, so that rounding back to full size cannot reach the frame.
        cy, cx = (top + bottom) / 2, (left + right) / 2
        half = max(bottom - top, right - left) / (2 * math.sqrt(2)) - 1
        top, bottom = max(top, cy - half), min(bottom, cy + half)
        left, right = max(left, cx - half), min(right, cx + half)
    return tuple(int(round(v / scale)) for v in (left, top, right, bottom))


def crop_field_of_view(img: Image.Image) -> Image.Image:
    """The image cropped to its field of view when it has a black frame; otherwise the image itself."""
    box = field_of_view_box(img)
    return img if box is None else img.crop(box)


def resize_square(img: Image.Image, size: int, interpolation: str) -> np.ndarray:
    """Resize the short side to `size` (timm's eval resize) and keep the centre square, as HWC uint8."""
    w, h = img.size
    # torchvision's Resize(int) arithmetic: the long side is truncated, not rounded.
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize(new, str_to_pil_interp(interpolation))  # timm's own name -> PIL filter map
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return np.array(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def decode_square(source, data_config: DataConfig) -> np.ndarray:
    """One image (path, bytes or PIL) as the model's eval square, HWC uint8: the one decode training,
    evaluation, the guard's fit, the int8 gate and the app all use."""
    source = str(source) if isinstance(source, Path) else source
    return resize_square(load_rgb(source, reduce_to=data_config.resize), data_config.resize, data_config.interpolation)


def decode_images(payloads: Sequence, data_config: DataConfig, threads: int | None = None) -> torch.Tensor:
    """Decode images (bytes, paths or PIL) into one uint8 tensor (N, size, size, 3), in threads."""
    out = np.empty((len(payloads), data_config.resize, data_config.resize, 3), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = decode_square(payloads[i], data_config)

    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        list(pool.map(work, range(len(payloads))))
    return torch.from_numpy(out)


class CachedImages(torch.utils.data.Dataset):
    """A decoded split: uint8 HWC images and labels, served as Trainer inputs."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int], image_ids: Sequence[str] | None = None,
                 groups: Sequence[str] | None = None, metadata: dict[str, Sequence] | None = None):
        self.images = images
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.image_ids = list(image_ids) if image_ids is not None else [str(i) for i in range(len(self.labels))]
        # Lesion ids: confidence intervals resample lesions, not images (default: each image its own).
        self.groups = list(groups) if groups is not None else list(self.image_ids)
        # The reports' subgroups, where the source records them: how each diagnosis was confirmed
        # (dx_type), sex, age and body site (localization).
        self.metadata = {k: list(v) for k, v in (metadata or {}).items()}

    @property
    def dx_types(self) -> list | None:
        """How each diagnosis was confirmed (histo, follow_up, consensus, confocal), where recorded."""
        return self.metadata.get("dx_type")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


# The metadata columns the reports break figures down by, where a source has them.
REPORT_COLUMNS = ("dx_type", "sex", "age", "localization")


def cache_split(dataset, data_config: DataConfig, threads: int | None = None) -> CachedImages:
    """Decode a `datasets` split (image bytes untouched until now) into a CachedImages."""
    import datasets

    raw = dataset.cast_column("image", datasets.Image(decode=False))
    payloads = [img["bytes"] if img["bytes"] is not None else img["path"] for img in raw["image"]]
    images = decode_images(payloads, data_config, threads)
    groups = raw["lesion_id"] if "lesion_id" in raw.column_names else None
    metadata = {c: raw[c] for c in REPORT_COLUMNS if c in raw.column_names}
    return CachedImages(images, raw["label"], raw["image_id"], groups, metadata)


# ----------------------------------------------------------------------------- on-device preprocessing


def _rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601) of a (B, 3, H, W) batch, keeping the channel dim."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _hue_matrices(shift: torch.Tensor) -> torch.Tensor:
    """Per-image 3x3 RGB matrices that rotate hue by `shift` turns (YIQ rotation)."""
    to_yiq = shift.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    from_yiq = torch.linalg.inv(to_yiq)
    cos, sin = torch.cos(2 * math.pi * shift), torch.sin(2 * math.pi * shift)
    rot = torch.zeros(len(shift), 3, 3, device=shift.device, dtype=shift.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    return from_yiq @ rot @ to_yiq


class Preprocess(nn.Module):
    """uint8 HWC batches -> normalised float NCHW: augmented when training, centre-cropped otherwise."""

    def __init__(self, data_config: DataConfig, augment: AugmentArguments | None = None):
        super().__init__()
        self.data_config = data_config
        self.augment = augment or AugmentArguments()
        self.register_buffer("mean", torch.tensor(data_config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_config.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        """Preprocess a (B, H, W, 3) uint8 batch on its device."""
        x = images.permute(0, 3, 1, 2).float().div_(255)  # NHWC memory: a channels_last NCHW view
        x = self.random_geometry(x) if train else self.center_crop(x)
        if train:
            x = self.colour_jitter(x)
            if self.augment.blur_sigma > 0:
                x = self.random_blur(x)
        return self.normalise(x).contiguous(memory_format=torch.channels_last)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Values in [0, 1], NCHW -> the model's normalised input."""
        return (x - self.mean) / self.std

    def crop_origin(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of timm's eval centre crop of `size` out of a height x width square."""
        size = self.data_config.size
        return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))

    def center_crop(self, x: torch.Tensor) -> torch.Tensor:
        """timm's eval centre crop of `size` out of the cached square."""
        (top, left), size = self.crop_origin(x.shape[-2], x.shape[-1]), self.data_config.size
        return x[..., top : top + size, left : left + size]

    def eval_array(self, images: np.ndarray) -> np.ndarray:
        """The eval path on the CPU for ONNX Runtime: (N, H, W, 3) uint8 -> contiguous (N, 3, size, size) float32.

        The same values as `forward(train=False)`, bit for bit (tested), read from a table of each channel's
        256 levels: one pass on the calling thread, where the tensor ops took several, on threads that
        contend with the forward pass (research/README.md, "Around the graph").
        """
        (top, left), size = self.crop_origin(images.shape[1], images.shape[2]), self.data_config.size
        crop = np.ascontiguousarray(images[:, top : top + size, left : left + size].transpose(0, 3, 1, 2))
        out = np.empty(crop.shape, dtype=np.float32)
        for c, table in enumerate(self._levels()):
            np.take(table, crop[:, c], out=out[:, c], mode="clip")  # "clip": no bounds buffer; a uint8 is in range
        return out

    def _levels(self) -> np.ndarray:
        """(3, 256): each channel's normalised value of every uint8 level, by `normalise` itself."""
        if getattr(self, "_level_table", None) is None:
            levels = torch.arange(256, dtype=torch.float32).div_(255).expand(1, 3, 1, 256).to(self.mean.device)
            self._level_table = self.normalise(levels)[0, :, 0].cpu().numpy()
        return self._level_table

    def random_geometry(self, x: torch.Tensor) -> torch.Tensor:
        """Random resized crop + rotation + flips in one affine warp per image."""
        a, b, dev = self.augment, x.shape[0], x.device
        area = torch.empty(b, device=dev).uniform_(a.crop_scale_min, 1.0)
        log_r = math.log(max(a.crop_ratio, 1.0))
        ratio = torch.exp(torch.empty(b, device=dev).uniform_(-log_r, log_r))
        half_w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop half-extent in [-1, 1] coordinates
        half_h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(b, device=dev) * 2 - 1) * (1 - half_w)
        cy = (torch.rand(b, device=dev) * 2 - 1) * (1 - half_h)
        angle = (torch.rand(b, device=dev) * 2 - 1) * math.radians(a.rotation)
        fx = torch.where(torch.rand(b, device=dev) < a.hflip, -1.0, 1.0)
        fy = torch.where(torch.rand(b, device=dev) < a.vflip, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([cos * half_w * fx, -sin * half_h * fy, cx], dim=1),
                torch.stack([sin * half_w * fx, cos * half_h * fy, cy], dim=1),
            ],
            dim=1,
        )
        size = self.data_config.size
        grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
        # Reflection fills the corners a rotation uncovers with skin rather than black.
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def colour_jitter(self, x: torch.Tensor) -> torch.Tensor:
        """Random brightness, contrast, saturation and hue, per image."""
        a, b, dev = self.augment, x.shape[0], x.device

        def factor(spread: float) -> torch.Tensor:
            return torch.empty(b, 1, 1, 1, device=dev).uniform_(1 - spread, 1 + spread)

        x = x * factor(a.brightness)
        if a.channel_gain > 0:
            x = x * torch.empty(b, 3, 1, 1, device=dev).uniform_(1 - a.channel_gain, 1 + a.channel_gain)
        mean = _rgb_to_gray(x).mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * factor(a.contrast) + mean
        gray = _rgb_to_gray(x)
        x = (x - gray) * factor(a.saturation) + gray
        if a.hue > 0:
            m = _hue_matrices(torch.empty(b, device=dev).uniform_(-a.hue, a.hue))
            x = torch.einsum("bij,bjhw->bihw", m, x)
        return x.clamp_(0, 1)

    def random_blur(self, x: torch.Tensor) -> torch.Tensor:
        """A Gaussian defocus for a random half of the batch, sigma uniform in (0, blur_sigma] per image."""
        b, c, h, w = x.shape
        top = self.augment.blur_sigma
        sigma = torch.empty(b, device=x.device).uniform_(0, top) * (torch.rand(b, device=x.device) < 0.5)
        radius = min(math.ceil(3 * top), min(h, w) - 1)
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (t / sigma.clamp(min=1e-3)[:, None]) ** 2)  # sigma 0: a unit impulse
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (b * c, 2r + 1)
        # One separable convolution for the whole batch: every image and channel is its own group.
        y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
        y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)
        y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)
        return y.reshape(b, c, h, w)


# Test-time augmentation views: the 8 symmetries of the square (4 rotations x optional flip).
TTA_VIEWS = 8


def tta_views(x: torch.Tensor) -> torch.Tensor:
    """Stack the 8 dihedral views of a (B, 3, H, W) batch into (8B, 3, H, W)."""
    views = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(-2, -1))
        views += [r, r.flip(-1)]
    return torch.cat(views)
