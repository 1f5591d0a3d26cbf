"""Out-of-distribution guard: does an input look like the dermatoscopic images the model was trained on?

The score is the Mahalanobis distance (Lee et al., NeurIPS 2018) of the image's pooled penultimate
features to the nearest class centre of the training images, with one shared covariance (shrunk by
Ledoit-Wolf) in a PCA subspace of the features. Why this and not the classifier's confidence: the
softmax of a lesion classifier is often *more* confident on photos, charts and X-rays than on
lesions, while their features sit far from every lesion class (research/README.md, "The guard's score",
compares it with max-softmax and the energy score).

The guard is stored beside the model as `ood_guard.safetensors` (arrays and a threshold, no pickle).
This module is what serving needs: load, score and judge. Fitting the guard and reporting on it is
`ham_hf.finish.guard`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ham_hf.errors import ModelError

logger = logging.getLogger(__name__)

GUARD_FILE = "ood_guard.safetensors"
KEEP_QUANTILE = 0.99
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

# What a flagged upload most likely is: the probe's classes beside "dermoscopic".
KINDS = ("dermoscopic", "skin photo", "photo", "document", "medical", "other")
GREY_SATURATION = 0.08  # HSV saturation under which a pixel counts as grey
# An image with more grey pixels than this is greyscale: the most in 3,707 dermoscopic images
# (HAM10000 and other sources) is 0.86, so this leaves room for pale lesions on pale skin.
GREY_SHARE = 0.95
# Added before the log of the texture statistics (means and deviations of post-ReLU maps, >= 0).
TEXTURE_EPS = 1e-3


def colour_stats(rgb) -> np.ndarray:
    """(mean HSV saturation, share of grey pixels) of a uint8 RGB image (H, W, 3), or of each image of a batch
    (N, H, W, 3): dermoscopy is a colour photograph."""
    x = np.asarray(rgb)[..., ::4, ::4, :]  # every 4th pixel: the shares need no detail
    r, g, b = x[..., 0], x[..., 1], x[..., 2]  # pairwise on uint8: a reduction over an axis of 3 took 6x longer
    top = np.maximum(np.maximum(r, g), b).astype(np.float32)
    low = np.minimum(np.minimum(r, g), b).astype(np.float32)
    saturation = (top - low) / np.maximum(top, 1.0)
    return np.stack([saturation.mean(axis=(-2, -1)), (saturation < GREY_SATURATION).mean(axis=(-2, -1))],
                    axis=-1).astype(np.float32)


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


