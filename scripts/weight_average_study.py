"""Paired check of weight averaging (`--ema_decay`): every validation pass scores the average *and* the trained weights.

    .venv/bin/python scripts/weight_average_study.py configs/resnet50.json --ema_decay 0.998 [ham-hf train options]

Runs `ham-hf train` with one addition: after each evaluation of the average, the weights being trained
are scored on the same validation images too (logged as `trained_*` in trainer_state.json), so the two
are compared along one trajectory, free of the run-to-run noise that separate runs carry. Prints a
table: epoch, then validation balanced accuracy and macro AUC of each.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import Trainer, TrainerCallback  # noqa: E402

from ham_hf import train  # noqa: E402
from ham_hf.cli import main  # noqa: E402


class ScoreTrainedToo(TrainerCallback):
    """After the average is evaluated, evaluate the trained weights with prefix `trained`."""

    def __init__(self, trainer: train.HamTrainer):
        self.trainer, self.busy = trainer, False

    def on_evaluate(self, args, state, control, **kwargs):
        """Swap the trained weights in, score them, swap the average back."""
        t = self.trainer
        if self.busy or t.ema is None or not t.average_in_model:
            return
        self.busy = True
        t._swap_average()
        try:
            Trainer.evaluate(t, metric_key_prefix="trained")  # the base class's: no swap to the average
        finally:
            t._swap_average()
            self.busy = False


def table(output_dir: Path) -> str:
    """Markdown rows per evaluation: epoch, average and trained balanced accuracy and macro AUC."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    rows = {}
    for h in history:
        for prefix in ("eval", "trained"):
            if f"{prefix}_balanced_accuracy" in h:
                rows.setdefault(h["epoch"], {})[prefix] = (h[f"{prefix}_balanced_accuracy"],
                                                           h[f"{prefix}_roc_auc_macro"])
    lines = ["| epoch | trained: bal. acc. | trained: macro AUC | average: bal. acc. | average: macro AUC |",
             "|---:|---:|---:|---:|---:|"]
    for epoch, r in sorted(rows.items()):
        if "trained" in r:
            lines.append(f"| {epoch:g} | {r['trained'][0]:.3f} | {r['trained'][1]:.3f} | {r['eval'][0]:.3f} "
                         f"| {r['eval'][1]:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--ema_decay" not in argv:
        sys.exit("pass --ema_decay (e.g. 0.998): this study compares the average with the trained weights")
    build, built = train.build_trainer, []

    def build_and_watch(*args, **kwargs):
        """train.build_trainer, with the paired scoring attached."""
        trainer = build(*args, **kwargs)
        trainer.add_callback(ScoreTrainedToo(trainer))
        built.append(trainer)
        return trainer

    train.build_trainer = build_and_watch
    code = main(["train", *argv])
    if code == 0:
        print(table(Path(built[0].args.output_dir)))
    sys.exit(code)
