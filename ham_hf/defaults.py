"""The project's defaults: the backbone a run starts from, the bundled model folder, its recipe."""

from __future__ import annotations

from pathlib import Path

# With Hub access, the ImageNet ResNet-50 a run starts from (timm's; ImageNet top-1 about 80%).
DEFAULT_BACKBONE = "timm/resnet50.a1_in1k"
REPO_ROOT = Path(__file__).resolve().parents[1]
# The default model that travels with the project (and inside a Space), relative to the repo root.
BUNDLED_DIR = Path("models") / "ham10000-resnet50"
BUNDLED_MODEL = REPO_ROOT / BUNDLED_DIR
# The bundled model's recipe: `ham-hf train configs/default-model.json` retrains it.
DEFAULT_RECIPE = REPO_ROOT / "configs" / "default-model.json"
