"""ham_hf.transforms: the decode-once cache and on-device preprocessing."""

from __future__ import annotations

import pytest
import torch

from ham_hf import model as model_lib
from ham_hf.transforms import AugmentArguments, Preprocess, decode_images


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
    ours = Preprocess(dc)(decode_images(paths, dc.resize, dc.interpolation), train=False)
    assert ours.shape == expected.shape == (4, 3, dc.size, dc.size)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


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
