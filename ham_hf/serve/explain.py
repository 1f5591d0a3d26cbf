"""Heat maps: where in the image the model found the class it predicted.

The app's map is the class activation map (CAM; Zhou et al., 2016): the head's weights of the class
times the last feature map. For a network that pools globally before one linear head (ResNet-50)
it is Grad-CAM at the last stage (Selvaraju et al., 2017) exactly, up to a positive factor that the
[0, 1] scaling removes, and it comes from the prediction's own forward pass: no backward pass.
`grad_cam` stays for timm CNNs with other heads, and as the reference a test holds the CAM to.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ham_hf.serve.classifier import Classifier, class_activation_map


def _upsample(cam: np.ndarray, size: int) -> np.ndarray:
    """A (h, w) map in [0, 1] bilinearly resized to (size, size), as float32."""
    t = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def class_activation(classifier: Classifier, image, class_index: int | None = None) -> tuple[np.ndarray, int]:
    """Return (CAM in [0, 1] at the model's input size, class index explained) for one image."""
    outs = classifier.forward(classifier.pixels(classifier.decode(image)[None]), feature_map=True)
    index = int(outs.logits[0].argmax()) if class_index is None else int(class_index)
    cam = class_activation_map(outs.feature_map[0], classifier.head_weight[index])
    if cam is None:
        raise ValueError("a class activation map needs a convolutional feature map (C, H, W)")
    return _upsample(cam, classifier.data_config.size), index


def grad_cam(classifier: Classifier, image, class_index: int | None = None) -> tuple[np.ndarray, int]:
    """Return (Grad-CAM in [0, 1] at the model's input size, class index explained), with a backward pass."""
    net = classifier.model.timm_model
    x = classifier.preprocess(classifier.decode(image)[None].to(classifier.device), train=False)
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


def view_of(classifier: Classifier, decoded: torch.Tensor) -> Image.Image:
    """A decoded image (`Classifier.decode`) as the model sees it: centre-cropped, before normalisation."""
    (top, left), size = classifier.preprocess.crop_origin(*decoded.shape[:2]), classifier.data_config.size
    return Image.fromarray(np.ascontiguousarray(decoded[top : top + size, left : left + size].numpy()))


def model_view(classifier: Classifier, image) -> Image.Image:
    """The image as the model sees it: resized and centre-cropped, before normalisation."""
    return view_of(classifier, classifier.decode(image))


def overlay(view: Image.Image, cam: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Blend a heat map in [0, 1] (jet colours) over the model's view of the image, at the view's size."""
    from matplotlib import colormaps

    heat = (colormaps["jet"](_upsample(cam, view.size[0]) if cam.shape[0] != view.size[0] else cam)[..., :3] * 255)
    return Image.blend(view.convert("RGB"), Image.fromarray(heat.astype(np.uint8)), alpha)


def explain(classifier: Classifier, image, class_index: int | None = None) -> tuple[Image.Image, int]:
    """Return the class activation overlay for one image and the class index it explains."""
    cam, index = class_activation(classifier, image, class_index)
    return overlay(model_view(classifier, image), cam), index
