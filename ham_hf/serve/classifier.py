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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch

from ham_hf import model as model_lib
from ham_hf.errors import ImageError, ModelError
from ham_hf.images import IMAGE_SUFFIXES
from ham_hf.labels import CLASS_CODES, MALIGNANT, display_name
from ham_hf.metrics import close_calls, softmax
from ham_hf.repo_ids import is_hub_id
from ham_hf.serve.guard import colour_stats
from ham_hf.transforms import TTA_VIEWS, Preprocess, decode_images, decode_square, tta_views

logger = logging.getLogger(__name__)

# What runs the network: auto picks int8 ONNX on the CPU when the model's fidelity check passed.
BACKENDS = ("auto", "onnx-int8", "onnx", "torch")


@dataclass(frozen=True)
class Prediction:
    """Class probabilities of one image, and whether it looks like the images the model was trained on."""

    probabilities: dict[str, float]  # class code -> probability, all 7
    ood_score: float | None = None  # higher = less like the training images; None without a guard
    in_distribution: bool | None = None  # the guard's verdict; None without a guard
    ood_kind: str | None = None  # when flagged, what it seems to be (ham_hf.serve.guard.KINDS, "greyscale")
    # The class activation map of the top class in [0, 1], at the feature map's size (when asked for).
    cam: np.ndarray | None = field(default=None, compare=False, repr=False)

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


class Outputs(NamedTuple):
    """What one forward pass gives for a batch."""

    logits: np.ndarray  # (N, classes), float64
    features: np.ndarray  # (N, D) pooled features the head reads
    texture: np.ndarray  # (N, T) the stages' texture statistics (ham_hf.model.texture_statistics)
    feature_map: np.ndarray | None = None  # (N, C, H, W) the last stage's map, when asked for


def class_activation_map(feature_map: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """CAM (Zhou et al., 2016): the head's weights of one class times the last feature map, in [0, 1].

    For a network that pools globally before one linear layer this is Grad-CAM at the last stage
    (the gradient of the class logit is those weights over the map's area), without a backward pass.
    None for a feature map that is not (channels, height, width).
    """
    if feature_map.ndim != 3:
        return None
    cam = np.maximum(np.tensordot(weight, feature_map, axes=(0, 0)), 0)
    top = cam.max()
    return (cam / top if top > 0 else cam).astype(np.float32)


class OnnxGraph:
    """An ONNX graph on the CPU: a few images on one session using every thread, a batch split across threads.

    On 2 cores the int8 graph answers more images a second as a batch's images run side by side, each on
    one thread, than on one session whose two threads meet after every layer (docs/benchmarks.md); a lone
    image still needs every thread. Each image gets the outputs it gets in the whole batch.
    """

    def __init__(self, path: str | Path, threads: int, split: bool = True):
        import onnxruntime as ort

        self.path, self.threads = str(path), threads
        self.whole = ort.InferenceSession(self.path, self._options(threads), providers=["CPUExecutionProvider"])
        self._part, self._pool = None, None
        if split and threads > 1:
            # One session serves every part: ONNX Runtime runs concurrent calls, each in its caller's thread.
            self._part = ort.InferenceSession(self.path, self._options(1), providers=["CPUExecutionProvider"])
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="ham-hf-onnx")

    @staticmethod
    def _options(threads: int):
        """Session options: `threads` intra-op threads (spinning between ops unless HAM_ORT_SPIN=0)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if os.environ.get("HAM_ORT_SPIN", "1") == "0":
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def run(self, names: list[str], pixel_values: np.ndarray) -> list[np.ndarray]:
        """The named outputs for a batch (N, 3, H, W), split across threads when there are several images."""
        if self._part is None or len(pixel_values) < self.threads:  # too few to give every thread an image
            return self.whole.run(names, {"pixel_values": pixel_values})
        # One image a run, each thread taking the next when it is free: no thread waits on a slower share
        # (the server's other threads take the cores in turn), and one image's activations stay in cache.
        outs = list(self._pool.map(lambda i: self._part.run(names, {"pixel_values": pixel_values[i:i + 1]}),
                                   range(len(pixel_values))))
        return [np.concatenate(out) for out in zip(*outs)]


def resolve_model(explicit: str | None, default_dir: str | Path | None) -> str:
    """Pick the model: explicit value, else HAM_MODEL, else the bundled default folder; explain if none."""
    chosen = explicit or os.environ.get("HAM_MODEL")
    if chosen:
        return chosen
    if default_dir and (Path(default_dir) / "config.json").is_file():
        return str(default_dir)
    raise ModelError(
        "No model to serve. Pass --model DIR_OR_HUB_ID or set HAM_MODEL (a folder written by `ham-hf train`, "
        "or a Hub id such as ORG/ham10000-resnet50); to train one: `ham-hf prepare --data HAM10000_FOLDER "
        "--output_dir data/ham10000 && ham-hf train configs/default-model.json --data data/ham10000 "
        "--output_dir outputs/ham10000-resnet50` (its backbone: timm/resnet50.a1_in1k from the Hub, or a local "
        "timm folder via --model_name_or_path)."
    )


class Classifier:
    """A HAM10000 classifier loaded once from a Hub id or a local folder.

    Its surface: `predict` (images to one Prediction each) and `predict_proba` (the same as an array);
    for a server that batches requests itself, `decode` (one upload to the model's uint8 square) and
    `classify` (decoded images to Predictions, with heat maps, in one forward pass); `pixels` (decoded
    images to the model's input) and `forward` (that input to logits, features and texture statistics)
    for the guard's fit and the heat map.
    """

    def __init__(self, name_or_path: str, backend: str = "auto", device: str | None = None):
        if not Path(name_or_path).exists() and not is_hub_id(name_or_path):
            raise ModelError(f"no model at {name_or_path!r}: give a folder written by `ham-hf train` (or bundled), "
                             "or the Hub id of one, such as ORG/ham10000-resnet50")
        model_lib.check_fine_tuned(name_or_path)
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
        # The head's weight (classes x features): with the last feature map, the class activation maps.
        self.head_weight = model_lib.head(self.model).weight.detach().float().cpu().numpy()
        self.preprocess = Preprocess(self.data_config).to(self.device)
        self.guard = self._load_guard(name_or_path)
        # The ONNX graph that serves (onnx backends); with a cascade in the int8 record, the float32 graph and
        # the int8 margin under which it answers.
        self._graph, self._fallback, self._margin = None, None, 0.0
        self.backend = self._choose_backend(backend)
        logger.info("loaded %s (%s, %d px, backend %s, %s)", name_or_path, self.device, self.data_config.size,
                    self.backend, "OOD guard" if self.guard else "no OOD guard")

    def _load_guard(self, name_or_path: str):
        """The model's OOD guard (a local file, or from the Hub repo), or None when it has none."""
        from ham_hf.serve import guard as guard_lib

        try:
            path = self._model_file(guard_lib.GUARD_FILE)
        except Exception:  # no guard in the repo (or offline): predictions carry no verdict
            return None
        if not path.is_file():
            return None
        guard = guard_lib.Guard.load(path)
        width = model_lib.head(self.model).in_features
        if guard.feature_size != width:
            raise ModelError(f"the OOD guard in {name_or_path} reads {guard.feature_size} features but the model "
                             f"gives {width}: it belongs to another model; refit it with `ham-hf calibrate`")
        return guard

    def _choose_backend(self, backend: str) -> str:
        """torch, onnx (fp32) or onnx-int8; auto: int8 on the CPU when the model's fidelity check passed.

        Whatever stops int8 (no ranges, a failed gate, an ONNX Runtime without the tools, a corrupt
        cached file) falls back to fp32 ONNX with one log line saying why; never a crash at start-up.
        """
        if backend not in BACKENDS:
            raise ModelError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if backend == "torch" or (backend == "auto" and self.device.type != "cpu"):
            return "torch"
        try:
            import onnxruntime  # noqa: F401 (OnnxGraph imports it where it runs)

            from ham_hf.serve import export
        except ImportError:
            if backend != "auto":
                raise ModelError("the onnx backends need `pip install onnx onnxruntime`") from None
            return "torch"
        threads = torch.get_num_threads()
        if backend in ("auto", "onnx-int8"):
            try:
                fidelity, reason = self._int8_record(), None
            except Exception as exc:  # no record in the Hub repo, offline, or of another version
                from ham_hf.results import FILE

                fidelity, reason = {}, f"no readable {FILE} ({str(exc).splitlines()[0]})"
            reason = reason or self._int8_refusal(fidelity, gate=backend == "auto")
            if reason is None:
                try:
                    path = self._int8_graph(fidelity)
                    self._graph = OnnxGraph(path, threads)
                    cascade = fidelity.get("recipe", {}).get("cascade")
                    if cascade:  # float32 answers the close calls (ham_hf.finish.int8.cascaded): a few at a time
                        self._fallback = OnnxGraph(export.cached_onnx(self.model, self.data_config.size), threads,
                                                   split=False)
                        self._margin = float(cascade["margin"])
                        logger.info("int8 answers when its top logit leads the second by %.3f or more, float32 "
                                    "otherwise (%.1f%% of validation)", self._margin,
                                    100 * fidelity.get("sent_to_fp32", float("nan")))
                    return "onnx-int8"
                except Exception as exc:  # no ranges, old runtime, a corrupt cache: fp32 serves instead
                    reason = str(exc).splitlines()[0]
            logger.info("int8 not used (%s); serving fp32 ONNX", reason)
        # Whole, not split: split, the fp32 graph answered no faster on 2 cores (benchmarks/predict_throughput.py),
        # and a second fp32 session would hold ~100 MB more.
        self._graph = OnnxGraph(export.cached_onnx(self.model, self.data_config.size), threads, split=False)
        return "onnx"

    def _model_file(self, name: str) -> Path:
        """A file beside the model (a local folder, or fetched from its Hub repo)."""
        if Path(self.name).is_dir():
            return Path(self.name) / name
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.name, name))

    def _int8_record(self) -> dict:
        """The int8 section of the model's results record ({} when it has none)."""
        from ham_hf import results

        record = results.load(self.name) if Path(self.name).is_dir() else results.read(self._model_file(results.FILE))
        return record.get("int8") or {}

    def _int8_refusal(self, fidelity: dict, gate: bool = True) -> str | None:
        """Why int8 is not served for this model by its record's int8 section, or None when its files are the
        ones its fidelity check measured for these weights (and, with `gate`, that check passed)."""
        from ham_hf.serve import export

        if not fidelity:
            return "the model's record has no int8 fidelity check (run `ham-hf calibrate --int8_only true`)"
        made = fidelity.get("recipe", {}).get("format")
        if made not in export.INT8_READABLE:
            return (f"its int8 files are of {'an older' if (made or 0) < export.INT8_FORMAT else 'a newer'} format "
                    f"({made or 1}, this ham-hf reads {' and '.join(map(str, export.INT8_READABLE))}); "
                    "rerun `ham-hf calibrate --int8_only true`")
        if gate and not fidelity.get("passed"):
            return (f"its fidelity check failed: top-1 agreement {fidelity.get('top1_agreement', float('nan')):.4f}, "
                    f"balanced accuracy {fidelity.get('balanced_accuracy_int8', float('nan')):.4f} vs fp32 "
                    f"{fidelity.get('balanced_accuracy_fp32', float('nan')):.4f}")
        if fidelity.get("made_for") != export.backbone_digest(self.model):
            return ("its int8 files were made for other weights (a bundled or retrained copy?); rerun "
                    "`ham-hf calibrate --int8_only true`")
        for name, digest in fidelity.get("files", {}).items():
            try:
                same = export.file_digest(self._model_file(name)) == digest
            except Exception:  # missing locally, or not in the Hub repo
                same = False
            if not same:
                return f"{name} is missing or not the file its fidelity check measured"
        return None

    def _int8_graph(self, fidelity: dict | None = None) -> Path:
        """The int8 graph the record's int8 section (read when not given) builds from the files beside the model."""
        from ham_hf.serve import export

        fidelity = self._int8_record() if fidelity is None else fidelity
        tuned = export.INT8_WEIGHTS in fidelity.get("files", {})
        return export.cached_int8(self.model, self.data_config.size, self._model_file(export.INT8_RANGES),
                                  fidelity.get("recipe", {}).get("float_until_stride", export.FLOAT_UNTIL_STRIDE),
                                  self._model_file(export.INT8_WEIGHTS) if tuned else None)

    def decode(self, image) -> torch.Tensor:
        """One image (path, bytes or PIL) as the model's uint8 HWC square at its eval resize (bounded, checked)."""
        dc = self.data_config
        return torch.from_numpy(decode_square(image, dc))

    def pixels(self, images) -> torch.Tensor:
        """Decoded uint8 images (N, H, W, 3; array or tensor) -> the model's input batch (eval crop, normalised)."""
        if self.backend.startswith("onnx"):  # the same values, in the NCHW layout ONNX Runtime reads
            return torch.from_numpy(self.preprocess.eval_array(np.asarray(images)))
        return self.preprocess(torch.as_tensor(images).to(self.device), train=False)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor, feature_map: bool = False) -> Outputs:
        """Run the model on a preprocessed batch: logits (float64), features, texture (and the last feature map)."""
        if self.backend.startswith("onnx"):
            names = ["logits", "features", "texture"] + (["feature_map"] if feature_map else [])
            x = pixel_values.contiguous().cpu().numpy()
            outs = self._graph.run(names, x)
            close = np.flatnonzero(close_calls(outs[0], self._margin)) if self._fallback is not None else []
            if len(close):  # the cascade: float32 recomputes the images int8 decides by a small margin
                for out, exact in zip(outs, self._fallback.run(names, x[close])):
                    out[close] = exact
            return Outputs(outs[0].astype(np.float64), *outs[1:])
        fmap, features, logits, texture = model_lib.forward_all(self.model, pixel_values, texture=True)
        return Outputs(logits.double().cpu().numpy(), features.float().cpu().numpy(), texture.float().cpu().numpy(),
                       fmap.float().cpu().numpy() if feature_map else None)

    def predict(self, images: Sequence, tta: bool = False) -> list[Prediction]:
        """One Prediction per image (paths, bytes or PIL), with the guard's score, verdict and kind where the model
        has a guard; with tta, the probabilities are averaged over the 8 flip / 90-degree views."""
        return self.classify(self._decode_all(images), tta=tta)

    def predict_proba(self, images: Sequence, tta: bool = False) -> np.ndarray:
        """(N, 7) probabilities in CLASS_CODES order: `predict` as an array."""
        return np.array([[p.probabilities[c] for c in CLASS_CODES] for p in self.predict(images, tta)])

    def _decode_all(self, images: Sequence) -> list[torch.Tensor]:
        """Decoded uint8 squares of images (in threads when there are several)."""
        if len(images) == 1:  # the app's path: no thread pool
            return [self.decode(images[0])]
        dc = self.data_config
        return list(decode_images(list(images), dc, threads=min(4, len(images))))

    def classify(self, decoded: Sequence[torch.Tensor], tta: bool | Sequence[bool] = False,
                 cam: bool = False) -> list[Prediction]:
        """Predictions (with `cam`, class activation maps) of decoded images, in one forward pass.

        `decoded` are `decode` outputs; `tta` is one flag for all or one per image (the 8 flip /
        90-degree views, probabilities averaged). The guard scores, and the map shows, the image as given.
        """
        flags = [bool(tta)] * len(decoded) if isinstance(tta, bool) else [bool(f) for f in tta]
        # numpy, not torch, on the ONNX path: torch's threads would spin after each op, taking the cores from it.
        images = np.stack([np.asarray(d) for d in decoded])
        # Before the forward pass, which leaves the caches full of its own weights, while the images are in them.
        colours = colour_stats(images) if self.guard is not None else None
        x = self.pixels(images)
        turned = [i for i, f in enumerate(flags) if f]
        # The other 7 views of the images that asked for them, view-major, after the images themselves.
        batch = torch.cat([x, tta_views(x[turned])[len(turned):]]) if turned else x
        outs = self.forward(batch, feature_map=cam)
        probs, n = softmax(outs.logits), len(decoded)
        extra = probs[n:].reshape(TTA_VIEWS - 1, len(turned), probs.shape[1]) if turned else None
        scores, verdicts, kinds = [None] * n, [None] * n, [None] * n
        if self.guard is not None:
            scores = self.guard.score(outs.features[:n])
            verdicts, kinds = self.guard.judge(outs.features[:n], colours, scores, outs.texture[:n])
        out, k = [], 0
        for i in range(n):
            p = probs[i]
            if flags[i]:
                p = (p + extra[:, k].sum(axis=0)) / TTA_VIEWS
                k += 1
            heat = class_activation_map(outs.feature_map[i], self.head_weight[int(p.argmax())]) if cam else None
            score = None if scores[i] is None else float(scores[i])
            verdict = None if verdicts[i] is None else bool(verdicts[i])
            out.append(Prediction(dict(zip(CLASS_CODES, map(float, p))), score, verdict, kinds[i], heat))
        return out


@dataclass
class PredictArguments:
    """Options of `ham-hf predict PATHS...`."""

    model: str = field(metadata={"help": "Model folder or Hub id."})
    output: str = field(default="predictions.csv", metadata={"help": "CSV to write (one row per image)."})
    tta: bool = field(default=False, metadata={"help": "Average 8 flipped / rotated views."})
    batch_size: int = field(default=32, metadata={"help": "Images per forward pass."})
    backend: str = field(default="auto", metadata={
        "help": "auto (int8 ONNX on the CPU when the model's fidelity check passed, else fp32 ONNX), onnx-int8, "
                "onnx or torch.", "choices": list(BACKENDS)})


PREDICT_USAGE = """ham-hf predict PATHS... --model MODEL [--output predictions.csv] [options]

PATHS are image files and folders (searched recursively for JPEG, PNG, HEIC, WebP, TIFF, BMP and
GIF files); unreadable files are reported and skipped. One CSV row per image: all 7 probabilities,
the benign / malignant grouping and the out-of-distribution guard's verdict."""


def write_predictions(paths: Sequence[str], args: PredictArguments) -> int:
    """`ham-hf predict`: classify image files and folders into a CSV, whole or not at all; the number written."""
    import csv

    files = list_images(paths)
    if not files:
        raise ImageError("no images given: ham-hf predict PATHS... --model MODEL (files or folders)")
    rows, skipped = predict_files(Classifier(args.model, backend=args.backend), files, args.batch_size, args.tta)
    output = Path(args.output)
    if not rows:  # an old CSV from an earlier run must not pass for this run's answer
        output.unlink(missing_ok=True)
        logger.error("no image could be read (%d skipped): nothing written to %s", len(skipped), output)
        return 0
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    with partial.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(output)
    logger.info("wrote %d predictions to %s; skipped %d unreadable file(s)", len(rows), output, len(skipped))
    return len(rows)


def list_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image files."""
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

    rows, skipped = [], []

    def load(chunk: Sequence[Path]) -> tuple[list[str], list[torch.Tensor]]:
        """Decode one batch of files, reporting and skipping the unreadable ones."""
        names, decoded = [], []
        for path in chunk:
            try:
                decoded.append(classifier.decode(str(path)))
                names.append(str(path))
            except (ImageError, OSError) as exc:
                logger.warning("skipped %s: %s", path, exc)
                skipped.append((str(path), str(exc)))
        return names, decoded

    # The next batch decodes in a thread while the model runs on this one, filling the cores' idle moments.
    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    with ThreadPoolExecutor(1, thread_name_prefix="ham-hf-decode") as loader, \
            tqdm(total=len(files), desc="predict", unit="img", disable=not progress) as bar:
        ahead = loader.submit(load, chunks[0]) if chunks else None
        for i, chunk in enumerate(chunks):
            names, decoded = ahead.result()
            if i + 1 < len(chunks):
                ahead = loader.submit(load, chunks[i + 1])
            for name, pred in zip(names, classifier.classify(decoded, tta) if decoded else []):
                rows.append({"path": name, "predicted": pred.top, "group": pred.group,
                             "malignant_probability": round(pred.malignant_probability, 6),
                             **{f"prob_{c}": round(p, 6) for c, p in pred.probabilities.items()},
                             "ood_score": None if pred.ood_score is None else round(pred.ood_score, 3),
                             "in_distribution": pred.in_distribution, "ood_kind": pred.ood_kind})
            bar.update(len(chunk))
    return rows, skipped
