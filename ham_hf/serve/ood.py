"""Out-of-distribution guard: does an input look like the dermatoscopic images the model was trained on?

The score is the Mahalanobis distance (Lee et al., NeurIPS 2018) of the image's pooled penultimate
features to the nearest class centre of the training images, with one shared covariance (shrunk by
Ledoit-Wolf) in a PCA subspace of the features. Why this and not the classifier's confidence: the
softmax of a lesion classifier is often *more* confident on photos, charts and X-rays than on
lesions, while their features sit far from every lesion class (research/README.md, "The guard's score",
compares it with max-softmax and the energy score).

The guard is stored beside the model as `ood_guard.safetensors` (arrays and a threshold, no pickle).
The threshold keeps KEEP_QUANTILE of the validation lesions, times a margin, so that lesion images
from other clinics and cameras, which sit a little further out than HAM10000's own, still pass.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ham_hf.errors import ModelError

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

GUARD_FILE = "ood_guard.safetensors"
PCA_DIMS = 384
KEEP_QUANTILE = 0.99
MARGIN = 1.25
VERSION = "3"  # 3: the kind probe reads the stages' texture statistics (2: the pooled features)
# With a kind probe, the Mahalanobis threshold times this only catches what is far from everything
# (research/README.md, "The guard on real uploads": at x1 it turned away 14% of other clinics' dermoscopy).
BACKSTOP = 3.0


@dataclass
class Guard:
    """Mahalanobis-to-nearest-class-centre score with a threshold (higher = less like the training images)."""

    mean: np.ndarray        # (D,) feature mean
    components: np.ndarray  # (d, D) PCA directions
    centres: np.ndarray     # (K, d) class centres in the subspace
    precision: np.ndarray   # (d, d) shared inverse covariance
    threshold: float
    keep_quantile: float = KEEP_QUANTILE
    probe: "Probe | None" = None  # what kind of image: with it, the Mahalanobis threshold is a backstop

    @property
    def feature_size(self) -> int:
        """Length of the feature vectors the guard reads."""
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
            dims: int = PCA_DIMS, keep_quantile: float = KEEP_QUANTILE, margin: float = MARGIN) -> "Guard":
        """Fit the subspace, class centres and covariance on train; set the threshold on validation."""
        from sklearn.covariance import LedoitWolf

        x = np.asarray(train_features, dtype=np.float64)
        labels = np.asarray(train_labels)
        mean = x.mean(axis=0)
        dims = min(dims, x.shape[0] - 1, x.shape[1])
        components = np.linalg.svd(x - mean, full_matrices=False)[2][:dims]
        z = (x - mean) @ components.T
        classes = np.unique(labels)
        centres = np.stack([z[labels == c].mean(axis=0) for c in classes])
        residual = z - centres[np.searchsorted(classes, labels)]
        precision = LedoitWolf(assume_centered=True).fit(residual).precision_
        guard = cls(mean.astype(np.float32), components.astype(np.float32), centres.astype(np.float32),
                    precision.astype(np.float32), threshold=float("inf"), keep_quantile=keep_quantile)
        guard.threshold = float(np.quantile(guard.score(val_features), keep_quantile) * margin)
        return guard

    def score(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class centre, one per row."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.feature_size:
            raise ModelError(f"the OOD guard reads {self.feature_size} features per image, the model gives "
                             f"{features.shape[-1]}: the guard belongs to another model; refit it with "
                             "`ham-hf calibrate --model DIR --data ...`")
        mean, projection, centres, precision = self._float64
        # One BLAS thread: these products are small, and OpenBLAS threads left spinning after them would
        # take the cores from the next forward pass (measured: the app's p50 doubled).
        with _blas_threads(1):
            d = ((features - mean) @ projection)[:, None, :] - centres[None]  # (N, K, d)
            # d P d per row and centre as one matrix product: a three-operand einsum took 8x longer.
            return ((d @ precision) * d).sum(axis=-1).min(axis=1)

    @cached_property
    def _float64(self) -> tuple[np.ndarray, ...]:
        """mean, projection (D, d), centres and precision in float64, converted once rather than per call."""
        return tuple(np.asarray(a, dtype=np.float64) for a in (self.mean, self.components.T, self.centres,
                                                                self.precision))

    def in_distribution(self, scores: np.ndarray) -> np.ndarray:
        """Whether each Mahalanobis score passes the threshold (times BACKSTOP when a probe decides too)."""
        return np.asarray(scores) <= self.threshold * (BACKSTOP if self.probe is not None else 1.0)

    def judge(self, features: np.ndarray, colours: np.ndarray | None = None, scores: np.ndarray | None = None,
              texture: np.ndarray | None = None) -> tuple[np.ndarray, list]:
        """(in distribution?, what it seems to be: a KINDS name, or None when in) for each image.

        `scores` are the features' `score`s when the caller has them already (the serving path reports them);
        the probe reads `texture` (the stages' texture statistics) and `colours`.
        """
        with _blas_threads(1):  # small products: BLAS threads left spinning would slow the next forward pass
            return self._judge(colours, self.score(features) if scores is None else scores, texture)

    def _judge(self, colours: np.ndarray | None, scores: np.ndarray, texture: np.ndarray | None
               ) -> tuple[np.ndarray, list]:
        """judge(), on the calling thread's BLAS."""
        inside = self.in_distribution(scores)
        kinds: list = [None if ok else "other" for ok in inside]
        if self.probe is not None and colours is not None and texture is not None:
            looks = self.probe.dermoscopic(texture, colours) >= self.probe.min_dermoscopic
            for i, kind in zip(np.flatnonzero(~looks), self.probe.kind_of(texture[~looks], colours[~looks])):
                kinds[i] = kind
            inside = inside & looks
        grey = np.asarray(colours)[:, 1] > GREY_SHARE if colours is not None else np.zeros(len(inside), bool)
        for i in np.flatnonzero(grey):  # dermoscopy is a colour photograph: a greyscale image is not one
            inside[i], kinds[i] = False, "greyscale"
        return inside, kinds

    def save(self, path: str | Path) -> Path:
        """Write the arrays and threshold as safetensors (no pickle)."""
        from safetensors.numpy import save_file

        meta = {"threshold": repr(self.threshold), "keep_quantile": repr(self.keep_quantile), "version": VERSION,
                "score": "squared Mahalanobis distance to the nearest class centre (PCA subspace, Ledoit-Wolf)"}
        arrays = {"mean": self.mean, "components": self.components, "centres": self.centres,
                  "precision": self.precision}
        if self.probe is not None:
            meta.update(probe_kinds=json.dumps(list(self.probe.kinds)),
                        probe_min_dermoscopic=repr(self.probe.min_dermoscopic))
            arrays.update({f"probe_{k}": getattr(self.probe, k) for k in Probe.ARRAYS})
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}, str(path), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Guard":
        """Read a guard file; a ModelError naming the fix when it is not one."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "np") as fh:
                meta = fh.metadata() or {}
                arrays = {k: fh.get_tensor(k) for k in fh.keys()}
            if meta.get("version", "1") != VERSION and "probe_weight" in arrays:
                raise ModelError(f"{path} is a guard of version {meta.get('version')}, whose kind probe read the "
                                 f"pooled features; this version ({VERSION}) reads texture statistics: refit it with "
                                 "`ham-hf calibrate --model DIR --data ... --guard_only true --guard_negatives ... "
                                 "--guard_positives ...`")
            probe = None
            if "probe_weight" in arrays:
                probe = Probe(**{k: arrays[f"probe_{k}"] for k in Probe.ARRAYS},
                              kinds=tuple(json.loads(meta["probe_kinds"])),
                              min_dermoscopic=float(meta["probe_min_dermoscopic"]))
            guard = cls(arrays["mean"], arrays["components"], arrays["centres"], arrays["precision"],
                        threshold=float(meta["threshold"]),
                        keep_quantile=float(meta.get("keep_quantile", KEEP_QUANTILE)), probe=probe)
        except ModelError:
            raise
        except (SafetensorError, KeyError, ValueError, OSError, TypeError) as exc:
            raise ModelError(f"{path} is not a usable OOD guard file ({exc}); refit it with "
                             "`ham-hf calibrate --model DIR --data ...`") from None
        return guard

    def evaluate(self, features_of, data_config, val_features: np.ndarray, output_dir: Path | None = None,
                 colours_of=None) -> dict:
        """AUROC and share flagged on the package's non-dermoscopic images; share of validation lesions kept.

        `features_of` maps a (N, H, W, 3) uint8 tensor of decoded images to their ((N, D) features,
        (N, T) texture statistics); `colours_of` to their colour statistics, for a guard with a kind probe.
        """
        import torch
        from sklearn.metrics import roc_auc_score

        from ham_hf.transforms import load_rgb, resize_square

        names, images = zip(*non_dermoscopic_images())
        cached = torch.stack([torch.from_numpy(resize_square(load_rgb(im), data_config.resize,
                                                              data_config.interpolation)) for im in images])
        outside_features, outside_texture = features_of(cached)
        outside = self.score(outside_features)
        inside = self.score(val_features)
        truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
        figures = {"threshold": self.threshold, "keep_quantile": self.keep_quantile,
                   "validation_kept": float(self.in_distribution(inside).mean()),
                   "auroc": float(roc_auc_score(truth, np.r_[inside, outside])),
                   "n_images": len(outside)}
        flagged = ~self.in_distribution(outside)
        if self.probe is not None and colours_of is not None:
            flagged = ~self.judge(outside_features, colours_of(cached), outside, outside_texture)[0]
            figures.pop("validation_kept")  # the caller's, with colours: the probe decides too
        figures["flagged"] = float(flagged.mean())
        if output_dir is not None:  # each image's verdict as served (the probe's too), beside its score
            per_image = {n: {"score": round(float(s), 2), "flagged": bool(f)}
                         for n, s, f in zip(names, outside, flagged)}
            (Path(output_dir) / "ood_images.json").write_text(json.dumps(per_image, indent=1) + "\n")
        logger.info("OOD guard: non-dermoscopic package images AUROC %.4f, %.1f%% flagged", figures["auroc"],
                    100 * figures["flagged"])
        return figures


# What a flagged upload most likely is: the probe's classes beside "dermoscopic".
KINDS = ("dermoscopic", "skin photo", "photo", "document", "medical", "other")
GREY_SATURATION = 0.08  # HSV saturation under which a pixel counts as grey
# An image with more grey pixels than this is greyscale: the most in 3,707 dermoscopic images
# (HAM10000 and other sources) is 0.86, so this leaves room for pale lesions on pale skin.
GREY_SHARE = 0.95
# The probe's regularisation (inverse strength), chosen by leave-one-source-out (research/README.md).
PROBE_C = 0.03
# The floor gives up at most this share of a dermatoscope the probe never saw, as measured by fitting
# without each fitted source of other dermoscopy in turn (research/README.md, "A guard judged by source").
PROBE_QUANTILE = 0.2
# Added before the log of the texture statistics (means and deviations of post-ReLU maps, >= 0).
TEXTURE_EPS = 1e-3


def colour_stats(rgb: np.ndarray) -> np.ndarray:
    """(mean HSV saturation, share of grey pixels) of a uint8 RGB image: dermoscopy is a colour photograph."""
    x = np.asarray(rgb)[::4, ::4].astype(np.float32)  # every 4th pixel: the shares need no detail
    top, low = x.max(axis=-1), x.min(axis=-1)
    saturation = (top - low) / np.maximum(top, 1.0)
    return np.array([saturation.mean(), (saturation < GREY_SATURATION).mean()], dtype=np.float32)


def source_weights(labels: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Sample weights under which every source weighs alike within its class, and the two classes alike."""
    labels, sources = np.asarray(labels), np.asarray(sources)
    _, index, counts = np.unique(sources, return_inverse=True, return_counts=True)
    w = 1.0 / counts[index]
    for c in np.unique(labels):
        w[labels == c] /= w[labels == c].sum()
    return w * len(w) / len(np.unique(labels))


@dataclass
class Probe:
    """Is it dermoscopy, and if not, what is it? Logistic regressions on the stages' texture and colour statistics.

    `weight` / `bias` give P(dermoscopic), fitted with every source weighing alike (no one archive or camera
    defines "dermoscopy"); `kind_weight` / `kind_bias` name a flagged image's likeliest kind among the negatives'.
    """

    ARRAYS = ("weight", "bias", "kind_weight", "kind_bias", "scale", "offset")

    weight: np.ndarray       # (F,) dermoscopic or not, on standardised inputs
    bias: np.ndarray         # (1,)
    kind_weight: np.ndarray  # (K, F) the negatives' kinds
    kind_bias: np.ndarray    # (K,)
    scale: np.ndarray        # (F,) standardisation of the inputs
    offset: np.ndarray       # (F,)
    kinds: tuple[str, ...]   # the negatives' kinds, in kind_weight's order
    min_dermoscopic: float   # P(dermoscopic) below this: flagged

    @staticmethod
    def inputs(texture, colours) -> np.ndarray:
        """The probe's inputs: the log of the texture statistics (scale-free) and the colour statistics."""
        return np.c_[np.log(np.asarray(texture, dtype=np.float64) + TEXTURE_EPS), np.asarray(colours, np.float64)]

    def _standard(self, texture, colours) -> np.ndarray:
        """Standardised inputs."""
        return (self.inputs(texture, colours) - self.offset) / self.scale

    def dermoscopic(self, texture, colours) -> np.ndarray:
        """P(dermoscopic) of each image."""
        return 1.0 / (1.0 + np.exp(-(self._standard(texture, colours) @ self.weight + self.bias[0])))

    def kind_of(self, texture, colours) -> list[str]:
        """The likeliest non-dermoscopic kind of each image."""
        if not len(texture):
            return []
        z = self._standard(texture, colours) @ self.kind_weight.T + self.kind_bias
        return [self.kinds[i] for i in z.argmax(axis=1)]

    @classmethod
    def fit(cls, texture, colours, kinds, sources, val_texture, val_colours, strength: float = PROBE_C,
            quantile: float = PROBE_QUANTILE, keep: float = KEEP_QUANTILE, home: str | None = None,
            name_kinds: bool = True) -> "Probe":
        """Fit on labelled images: `kinds` ("dermoscopic" or a KINDS name) and `sources`, one per image.

        Without `name_kinds` the kind model is left out (every flagged image is "other"): what a
        leave-one-source-out fit needs, at a fraction of the time.

        The floor is the lowest of: the P(dermoscopic) that keeps `keep` of validation, and for each
        fitted source of dermoscopy but `home` (the training set's), the `quantile` of P(dermoscopic)
        that a fit without that source gives its images: how far out a dermatoscope it never saw sits.
        """
        from sklearn.linear_model import LogisticRegression

        x = cls.inputs(texture, colours)
        offset, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
        z, kinds, sources = (x - offset) / scale, np.asarray(kinds), np.asarray(sources)
        positive = kinds == "dermoscopic"

        def dermoscopy(rows) -> LogisticRegression:
            w = source_weights(positive[rows], sources[rows])
            return LogisticRegression(C=strength, max_iter=3000).fit(z[rows], positive[rows], sample_weight=w)

        main = dermoscopy(np.ones(len(z), dtype=bool))
        named = tuple(k for k in KINDS[1:] if k in set(kinds[~positive]))
        if len(named) == 1 or not name_kinds:  # one kind of negative: every flagged image is said to be that
            named = named if name_kinds else ("other",)
            kind_weight, kind_bias = np.zeros((1, z.shape[1])), np.zeros(1)
        else:
            kind_model = LogisticRegression(C=strength, class_weight="balanced", max_iter=3000)
            kind_model.fit(z[~positive], [named.index(k) for k in kinds[~positive]])
            kind_weight, kind_bias = kind_model.coef_, kind_model.intercept_
        if len(named) == 2:  # scikit-learn gives one row for two classes: the second's logit against the first
            kind_weight, kind_bias = np.r_[-kind_weight, kind_weight] / 2, np.r_[-kind_bias, kind_bias] / 2
        probe = cls(main.coef_[0].astype(np.float32), main.intercept_.astype(np.float32),
                    kind_weight.astype(np.float32), kind_bias.astype(np.float32), scale.astype(np.float32),
                    offset.astype(np.float32), named, 0.0)
        floors = [float(np.quantile(probe.dermoscopic(val_texture, val_colours), 1 - keep))]
        for source in sorted(set(sources[positive]) - {home}):
            held = sources == source
            without = dermoscopy(~held)
            floors.append(float(np.quantile(without.predict_proba(z[held])[:, 1], quantile)))
        probe.min_dermoscopic = min(floors)
        return probe


_CONTROLLER = None


def _blas_threads(n: int):
    """A context that limits the BLAS libraries numpy uses to n threads (threadpoolctl, found once)."""
    global _CONTROLLER
    from threadpoolctl import ThreadpoolController

    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=n, user_api="blas")


def guard_path(model_dir: str | Path) -> Path:
    """Where a model folder keeps its guard."""
    return Path(model_dir) / GUARD_FILE


# ----------------------------------------------------------------------------- non-dermoscopic images


SKIMAGE_SAMPLES = ("astronaut", "binary_blobs", "brick", "camera", "cat", "cell", "checkerboard", "clock", "coffee",
                   "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry",
                   "logo", "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale any numeric image array to uint8."""
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    return (255 * (a - a.min()) / max(a.max() - a.min(), 1e-9)).astype(np.uint8)


def generated_images(seed: int = 0) -> list[tuple[str, "Image.Image"]]:
    """Solid colours (skin tones too), noise, gradients, rendered text and charts: inputs a lesion model never saw."""
    from matplotlib.figure import Figure
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for rgb in ((0, 0, 255), (255, 0, 0), (0, 255, 0), (255, 255, 255), (0, 0, 0), (128, 128, 128), (230, 180, 160),
                (200, 120, 100), (120, 80, 60)):
        out.append((f"solid-{rgb[0]}-{rgb[1]}-{rgb[2]}", Image.new("RGB", (320, 240), rgb)))
    for i in range(4):
        out.append((f"noise-{i}", Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))))
    for i in range(4):
        ramp = (np.linspace(0, 1, 320)[None, :, None] * rng.random(3)
                + np.linspace(0, 1, 240)[:, None, None] * rng.random(3))
        out.append((f"gradient-{i}", Image.fromarray((255 * ramp / ramp.max()).astype(np.uint8))))
    for i, kind in enumerate(("line", "bar", "text", "scatter", "pie", "table")):
        fig = Figure(figsize=(4, 3))
        ax = fig.subplots()
        if kind == "line":
            ax.plot(rng.random(30).cumsum())
        elif kind == "bar":
            ax.bar(range(6), rng.random(6))
        elif kind == "scatter":
            ax.scatter(rng.random(50), rng.random(50))
        elif kind == "pie":
            ax.pie(rng.random(4) + 0.1)
        else:
            ax.axis("off")
            ax.text(0.02, 0.5, "Quarterly report\nRevenue grew 12%\nSee appendix B" if kind == "text"
                    else "id | name | value\n1  | alpha | 0.3\n2  | beta  | 0.7", fontsize=13, family="monospace")
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        out.append((f"chart-{kind}", Image.open(buf).convert("RGB")))
    return out


def non_dermoscopic_images() -> list[tuple[str, "Image.Image"]]:
    """scikit-image's and scikit-learn's bundled sample images plus generated ones (each skipped if absent)."""
    from PIL import Image

    out = []
    try:
        import skimage.data

        for name in SKIMAGE_SAMPLES:
            try:
                out.append((f"skimage-{name}", Image.fromarray(_to_uint8(getattr(skimage.data, name)()))))
            except Exception as exc:  # a sample that needs a download: skip it offline
                logger.debug("skimage sample %s unavailable: %s", name, exc)
    except ImportError:
        logger.info("scikit-image is not installed: its sample images are left out of the OOD figures")
    from sklearn.datasets import load_sample_images

    out += [(f"sklearn-{i}", Image.fromarray(a)) for i, a in enumerate(load_sample_images().images)]
    return out + generated_images()
