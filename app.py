"""Gradio app: upload a dermatoscopic image, see all 7 class probabilities and a Grad-CAM heat map.

    python app.py [--model DIR_OR_HUB_ID] [--port 7860]      # or HAM_MODEL=...; `make demo` runs this

It runs as a Hugging Face Space as it is (`ham-hf deploy` writes the Space README: sdk gradio, app_file app.py).
The model defaults to the bundled folder models/ham10000-resnet50 when there is one.
"""

from __future__ import annotations

import os

# Set before PyTorch loads OpenMP: serving runs ONNX Runtime beside PyTorch preprocessing, and
# PyTorch's OpenMP threads spin-waiting after each small op steal the cores from ONNX Runtime's
# threads (about 10% of the latency on 2 cores; benchmarks/latency.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import base64  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402

from ham_hf.defaults import BUNDLED_MODEL  # noqa: E402
from ham_hf.errors import ImageError, ModelError  # noqa: E402
from ham_hf.labels import DESCRIPTIONS, MALIGNANT, display_name  # noqa: E402
from ham_hf.serve.classifier import BACKENDS, Classifier, Prediction, resolve_model  # noqa: E402
from ham_hf.serve.explain import explain  # noqa: E402

logger = logging.getLogger("ham_hf.app")

REPO = Path(__file__).resolve().parent
DEFAULT_MODEL = BUNDLED_MODEL
EXAMPLES = sorted((REPO / "examples").glob("*.jpg"))
MAX_UPLOAD_MB = 10
CONCURRENCY = 2

NOTICE = (
    "**Research demo, not a medical device.** It must not be used for diagnosis or treatment decisions. "
    "It was trained on dermatoscopic images of 7 lesion types (HAM10000) and can be confidently wrong, "
    "especially on ordinary phone photos, other skin types, or lesions outside these 7 classes. "
    "See a dermatologist about any changing, bleeding or worrying skin lesion."
)
ADVICE = (
    "Upload a **dermatoscopic** image (taken through a dermatoscope), with the lesion centred and filling "
    "most of the frame. Test-time augmentation averages 8 flipped / rotated views (slower, a little steadier)."
)


def _image_source(payload) -> str | bytes:
    """Turn Gradio's raw image payload (FileData dict, path or data: URL) into a path or bytes."""
    if payload is None:
        raise ImageError("Upload an image first.")
    if isinstance(payload, (str, Path)):
        return str(payload)
    get = payload.get if isinstance(payload, dict) else (lambda k: getattr(payload, k, None))
    url, path = get("url"), get("path")
    if isinstance(url, str) and url.startswith("data:"):
        return base64.b64decode(url.split(",", 1)[1])
    if not path:
        raise ImageError("Upload an image first.")
    if os.path.getsize(path) > MAX_UPLOAD_MB * 1024 * 1024:
        raise ImageError(f"The file is larger than {MAX_UPLOAD_MB} MB; upload a smaller image.")
    return str(path)


NOT_A_LESION = (
    "### This does not look like a dermatoscopic image of a skin lesion\n"
    "The classifier was not trained on such images, so its answer would mean nothing. Upload an image taken "
    "through a dermatoscope, with the lesion centred (or tick *Show the probabilities anyway*)."
)


def verdict(prediction: Prediction, clf: Classifier) -> dict:
    """The guard's machine-readable verdict for API users (None values when the model has no guard)."""
    return {"in_distribution": prediction.in_distribution, "ood_score": prediction.ood_score,
            "ood_threshold": clf.guard.threshold if clf.guard is not None else None}


def describe(prediction: Prediction) -> str:
    """A short plain-language description of the top class and the benign / malignant grouping."""
    top = prediction.top
    kind = "malignant or pre-malignant" if top in MALIGNANT else "benign"
    return (
        f"### Most likely: {display_name(top)}, {prediction.probabilities[top]:.0%}\n"
        f"{DESCRIPTIONS[top]} Usually considered **{kind}**.\n\n"
        f"Malignant classes together (akiec, bcc, mel): **{prediction.malignant_probability:.0%}**; "
        f"benign classes together: **{1 - prediction.malignant_probability:.0%}**.\n\n"
        f"_{NOTICE}_"
    )


def create_demo(model: str | None = None, classifier: Classifier | None = None, backend: str = "auto") -> gr.Blocks:
    """Build the Blocks app around one classifier, loaded once."""
    clf = classifier or Classifier(resolve_model(model, DEFAULT_MODEL), backend=backend)

    def predict(image, tta, show_anyway=False):
        """Classify one image: all 7 probabilities, a description and the guard's verdict.

        An image the guard flags gets a plain message in place of the diagnosis; its probabilities
        only on request (show_anyway).
        """
        try:
            prediction = clf.predict([_image_source(image)], tta=bool(tta))[0]
        except ImageError as exc:
            raise gr.Error(str(exc)) from None
        if prediction.in_distribution is False and not show_anyway:
            return None, NOT_A_LESION, verdict(prediction, clf)
        return prediction.label(), describe(prediction), verdict(prediction, clf)

    def heat_map(image):
        """Grad-CAM of the predicted class over the model's view of the image."""
        try:
            return explain(clf, _image_source(image))[0]
        except ImageError as exc:
            raise gr.Error(str(exc)) from None

    with gr.Blocks(title="HAM10000 skin-lesion classifier") as demo:
        gr.Markdown("# Skin-lesion classifier (HAM10000, 7 classes)")
        gr.Markdown(f"> {NOTICE}", elem_id="notice")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", sources=["upload", "webcam", "clipboard"],
                                 label="Dermatoscopic image", elem_id="image")
                # Off by default: on validation the 8 flip / rotation views rank better but decide no better
                # (docs/serving.md, "Test-time augmentation"), at about 7x the time of one view.
                tta = gr.Checkbox(label="Test-time augmentation (8 views)", value=False)
                show_anyway = gr.Checkbox(label="Show the probabilities anyway (even if the image does not look "
                                                "like a dermatoscopic lesion image)", value=False)
                button = gr.Button("Classify", variant="primary", elem_id="classify")
                gr.Markdown(ADVICE)
            with gr.Column():
                probabilities = gr.Label(num_top_classes=7, label="Probabilities", elem_id="probabilities")
                description = gr.Markdown(elem_id="description")
                guard = gr.JSON(label="Out-of-distribution guard", elem_id="guard")
                cam = gr.Image(type="pil", label="Grad-CAM: where the model looked (predicted class)",
                               interactive=False, elem_id="gradcam")
        if EXAMPLES:
            gr.Examples(examples=[[str(p), False] for p in EXAMPLES], inputs=[image, tta],
                        example_labels=[display_name(p.name.split("_")[0]) for p in EXAMPLES],
                        label="Examples: one HAM10000 image per class (CC BY-NC-SA 4.0, Tschandl et al. 2018)")
        gr.Markdown(f"Model: `{clf.name}` · backend {clf.backend} · input {clf.data_config.size} px")
        event = button.click(predict, [image, tta, show_anyway], [probabilities, description, guard],
                             api_name="predict",
                             preprocess=False, concurrency_limit=CONCURRENCY)
        event.then(heat_map, [image], [cam], api_name="explain", preprocess=False, concurrency_limit=CONCURRENCY)
    demo.queue(max_size=64, default_concurrency_limit=CONCURRENCY)
    return demo


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the model once and serve."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or folder (default: HAM_MODEL, else the bundled model)")
    parser.add_argument("--backend", default=os.environ.get("HAM_BACKEND", "auto"), choices=BACKENDS,
                        help="auto: int8 ONNX on the CPU when the model passed its fidelity check, else fp32 ONNX")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        demo = create_demo(args.model, backend=args.backend)
    except ModelError as exc:
        logger.error("%s", exc)
        return 2
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=f"{MAX_UPLOAD_MB}mb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
