"""Grad-CAM: where in the image the model looked for the class it predicted.

Works for timm CNNs through their `forward_features` / `forward_head` split: the gradient of the
class logit with respect to the last feature map weights that map's channels (Selvaraju et al., 2017).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ham_hf.serve.classifier import Classifier


def grad_cam(classifier: Classifier, image, class_index: int | None = None) -> tuple[np.ndarray, int]:
    """Return (heat map in [0, 1] at the model's input size, class index explained) for one image."""
    net = classifier.model.timm_model
    x = classifier.images_to_tensor([image]).requires_grad_(False)
    with torch.enable_grad():
        features = net.forward_features(x)
        if features.ndim != 4:
            raise ValueError("Grad-CAM needs a convolutional feature map (B, C, H, W)")
        features.retain_grad()
        logits = net.forward_head(features)
        index = int(logits.argmax(dim=1)) if class_index is None else int(class_index)
        net.zero_grad(set_to_none=True)
        logits[0, index].backward()
    weights = features.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * features).sum(dim=1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    cam = cam / cam.max() if cam.max() > 0 else cam
    return cam.cpu().numpy(), index


def model_view(classifier: Classifier, image) -> Image.Image:
    """The image as the model sees it: resized and centre-cropped, before normalisation."""
    x = classifier.images_to_tensor([image])[0].float().cpu()
    mean = torch.tensor(classifier.data_config.mean).view(3, 1, 1)
    std = torch.tensor(classifier.data_config.std).view(3, 1, 1)
    pixels = ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels)


def overlay(view: Image.Image, cam: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Blend a heat map (jet colours) over the model's view of the image."""
    from matplotlib import colormaps

    heat = (colormaps["jet"](cam)[..., :3] * 255).astype(np.uint8)
    return Image.blend(view.convert("RGB"), Image.fromarray(heat).resize(view.size), alpha)


def explain(classifier: Classifier, image, class_index: int | None = None) -> tuple[Image.Image, int]:
    """Return the Grad-CAM overlay for one image and the class index it explains."""
    cam, index = grad_cam(classifier, image, class_index)
    return overlay(model_view(classifier, image), cam), index
