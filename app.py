"""Gradio app: upload a dermatoscopic image, see all 7 class probabilities and where the model looked.

    python app.py [--model DIR_OR_HUB_ID] [--port 7860]      # or HAM_MODEL=...; `make demo` runs this

It runs as a Hugging Face Space as it is (`ham-hf deploy` writes the Space README: sdk gradio, app_file app.py).
The model defaults to the bundled folder models/ham10000-resnet50 when there is one.
"""

import os

# Set before PyTorch loads OpenMP: serving runs ONNX Runtime beside PyTorch preprocessing, and
# PyTorch's OpenMP threads spin-waiting after each small op steal the cores from ONNX Runtime's
# threads (about 10% of the latency on 2 cores; benchmarks/latency.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Telemetry (Gradio's analytics, which contact an outside server) is off unless the operator turns it on.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Gradio's queue rebuilds a pandas summary of its last 10,000 events after every event by default, a
# cost that grows with the events served (research/README.md, "Serving at the machine's rate").
# Once every 1,000 events instead.
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")

import argparse  # noqa: E402
import html  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
from gradio.data_classes import FileData  # noqa: E402
from gradio.processing_utils import save_pil_to_cache  # noqa: E402
from gradio.utils import get_upload_folder  # noqa: E402

from ham_hf.defaults import BUNDLED_MODEL  # noqa: E402
from ham_hf.errors import ImageError, ModelError  # noqa: E402
from ham_hf.labels import DESCRIPTIONS, MALIGNANT, display_name  # noqa: E402
from ham_hf.serve.batcher import Batcher  # noqa: E402
from ham_hf.serve.classifier import BACKENDS, Classifier, Prediction, resolve_model  # noqa: E402
from ham_hf.serve.explain import overlay, view_of  # noqa: E402
from ham_hf.serve.uploads import MAX_UPLOAD_MB, UploadGuard, claim_folder, uploads  # noqa: E402

logger = logging.getLogger("ham_hf.app")

REPO = Path(__file__).resolve().parent
DEFAULT_MODEL = BUNDLED_MODEL
EXAMPLES = sorted((REPO / "examples").glob("*.jpg"))
# Requests decode and check their own uploads side by side, and their forward passes are batched
# (ham_hf.serve.batcher): up to MAX_BATCH images share one pass, which on 2 cores answers several times
# more images a second. Not Gradio's batch=True: it hands a batch to one call, so one unreadable upload
# would fail every request batched with it.
CONCURRENCY = 16
MAX_BATCH = 16
# Waiting clients hear their place in the queue once a second; Gradio's default sends every waiting
# client an update after every job (with 100 waiting, ~100 messages for each answer).
STATUS_EVERY_S = 1.0
# Waiting requests the queue holds: about 7 s of work at the 34 to 44 answers/s that batching reaches on
# 2 cores (docs/benchmarks.md), so a crowd of 100 waits instead of being turned away, and a flood is
# refused rather than left to time out.
QUEUE_SIZE = 256
# Uploads: deleted UPLOAD_TTL_S after they arrive (and all of them held within UPLOAD_BUDGET_MB).
UPLOAD_TTL_S = 300
UPLOAD_BUDGET_MB = 500
# Sessions whose state Gradio keeps (its default is 10,000). Every API call is a session of its own, and
# each kept one holds a copy of every component's config and the call's inputs, an inline image's bytes
# included (~24 kB of objects by tracemalloc, research/memory_growth.py; ~60 kB of the server's memory), so
# the default grew the server by ~600 MB under steady use. The app keeps no state between events.
STATE_SESSIONS = 2 * CONCURRENCY

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
# What a flagged upload seems to be (the guard's kind), in a sentence; then what to upload instead.
KIND_MESSAGES = {
    "skin photo": "This looks like an ordinary photo of skin, not a dermatoscopic image.",
    "photo": "This looks like an everyday photo, not a dermatoscopic image.",
    "document": "This looks like a screenshot, chart or document, not a dermatoscopic image.",
    "medical": "This looks like another kind of medical image (an X-ray, scan, ultrasound or microscope image), "
               "not a dermatoscopic image.",
    "greyscale": "This image has no colour, so it is not a dermatoscopic image (those are colour photographs).",
    "other": "This does not look like a dermatoscopic image of a skin lesion.",
}
UPLOAD_INSTEAD = (
    "The classifier reads only images taken through a dermatoscope (a lit magnifier held on the skin), "
    "so its answer here would mean nothing. Upload a dermatoscopic image with the lesion centred "
    "(or tick *Show the probabilities anyway*)."
)


def not_a_lesion(prediction: Prediction) -> str:
    """The message a flagged upload gets in place of a diagnosis: what it seems to be, and what to upload."""
    return f"### {KIND_MESSAGES.get(prediction.ood_kind or 'other', KIND_MESSAGES['other'])}\n{UPLOAD_INSTEAD}"


def share(p: float) -> str:
    """A probability as a share a person reads: "<1%" and ">99%" at the ends, whole percents between."""
    return "<1%" if p < 0.01 else (">99%" if p > 0.99 else f"{p:.0%}")


def verdict(prediction: Prediction, clf: Classifier) -> dict:
    """The guard's machine-readable verdict for API users (None values when the model has no guard)."""
    score = None if prediction.ood_score is None else round(prediction.ood_score, 1)
    return {"in_distribution": prediction.in_distribution, "kind": prediction.ood_kind,
            "reason": verdict_sentence(prediction), "ood_score": score,
            "ood_threshold": round(clf.guard.threshold, 1) if clf.guard is not None else None}


def verdict_sentence(prediction: Prediction) -> str:
    """The guard's verdict as a sentence."""
    if prediction.in_distribution is None:
        return "This model has no out-of-distribution check: it answers for any image."
    if prediction.in_distribution:
        return "The image looks like the dermatoscopic images the model was trained on."
    return KIND_MESSAGES.get(prediction.ood_kind or "other", KIND_MESSAGES["other"])


def describe(prediction: Prediction) -> str:
    """A short plain-language description of the top class and the benign / malignant grouping."""
    top = prediction.top
    kind = "malignant or pre-malignant" if top in MALIGNANT else "benign"
    return (
        f"### Most likely: {display_name(top)}, {share(prediction.probabilities[top])}\n"
        f"{DESCRIPTIONS[top]} Usually considered **{kind}**.\n\n"
        f"Malignant classes together (akiec, bcc, mel): **{share(prediction.malignant_probability)}**; "
        f"benign classes together: **{share(1 - prediction.malignant_probability)}**.\n\n"
        f"_{NOTICE}_"
    )


def confidences(prediction: Prediction) -> dict:
    """The API's probabilities, as gr.Label gives them: the top class and all 7, most likely first."""
    rows = sorted(prediction.label().items(), key=lambda kv: -kv[1])
    return {"label": rows[0][0], "confidences": [{"label": name, "confidence": p} for name, p in rows]}


def probability_table(prediction: Prediction) -> str:
    """All 7 probabilities, most likely first, as HTML bars with readable shares."""
    rows = sorted(prediction.probabilities.items(), key=lambda kv: -kv[1])
    return "".join(
        f'<div class="ham-row"><span>{html.escape(display_name(c))}</span><b>{share(p)}</b>'
        f'<div class="ham-bar" style="width:{100 * p:.1f}%"></div></div>' for c, p in rows)


def model_name(name: str) -> str:
    """How the page names the model: a Hub id as it is, a local folder by its own name (no server path)."""
    path = Path(name)
    return path.name if path.exists() else name


CSS = (".ham-row{margin:4px 0}.ham-row span{display:inline-block;min-width:70%}"
       ".ham-bar{height:6px;background:var(--color-accent);border-radius:3px}")


class Answers:
    """What the app answers, around one classifier whose forward passes are batched across requests."""

    def __init__(self, clf: Classifier):
        self.clf = clf
        self.uploads = uploads()  # what a request may read: this app's uploads, its examples, inline images
        self.batcher = Batcher(lambda items: clf.classify([d for d, _ in items], [t for _, t in items], cam=True),
                               max_batch=MAX_BATCH)

    def answer(self, image, tta):
        """Decode one upload (a readable error if it cannot be) and get its answer from a shared forward pass.

        The endpoints take Gradio's payload unprocessed (no re-encoded copy of each upload), so this reads
        only what `uploads` allows: a file this app's upload route stored, or a bounded inline image.
        """
        try:
            with self.uploads.reading(image) as source:
                decoded = self.clf.decode(source)
        except ImageError as exc:
            logger.info("refused an upload: %s", exc)  # the user's mistake: one line, no traceback
            raise gr.Error(str(exc), print_exception=False) from None
        return decoded, self.batcher((decoded, bool(tta)))

    def predict(self, image: FileData, tta: bool = False, show_anyway: bool = False) -> tuple[dict | None, str, dict]:
        """The API: all 7 probabilities, a description and the guard's verdict (probabilities withheld if flagged)."""
        _, prediction = self.answer(image, tta)
        if prediction.in_distribution is False and not show_anyway:
            return None, not_a_lesion(prediction), verdict(prediction, self.clf)
        return confidences(prediction), describe(prediction), verdict(prediction, self.clf)

    def classify(self, image, tta, show_anyway=False):
        """The page: probabilities, description, the guard's sentence and the heat map, from one forward pass."""
        decoded, prediction = self.answer(image, tta)
        heat = overlay(view_of(self.clf, decoded), prediction.cam) if prediction.cam is not None else None
        if prediction.in_distribution is False and not show_anyway:
            return "", not_a_lesion(prediction), verdict_sentence(prediction), None
        return probability_table(prediction), describe(prediction), verdict_sentence(prediction), heat

    def heat_map(self, image: FileData) -> FileData | None:
        """The API: the class activation map of the predicted class over the model's view of the image (a JPEG)."""
        decoded, prediction = self.answer(image, False)
        if prediction.cam is None:
            return None
        path = save_pil_to_cache(overlay(view_of(self.clf, decoded), prediction.cam), get_upload_folder(), "heat-map",
                                 "jpeg")
        self.uploads.keep([path])  # deleted as the uploads are: after UPLOAD_TTL_S, or beyond the budget
        return FileData(path=path, mime_type="image/jpeg")

    @staticmethod
    def clear():
        """A new upload clears the last answer, so no old diagnosis sits under a new image."""
        return "", "", "", None


def create_demo(model: str | None = None, classifier: Classifier | None = None, backend: str = "auto") -> gr.Blocks:
    """Build the Blocks app around one classifier, loaded once, whose forward passes are batched."""
    claim_folder()  # this process's own upload folder; what stopped processes left there is deleted
    clf = classifier or Classifier(resolve_model(model, DEFAULT_MODEL), backend=backend)
    answers = Answers(clf)
    with gr.Blocks(title="HAM10000 skin-lesion classifier", delete_cache=(UPLOAD_TTL_S // 2, UPLOAD_TTL_S)) as demo:
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
                probabilities = gr.HTML(label="Probabilities", elem_id="probabilities")
                description = gr.Markdown(elem_id="description")
                guard = gr.Markdown(elem_id="guard")
                cam = gr.Image(type="pil", label="Where the model looked (class activation map, predicted class)",
                               interactive=False, elem_id="gradcam", format="jpeg")
        if EXAMPLES:
            examples = gr.Examples(
                examples=[[str(p), False] for p in EXAMPLES], inputs=[image, tta],
                example_labels=[display_name(p.name.split("_")[0]) for p in EXAMPLES],
                label="Examples: one HAM10000 image per class (CC BY-NC-SA 4.0, Tschandl et al. 2018)")
            answers.uploads.allow(row[0]["path"] for row in examples.dataset.samples)  # as Gradio cached them
        gr.Markdown(f"Model: `{model_name(clf.name)}` · backend {clf.backend} · input {clf.data_config.size} px")
        image.change(answers.clear, None, [probabilities, description, guard, cam], queue=False,
                     api_visibility="private")
        button.click(answers.classify, [image, tta, show_anyway], [probabilities, description, guard, cam],
                     api_name="classify", preprocess=False)
        # The API beside the page's /classify: typed functions (Gradio reads their annotations, so this
        # module does without `from __future__ import annotations`), given the upload dicts clients send.
        gr.api(answers.predict, api_name="predict")
        gr.api(answers.heat_map, api_name="explain")
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=CONCURRENCY, status_update_rate=STATUS_EVERY_S)
    return demo


def launch(demo: gr.Blocks, **options):
    """Serve the demo as the project does: upload cap, image-only uploads within a budget, bounded state, no history."""
    from starlette.middleware import Middleware

    guard = Middleware(UploadGuard, max_age_s=UPLOAD_TTL_S, max_total_mb=UPLOAD_BUDGET_MB)
    defaults = {"max_file_size": f"{MAX_UPLOAD_MB}mb", "app_kwargs": {"middleware": [guard]}, "css": CSS,
                "state_session_capacity": STATE_SESSIONS,
                # Run history keeps patients' images and answers in the browser: off unless asked for.
                "run_history": False, "footer_links": ["api", "settings"]}
    return demo.launch(**{**defaults, **options})


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the model once and serve."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or folder (default: HAM_MODEL, else the bundled model)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="auto: int8 ONNX on the CPU when the model passed its fidelity check, else fp32 ONNX")
    parser.add_argument("--host", default=None, help="default: GRADIO_SERVER_NAME, else 127.0.0.1 (Gradio's)")
    parser.add_argument("--port", type=int, default=None, help="default: GRADIO_SERVER_PORT, else 7860 (Gradio's)")
    parser.add_argument("--run_history", action="store_true",
                        help="let the browser keep each user's images and answers (off: they may be patients')")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        demo = create_demo(args.model, backend=args.backend)
    except ModelError as exc:
        logger.error("%s", exc)
        return 2
    launch(demo, server_name=args.host, server_port=args.port, run_history=args.run_history)
    return 0


if __name__ == "__main__":
    sys.exit(main())
