"""ham_hf.transforms: the decode-once cache and on-device preprocessing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ham_hf import model as model_lib
from ham_hf.transforms import AugmentArguments, Preprocess, decode_images, load_rgb


@pytest.fixture(scope="module")
def tiny(tiny_backbone):
    model = model_lib.load_model(str(tiny_backbone))
    return model, model_lib.data_config(model)


def test_eval_path_equals_the_pipeline_image_processor(tiny_model, tmp_path):
    """Training's eval crop and the Hub pipeline's preprocessing see the same pixels (odd sizes, both orientations)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor

    model = model_lib.load_model(str(tiny_model))
    dc = model_lib.data_config(model)
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(200, 150), (150, 200), (333, 111), (97, 61)]):
        paths.append(tmp_path / f"noise{i}.png")  # lossless: both paths read the same pixels
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    processor = AutoImageProcessor.from_pretrained(str(tiny_model))
    expected = processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    ours = Preprocess(dc)(decode_images(paths, dc), train=False)
    assert ours.shape == expected.shape == (4, 3, dc.size, dc.size)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_the_eval_table_gives_the_eval_path_bit_for_bit(tiny):
    """`eval_array` (what ONNX Runtime reads) is `forward(train=False)` exactly: every level and channel, the crop."""
    import dataclasses

    import numpy as np

    _, dc = tiny
    dc = dataclasses.replace(dc, resize=dc.size + 7)  # an odd margin: the crop's rounding is part of the check
    images = torch.randint(0, 256, (5, dc.resize, dc.resize, 3), dtype=torch.uint8)
    images[0, :16, :16] = torch.arange(256, dtype=torch.uint8).view(16, 16, 1)  # every level in every channel
    pre = Preprocess(dc)
    ours = pre.eval_array(images.numpy())
    assert ours.shape == (5, 3, dc.size, dc.size) and ours.dtype == np.float32 and ours.flags.c_contiguous
    assert np.array_equal(ours, pre(images, train=False).contiguous().numpy())


def test_train_path_shapes_range_and_seed(tiny):
    _, dc = tiny
    images = torch.randint(0, 256, (6, dc.resize, dc.resize, 3), dtype=torch.uint8)
    pre = Preprocess(dc)
    torch.manual_seed(1)
    a = pre(images, train=True)
    torch.manual_seed(1)
    b = pre(images, train=True)
    c = pre(images, train=True)
    assert a.shape == (6, 3, dc.size, dc.size) and a.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    mean, std = torch.tensor(dc.mean).view(1, 3, 1, 1), torch.tensor(dc.std).view(1, 3, 1, 1)
    pixels = a * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_identity_augmentation_is_a_plain_resize(tiny):
    """With every random part off, the warp reduces to resizing the cached square."""
    _, dc = tiny
    off = AugmentArguments(crop_scale_min=1.0, crop_ratio=1.0, rotation=0, hflip=0, vflip=0, brightness=0,
                           contrast=0, saturation=0, hue=0)
    images = torch.randint(0, 256, (2, dc.resize, dc.resize, 3), dtype=torch.uint8)
    out = Preprocess(dc, off)(images, train=True)
    x = images.permute(0, 3, 1, 2).float() / 255
    ref = torch.nn.functional.interpolate(x, size=(dc.size, dc.size), mode="bilinear", align_corners=False)
    ref = (ref - torch.tensor(dc.mean).view(1, 3, 1, 1)) / torch.tensor(dc.std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_flips_flip(tiny):
    _, dc = tiny
    only_hflip = AugmentArguments(crop_scale_min=1.0, crop_ratio=1.0, rotation=0, hflip=1.0, vflip=0, brightness=0,
                                  contrast=0, saturation=0, hue=0)
    images = torch.randint(0, 256, (1, dc.resize, dc.resize, 3), dtype=torch.uint8)
    plain = Preprocess(dc, AugmentArguments(**{**only_hflip.__dict__, "hflip": 0.0}))(images, train=True)
    flipped = Preprocess(dc, only_hflip)(images, train=True)
    torch.testing.assert_close(flipped, plain.flip(-1), atol=1e-4, rtol=0)


def test_channel_gain_scales_each_channel_within_its_range(tiny):
    """A colour cast: per image, R, G and B each scaled by one factor in [1 - g, 1 + g]; geometry untouched."""
    _, dc = tiny
    only_gain = AugmentArguments(crop_scale_min=1.0, crop_ratio=1.0, rotation=0, hflip=0, vflip=0, brightness=0,
                                 contrast=0, saturation=0, hue=0, channel_gain=0.2)
    images = torch.full((4, dc.resize, dc.resize, 3), 100, dtype=torch.uint8)
    mean, std = torch.tensor(dc.mean).view(1, 3, 1, 1), torch.tensor(dc.std).view(1, 3, 1, 1)
    torch.manual_seed(0)
    pixels = Preprocess(dc, only_gain)(images, train=True) * std + mean
    gains = pixels.mean(dim=(2, 3)) / (100 / 255)  # (4, 3): one gain per image and channel
    assert gains.min() >= 0.8 - 1e-4 and gains.max() <= 1.2 + 1e-4
    assert (gains[:, 0] - gains[:, 2]).abs().max() > 0.02  # the channels move apart: a cast, not brightness
    torch.testing.assert_close(pixels.std(dim=(2, 3)), torch.zeros(4, 3), atol=1e-4, rtol=0)  # still flat


def test_blur_defocuses_about_half_the_batch_and_keeps_the_rest(tiny):
    """Each image is either left as it is (sigma 0) or smoothed, with its mean kept."""
    _, dc = tiny
    pre = Preprocess(dc, AugmentArguments(blur_sigma=3.0))
    torch.manual_seed(0)
    x = torch.rand(32, 3, dc.size, dc.size)
    y = pre.random_blur(x)

    def roughness(t):  # mean absolute difference of horizontal neighbours, per image
        return (t[..., 1:] - t[..., :-1]).abs().mean(dim=(1, 2, 3))

    same = torch.isclose(x, y, atol=1e-6).flatten(1).all(1)
    assert 8 <= int(same.sum()) <= 24  # about half untouched
    assert (roughness(y) <= roughness(x) + 1e-6).all()  # never sharper
    assert int((roughness(y) < 0.5 * roughness(x)).sum()) >= 8  # most of the others clearly smoothed
    torch.testing.assert_close(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=5e-3, rtol=0)
    images = torch.randint(0, 256, (4, dc.resize, dc.resize, 3), dtype=torch.uint8)
    assert pre(images, train=True).shape == (4, 3, dc.size, dc.size)  # wired into training preprocessing


# ----------------------------------------------------------------------------- the dermoscope's black frame


def _framed(img, radius: float):
    """`img` seen through a round black field of view of `radius` x its short side."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", img.size, 0)
    r, cx, cy = radius * min(img.size), img.width / 2, img.height / 2
    ImageDraw.Draw(mask).ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    return Image.composite(img, Image.new("RGB", img.size), mask)


def _letterboxed(img, factor: float = 0.6):
    """`img` shrunk onto a black canvas of its own size; returns the canvas and the pasted box."""
    from PIL import Image

    small = img.resize((int(img.width * factor), int(img.height * factor)))
    canvas = Image.new("RGB", img.size)
    left, top = (img.width - small.width) // 2, (img.height - small.height) // 2
    canvas.paste(small, (left, top))
    return canvas, (left, top, left + small.width, top + small.height)


def test_field_of_view_crop_leaves_unframed_and_blank_images_alone(real_images):
    import numpy as np
    from PIL import Image

    from ham_hf.transforms import crop_field_of_view, field_of_view_box, load_rgb

    for path in real_images.values():
        img = Image.open(path).convert("RGB")
        if field_of_view_box(img) is None:  # most HAM10000 images: the exact pixels go through
            assert np.array_equal(np.asarray(load_rgb(str(path))), np.asarray(img))
    for blank in (Image.new("RGB", (200, 150)), Image.new("RGB", (200, 150), (230, 180, 160))):
        assert crop_field_of_view(blank) is blank


def test_field_of_view_crop_removes_a_round_frame_and_a_black_canvas(real_images):
    import numpy as np
    from PIL import Image

    from ham_hf.transforms import DARK, crop_field_of_view, field_of_view_box

    img = Image.open(real_images["nv"]).convert("RGB")
    assert field_of_view_box(img) is None
    framed = crop_field_of_view(_framed(img, 0.42))
    side = 2 * 0.42 * min(img.size) / np.sqrt(2)  # the square inscribed in the circle
    assert abs(framed.width - side) <= 4 and abs(framed.height - side) <= 4
    luma = np.asarray(framed.convert("L"))
    assert min(luma[0, 0], luma[0, -1], luma[-1, 0], luma[-1, -1]) > DARK  # no frame left in the corners
    assert field_of_view_box(framed) is None  # idempotent: a cropped image is not cropped again
    canvas, box = _letterboxed(img)
    got = field_of_view_box(canvas)
    assert got is not None and max(abs(a - b) for a, b in zip(got, box)) <= 3


@pytest.mark.slow
def test_framed_real_lesions_are_kept_and_read_like_the_unframed(bundled_model, real_ham_dir):
    """Lesions in a tight round frame (as other dermoscopes give them): kept by the guard, same answer."""
    import csv

    import numpy as np
    from PIL import Image

    from ham_hf.serve.classifier import Classifier

    ids = [r["image_id"] for r in csv.DictReader((bundled_model / "split.csv").open()) if r["split"] == "validation"]
    picked = np.random.default_rng(1).choice(ids, 48, replace=False)
    images = [Image.open(next(real_ham_dir.glob(f"HAM10000_images_part_*/{i}.jpg"))).convert("RGB") for i in picked]
    clf = Classifier(str(bundled_model), backend="torch")
    plain = clf.predict(images)
    framed = clf.predict([_framed(im, 0.42) for im in images])  # without the crop: 1% kept, accuracy 0.19
    assert np.mean([p.in_distribution for p in framed]) >= 0.95
    assert np.mean([a.top == b.top for a, b in zip(plain, framed)]) >= 0.75


def test_a_thin_image_is_refused_before_it_costs_memory(tmp_path):
    """A 1 x 10,000 PNG (a few hundred bytes) is refused by the one rule every decoder shares, with a reason."""
    from ham_hf.errors import ImageError

    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 10_000), (200, 150, 120)).save(thin)
    assert thin.stat().st_size < 2_000
    with pytest.raises(ImageError, match="too thin to show a lesion"):
        load_rgb(str(thin), reduce_to=256)
    with pytest.raises(ImageError, match="too thin"):
        load_rgb(thin.read_bytes())
    ok = tmp_path / "wide.png"  # 10:1 is still an image
    Image.new("RGB", (1_000, 100), (200, 150, 120)).save(ok)
    assert load_rgb(str(ok)).size == (1_000, 100)


PEAK_SCRIPT = """
import resource, sys
from ham_hf.errors import ImageError
from ham_hf.transforms import load_rgb, resize_square
resize_square(load_rgb(sys.argv[1], 256), 256, "bilinear")  # imports and a small image first
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    resize_square(load_rgb(sys.argv[2], 256), 256, "bilinear")
    outcome = "decoded"
except ImageError as exc:
    outcome = "refused: " + str(exc)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, outcome)
"""


@pytest.mark.parametrize("shape", ["1x20000 PNG", "20000x2000 PNG", "5000x4000 PNG", "4032x3024 RGBA PNG",
                                   "8000x8000 JPEG", "10000x1000 PNG"])
def test_one_upload_costs_at_most_about_100_mb_whatever_its_shape(tmp_path, shape):
    """Peak memory of decoding one image (what the app, the API and `predict` do), measured in a fresh process."""
    import subprocess
    import sys

    size, kind = shape.split(" ", 1)
    w, h = map(int, size.split("x"))
    path = tmp_path / ("big.jpg" if "JPEG" in kind else "big.png")
    mode = "RGBA" if "RGBA" in kind else "RGB"
    img = Image.new(mode, (w, h), (180, 120, 100, 255)[: len(mode)])
    img.save(path, quality=90) if "JPEG" in kind else img.save(path)
    del img
    small = tmp_path / "small.jpg"
    Image.new("RGB", (200, 150), (180, 120, 100)).save(small)
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(small), str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    extra_mb, outcome = done.stdout.split(" ", 1)
    assert float(extra_mb) < 110, f"{shape}: {extra_mb} MB ({outcome.strip()})"
    if shape.startswith(("1x", "20000x", "5000x")):  # too thin; too many pixels decoded at full size
        assert outcome.startswith("refused"), outcome
    else:
        assert outcome.startswith("decoded"), outcome
