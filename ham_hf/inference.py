"""The public import for serving: `from ham_hf.inference import Classifier` (the code lives in ham_hf.serve)."""

from ham_hf.serve.classifier import BACKENDS, Classifier, Prediction, list_images, predict_files, resolve_model  # noqa: F401
