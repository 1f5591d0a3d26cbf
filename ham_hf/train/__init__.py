"""The training stage: `ham-hf train`, `tune` and `soup` over the transformers Trainer (Accelerate underneath)."""

from ham_hf.train.arguments import DataArguments, HamTrainingArguments, ModelArguments, RecipeArguments  # noqa: F401
from ham_hf.train.trainer import (  # noqa: F401
    TRAINED_WEIGHTS,
    HamTrainer,
    Teachers,
    class_weights,
    distillation_loss,
)
from ham_hf.train.training import (  # noqa: F401
    build_trainer,
    load_cached_splits,
    load_teachers,
    resolve_precision,
    run,
)
