"""Training through the Trainer: output folder, freeze schedule, optimizer groups, resume, evaluate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from ham_hf import data, metrics, train
from ham_hf import model as model_lib
from ham_hf.cli import main
from ham_hf.errors import UserError
from ham_hf.labels import CLASS_CODES
from ham_hf.transforms import AugmentArguments

from conftest import train_argv

# ----------------------------------------------------------------------------- the output folder


def test_output_folder_is_complete(tiny_model):
    for name in ("config.json", "model.safetensors", "README.md", "results.json", "split.csv",
                 "training_curves.png", "test_confusion_matrix.png", "test_per_class.csv", "test_predictions.csv",
                 "validation_confusion_matrix.png"):
        assert (tiny_model / name).is_file(), name
    assert not (tiny_model / "all_results.json").exists()  # the record is the one results file
    record = json.loads((tiny_model / "results.json").read_text())
    for split in ("validation", "test"):
        for key in ("balanced_accuracy", "macro_f1", "roc_auc_macro", "ci"):
            assert key in record["splits"][split], (split, key)
        assert record["splits"][split] == json.loads((tiny_model / f"{split}_metrics.json").read_text())
    assert record["training"]["runtime_s"] > 0 and record["training"]["command"].startswith("ham-hf train")
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["label_names"] == list(CLASS_CODES) and config["num_classes"] == 7
    rows = list(csv.DictReader((tiny_model / "test_predictions.csv").open()))
    assert rows and [k for k in rows[0] if k.startswith("prob_")] == [f"prob_{c}" for c in CLASS_CODES]
    assert sum(float(rows[0][f"prob_{c}"]) for c in CLASS_CODES) == pytest.approx(1, abs=1e-4)


def test_saved_folder_loads_in_pipeline_with_class_names(tiny_model, ham_dir_ro):
    from PIL import Image
    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(tiny_model))
    image = Image.open(next(ham_dir_ro.glob("HAM10000_images_part_1/*.jpg")))
    out = classifier(image, top_k=7)
    assert sorted(o["label"] for o in out) == sorted(CLASS_CODES)
    assert sum(o["score"] for o in out) == pytest.approx(1.0, abs=1e-5)


def test_saved_folder_loads_in_timm(tiny_model):
    import timm

    net = timm.create_model(f"local-dir:{tiny_model}", pretrained=True)
    assert net.num_classes == 7
    assert net.pretrained_cfg["label_names"] == list(CLASS_CODES)
    # Weights are timm's own names (no transformers prefix) and stored as safetensors.
    assert all(not k.startswith("timm_model.") for k in load_file(str(tiny_model / "model.safetensors")))


def test_model_card_metadata(tiny_model):
    from huggingface_hub import ModelCard

    card = ModelCard.load(tiny_model / "README.md")
    assert card.data.library_name == "timm"
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.license == "cc-by-nc-sa-4.0"
    test = json.loads((tiny_model / "results.json").read_text())["splits"]["test"]
    by_type = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert by_type["balanced_accuracy"] == pytest.approx(test["balanced_accuracy"], abs=1e-4)
    assert "Not a medical device" in card.text and "lesion_id" in card.text and "ham-hf train" in card.text


def test_split_file_matches_the_data_split(tiny_model, ham_dir_ro):
    saved = {r["image_id"]: r["split"] for r in csv.DictReader((tiny_model / "split.csv").open())}
    again = {r["image_id"]: r["split"] for r in data.split_table(data.load_splits(ham_dir_ro))}
    assert saved == again


def test_real_resnet50_loads_with_new_head_and_trains_a_step(real_images, resnet50_dir):
    """The real ResNet-50 code path: ImageNet folder -> 7-class head -> a step -> pipeline."""
    weights = resnet50_dir
    from ham_hf.transforms import Preprocess, decode_images

    model = model_lib.load_model(str(weights), image_size=64)
    assert model.config.label_names == list(CLASS_CODES) and model.config.num_labels == 7
    dc = model_lib.data_config(model)
    cfg = json.loads((weights / "config.json").read_text())["pretrained_cfg"]
    assert (dc.size, dc.interpolation, dc.mean) == (64, cfg["interpolation"], tuple(cfg["mean"]))
    assert dc.resize == int(64 / cfg["crop_pct"])
    images = decode_images(list(real_images.values()), dc)
    labels = torch.tensor([CLASS_CODES.index(c) for c in real_images])
    backbone, head = model_lib.split_parameters(model)
    assert len(head) == 2 and sum(p.numel() for p in backbone) > 23_000_000
    pre = Preprocess(dc)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model(pixel_values=pre(images, train=True)).logits, labels)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- recipe pieces


def test_class_weights_balance_the_classes():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    w = train.class_weights(labels, "balanced", num_classes=3)
    counts = torch.tensor([6.0, 3.0, 1.0])
    assert torch.allclose(w * counts, (w * counts)[0].expand(3))  # each class weighs the same in total
    assert (w * counts).sum() / counts.sum() == pytest.approx(1.0)
    assert train.class_weights(labels, "none") is None
    s = train.class_weights(labels, "sqrt", num_classes=3)
    assert s[2] / s[0] == pytest.approx(6 ** 0.5, rel=1e-5)


def _trainer(tmp_path, ham_dir_ro, tiny_backbone, recipe, **kw):
    options = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, num_train_epochs=2,
                   learning_rate=1e-2, save_strategy="no", eval_strategy="no", load_best_model_at_end=False, seed=0)
    args = train.HamTrainingArguments(**{**options, **kw})
    model = model_lib.load_model(str(tiny_backbone))
    dc = model_lib.data_config(model)
    _, cached = train.load_cached_splits(train.DataArguments(data=str(ham_dir_ro)), data.SplitArguments(), dc)
    return train.build_trainer(model, args, dc, cached, recipe, AugmentArguments())


def test_backbone_frozen_then_unfrozen_with_lower_lr(tmp_path, ham_dir_ro, tiny_backbone):
    recipe = train.RecipeArguments(freeze_backbone_epochs=1, backbone_lr_multiplier=0.1)
    trainer = _trainer(tmp_path, ham_dir_ro, tiny_backbone, recipe)
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kw):
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    start = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.add_callback(Snapshot())
    trainer.train()
    head_keys = {k for k in start if k.startswith("timm_model.fc.")}
    body_keys = [k for k in start if k not in head_keys and start[k].is_floating_point()]
    after_frozen, after_all = snapshots
    assert all(torch.equal(start[k], after_frozen[k]) for k in body_keys), "backbone (and its BN stats) must not move"
    assert not all(torch.equal(start[k], after_frozen[k]) for k in head_keys)
    assert not all(torch.equal(after_frozen[k], after_all[k]) for k in body_keys)
    lrs = {len(g["params"]): g["initial_lr"] for g in trainer.optimizer.param_groups}
    net = trainer.model.timm_model
    groups = trainer.optimizer.param_groups
    head_lr = [g["initial_lr"] for g in groups if any(p is net.fc.weight for p in g["params"])]
    body_lr = [g["initial_lr"] for g in groups if any(p is net.conv1[0].weight for p in g["params"])]
    assert head_lr == [pytest.approx(1e-2)] and body_lr == [pytest.approx(1e-3)], lrs


def test_frozen_stages_keep_their_weights_and_statistics(tmp_path, ham_dir_ro, tiny_backbone):
    recipe = train.RecipeArguments(freeze_backbone_epochs=1, frozen_stages=1)
    trainer = _trainer(tmp_path, ham_dir_ro, tiny_backbone, recipe)
    start = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    end = trainer.model.state_dict()
    frozen = [k for k in start if k.startswith(("timm_model.conv1.", "timm_model.bn1.", "timm_model.layer1."))]
    rest = [k for k in start if k.startswith(("timm_model.layer2.", "timm_model.layer4."))]
    assert frozen and rest
    assert all(torch.equal(start[k], end[k]) for k in frozen), "stem and stage 1: weights and BN statistics as loaded"
    assert all(not torch.equal(start[k], end[k]) for k in rest if k.endswith(("weight", "running_mean")))
    net = trainer.model.timm_model
    assert not net.layer1[0].conv1.weight.requires_grad and net.layer2[0].conv1.weight.requires_grad


def test_frozen_stages_out_of_range_are_refused_before_the_decode(tmp_path, ham_dir_ro, tiny_backbone, caplog):
    with pytest.raises(UserError, match="--frozen_stages must be >= 0"):
        train.RecipeArguments(frozen_stages=-1)
    caplog.set_level("INFO")
    assert main(train_argv(ham_dir_ro, tiny_backbone, tmp_path / "o", "--frozen_stages", "5")) == 2
    assert "--frozen_stages must be 0 to 4 for ResNet (the stem and its 4 stages; got 5)" in caplog.text
    assert "decoded" not in caplog.text


def test_balanced_sampling_draws_rare_classes_often(tmp_path, ham_dir_ro, tiny_backbone):
    trainer = _trainer(tmp_path, ham_dir_ro, tiny_backbone, train.RecipeArguments(balanced_sampling=True))
    sampler = trainer._get_train_sampler()
    labels = trainer.train_dataset.labels
    drawn = torch.bincount(labels[torch.tensor([i for _ in range(40) for i in sampler])], minlength=7).float()
    share = drawn / drawn.sum()
    assert share.min() > 0.09 and share.max() < 0.2  # about 1/7 each; nv dominates the raw data


# ----------------------------------------------------------------------------- resume


class Interrupted(RuntimeError):
    pass


def test_interrupted_run_resumes_without_losing_or_repeating_steps(tmp_path, ham_dir_ro, tiny_backbone, monkeypatch):
    extra = ["--eval_strategy", "steps", "--eval_steps", "4", "--save_strategy", "steps", "--save_steps", "4",
             "--save_total_limit", "5"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(train_argv(ham_dir_ro, tiny_backbone, full, *extra)) == 0

    original = train.HamTrainer.training_step

    def crash_at_step_6(self, *args, **kwargs):
        if self.state.global_step == 6:
            raise Interrupted("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(train.HamTrainer, "training_step", crash_at_step_6)
    with pytest.raises(Interrupted):
        main(train_argv(ham_dir_ro, tiny_backbone, cut, *extra))
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-4"]
    monkeypatch.setattr(train.HamTrainer, "training_step", original)
    assert main(train_argv(ham_dir_ro, tiny_backbone, cut, *extra, "--resume_from_checkpoint", "true")) == 0

    state = json.loads((cut / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps == list(range(1, state["max_steps"] + 1)), "every step logged exactly once"
    # The resumed run ends where the uninterrupted one does.
    a, b = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- weight averaging


class RecordTrained(TrainerCallback):
    """The weights being trained after every optimiser step (after the average's own update)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, **kw):
        self.steps.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def expected_average(steps: list[dict], cap: float) -> dict:
    """The warmed-up EMA of a trajectory, computed by hand: decay 1 - (1 + s)^-3/4, s = step - 1, capped."""
    average = None
    for step, weights in enumerate(steps, start=1):
        s = step - 1
        decay = 0.0 if s <= 0 else min(cap, 1 - (1 + s) ** -0.75)
        average = {k: (v.clone() if average is None or not v.is_floating_point()
                       else decay * average[k] + (1 - decay) * v) for k, v in weights.items()}
    return average


def _averaging_trainer(tmp_path, ham_dir_ro, tiny_backbone, name, **kw):
    torch.manual_seed(0)  # the same new head for every run
    recipe = train.RecipeArguments(freeze_backbone_epochs=0, ema_decay=0.9)
    trainer = _trainer(tmp_path / name, ham_dir_ro, tiny_backbone, recipe, **kw)
    record = RecordTrained()
    trainer.add_callback(record)
    return trainer, record


def assert_same(a: dict, b: dict, **tol):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], **tol)


def test_weight_average_is_scored_and_saved_while_training_goes_on_from_the_trained_weights(
        tmp_path, ham_dir_ro, tiny_backbone):
    def weights(trainer):
        return {k: v.detach() for k, v in trainer.model.state_dict().items()}

    plain, plain_steps = _averaging_trainer(tmp_path, ham_dir_ro, tiny_backbone, "plain")
    plain.train()
    assert_same(weights(plain), expected_average(plain_steps.steps, 0.9), rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError):  # the average is not the last step's weights
        assert_same(weights(plain), plain_steps.steps[-1])

    # Evaluating and checkpointing every epoch swaps the average in and out: training must not notice. (The
    # Trainer's evaluation itself moves the random state, so the reference evaluates too, without averaging.)
    every_epoch = dict(eval_strategy="epoch", save_strategy="epoch")
    torch.manual_seed(0)
    reference = _trainer(tmp_path / "reference", ham_dir_ro, tiny_backbone,
                         train.RecipeArguments(freeze_backbone_epochs=0), **every_epoch)
    reference_steps = RecordTrained()
    reference.add_callback(reference_steps)
    reference.train()
    checked, steps = _averaging_trainer(tmp_path, ham_dir_ro, tiny_backbone, "checked", **every_epoch)
    checked.train()
    assert len(steps.steps) == len(reference_steps.steps) == len(plain_steps.steps)
    for a, b in zip(steps.steps, reference_steps.steps):
        assert_same(a, b, rtol=0, atol=0)
    final = weights(checked)
    assert_same(final, expected_average(steps.steps, 0.9), rtol=1e-5, atol=1e-6)
    first = sorted((tmp_path / "checked" / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[0]
    n = int(first.name.split("-")[1])
    saved = {f"timm_model.{k}": v for k, v in load_file(str(first / "model.safetensors")).items()}  # timm's names
    assert_same(saved, expected_average(steps.steps[:n], 0.9), rtol=1e-5, atol=1e-6)
    assert_same(load_file(str(first / train.TRAINED_WEIGHTS)), steps.steps[n - 1], rtol=0, atol=0)

    # Resuming from that checkpoint goes on from its trained weights and its average: it ends where the run did.
    resumed, _ = _averaging_trainer(tmp_path, ham_dir_ro, tiny_backbone, "resumed", **every_epoch)
    resumed.train(resume_from_checkpoint=str(first))
    assert_same(weights(resumed), final, rtol=1e-5, atol=1e-6)


def test_averaging_run_saves_the_best_checkpoint_average(tmp_path, ham_dir_ro, tiny_backbone):
    out = tmp_path / "run"
    assert main(train_argv(ham_dir_ro, tiny_backbone, out, "--ema_decay", "0.5", "--calibrate", "false",
                           "--num_train_epochs", "3", "--save_total_limit", "5")) == 0
    best = Path(json.loads((out / "trainer_state.json").read_text())["best_model_checkpoint"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) != [best.name]  # others exist: the choice is real
    assert_same(load_file(str(out / "model.safetensors")), load_file(str(best / "model.safetensors")), rtol=0, atol=0)
    assert "| ema_decay | 0.5 |" in (out / "README.md").read_text()




def test_averaging_run_asked_to_resume_without_a_checkpoint_still_refuses(tmp_path, ham_dir_ro, tiny_backbone):
    trainer, _ = _averaging_trainer(tmp_path, ham_dir_ro, tiny_backbone, "empty")
    Path(trainer.args.output_dir).mkdir(parents=True, exist_ok=True)
    with pytest.raises(ValueError, match="No valid checkpoint"):
        trainer.train(resume_from_checkpoint=True)


def test_ema_decay_outside_zero_one_is_refused():
    with pytest.raises(UserError, match="--ema_decay must be in"):
        train.RecipeArguments(ema_decay=1.0)


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_cli_scores_a_saved_model(tiny_model, ham_dir_ro, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(ham_dir_ro), "--split", "all",
                 "--output", str(out), "--record", "false"]) == 0
    result = json.loads((out / "all_metrics.json").read_text())
    assert sum(sum(r) for r in result["confusion_matrix"]) == len(data.read_ham10000(ham_dir_ro))
    for name in ("all_confusion_matrix.png", "all_per_class.csv", "all_predictions.csv", "results.json"):
        assert (out / name).is_file()
    entry = json.loads((out / "results.json").read_text())["evaluations"][f"{ham_dir_ro.name}"]
    assert entry["result"] == result and entry["split"] == "all" and entry["tta"] is False
    # The same numbers as the test split's scoring at the end of training.
    test_out = tmp_path / "test"
    main(["evaluate", "--model", str(tiny_model), "--data", str(ham_dir_ro), "--output", str(test_out),
          "--record", "false"])
    a = json.loads((test_out / "test_metrics.json").read_text())
    b = json.loads((tiny_model / "test_metrics.json").read_text())
    assert a["balanced_accuracy"] == pytest.approx(b["balanced_accuracy"])
    assert a["confusion_matrix"] == b["confusion_matrix"]


def test_evaluate_with_tta_scores_what_the_app_serves_with_tta(tiny_model, ham_dir_ro, tmp_path):
    from ham_hf.finish import evaluation
    from ham_hf.serve.classifier import Classifier

    out = tmp_path / "eval-tta"
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(ham_dir_ro), "--split", "validation",
                 "--tta", "true", "--output", str(out), "--batch_size", "16", "--record", "false"]) == 0
    entries = json.loads((out / "results.json").read_text())["evaluations"]
    assert [e["tta"] for e in entries.values()] == [True]
    # In float32, to compare exactly with the app's TTA (8 views, probabilities averaged) on the torch path.
    evaluation.evaluate_model(str(tiny_model), str(ham_dir_ro), "validation", str(out), batch_size=16, bf16=False,
                              tta=True, record=False)
    rows = list(csv.DictReader((out / "validation_predictions.csv").open()))[:6]
    files = [next(ham_dir_ro.glob(f"HAM10000_images_part_*/{r['image_id']}.jpg")) for r in rows]
    served = Classifier(str(tiny_model), backend="torch").predict_proba([str(f) for f in files], tta=True)
    reported = np.array([[float(r[f"prob_{c}"]) for c in CLASS_CODES] for r in rows])
    assert reported == pytest.approx(served, abs=1e-5)
    plain = Classifier(str(tiny_model), backend="torch").predict_proba([str(f) for f in files])
    # The views change the answer by far more than evaluate and the app differ: TTA did run.
    assert np.abs(plain - served).max() > 20 * np.abs(reported - served).max() + 1e-6


def test_evaluate_refuses_a_backbone(tiny_backbone, ham_dir_ro, caplog):
    assert main(["evaluate", "--model", str(tiny_backbone), "--data", str(ham_dir_ro)]) == 2
    assert "is not a HAM10000 classifier" in caplog.text and "ham-hf train" in caplog.text


# ----------------------------------------------------------------------------- metrics


def test_metric_module_loads_by_path_and_matches_sklearn():
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    labels = np.arange(140) % 7
    probs = rng.dirichlet(np.ones(7), size=140)
    probs[np.arange(140), labels] += 0.5
    probs /= probs.sum(1, keepdims=True)
    r = metrics.compute(probs, labels)
    pred = probs.argmax(1)
    assert r["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
    assert r["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert r["roc_auc_macro"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    assert np.trace(np.array(r["confusion_matrix"])) == (pred == labels).sum()
    assert r["per_class"]["mel"]["support"] == 20
    assert metrics.load_metric().name == "ham10000_metrics"


def test_json_config_with_overrides():
    from ham_hf import data as data_lib
    from ham_hf.cli import parse

    config = Path(__file__).resolve().parents[2] / "configs" / "default-model.json"
    model_args, data_args, recipe, augment, split, args = parse(
        [str(config), "--num_train_epochs", "2", "--output_dir", "/tmp/x"], train.ModelArguments,
        train.DataArguments, train.RecipeArguments, AugmentArguments, data_lib.SplitArguments,
        train.HamTrainingArguments)
    assert args.num_train_epochs == 2 and args.output_dir == "/tmp/x"  # the overrides win
    assert args.per_device_train_batch_size == 128 and recipe.label_smoothing == 0.1  # from the file
    assert recipe.ema_decay == 0.998 and augment.channel_gain == 0.15  # the bundled model's recipe
    assert model_args.model_name_or_path == "timm/resnet50.a1_in1k" and data_args.data == "data/ham10000"  # defaults


@pytest.mark.slow
def test_distributed_run_with_two_processes(tmp_path, ham_dir_ro, tiny_backbone):
    """The multi-GPU path, run as two CPU processes (torchrun, gloo): DDP with the freeze phase, one writer."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ham_hf.cli",
           *train_argv(ham_dir_ro, tiny_backbone, out, "--per_device_train_batch_size", "4",
                       "--freeze_backbone_epochs", "1", "--ddp_find_unused_parameters", "true",
                       "--ddp_backend", "gloo")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    train_size = sum(1 for r in csv.DictReader((out / "split.csv").open()) if r["split"] == "train")
    # Two processes share each epoch: steps per epoch = ceil(train / (2 x 4)).
    assert state["max_steps"] == 2 * -(-train_size // 8)
    rows = list(csv.DictReader((out / "test_predictions.csv").open()))
    assert len(rows) == sum(1 for r in csv.DictReader((out / "split.csv").open()) if r["split"] == "test")
    assert json.loads((out / "config.json").read_text())["label_names"] == list(CLASS_CODES)


def test_unreachable_backbone_names_the_offline_fix(tmp_path, ham_dir_ro, caplog):
    argv = ["train", "--data", str(ham_dir_ro), "--output_dir", str(tmp_path / "o"),
            "--model_name_or_path", "nobody/no-such-model"]
    assert main(argv) == 2
    assert "cannot load a model config from 'nobody/no-such-model'" in caplog.text
    # The fix is one a user outside this repo can act on: a Hub id that exists, or a local folder.
    assert "--model_name_or_path timm/resnet50.a1_in1k" in caplog.text and "../shared" not in caplog.text


def test_default_recipe_trains_through_the_product_and_records_itself(tmp_path, ham_dir_ro, tiny_backbone):
    """`ham-hf train configs/default-model.json` (smoke-sized) runs with no study script and writes recipe.json."""
    from ham_hf.defaults import DEFAULT_RECIPE

    out = tmp_path / "default-recipe"
    overrides = ["--data", str(ham_dir_ro), "--model_name_or_path", str(tiny_backbone), "--output_dir", str(out),
                 "--max_steps", "4", "--image_size", "32", "--per_device_train_batch_size", "8",
                 "--per_device_eval_batch_size", "32", "--eval_strategy", "steps", "--save_strategy", "steps",
                 "--eval_steps", "2", "--save_steps", "2", "--calibrate", "false", "--disable_tqdm", "true"]
    assert main(["train", str(DEFAULT_RECIPE), *overrides]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    expected = {**json.loads(DEFAULT_RECIPE.read_text()), "max_steps": 4, "image_size": 32,
                "per_device_train_batch_size": 8, "per_device_eval_batch_size": 32, "eval_strategy": "steps",
                "save_strategy": "steps", "eval_steps": 2, "save_steps": 2, "calibrate": False}
    assert recipe == expected  # where the run read and wrote is not part of its recipe
    head = json.loads((out / "results.json").read_text())["head"]
    assert head["logit_adjustment_tau"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # tuned on validation, as the recipe says
    # The recorded recipe is itself a config that `ham-hf train` takes.
    assert main(["train", str(out / "recipe.json"), *overrides[:4], "--output_dir", str(tmp_path / "again"),
                 *overrides[6:]]) == 0
    assert json.loads((tmp_path / "again" / "recipe.json").read_text()) == recipe


def test_the_private_trainer_hooks_it_overrides_still_have_their_signatures():
    """ham_hf/train overrides or calls four private Trainer methods: a transformers release that changes one of
    them fails here, by name, instead of mis-training quietly."""
    import inspect

    from transformers import Trainer

    expected = {"_save_checkpoint": ["self", "model", "trial"], "_get_train_sampler": ["self", "train_dataset"],
                "_hp_search_setup": ["self", "trial"], "_get_output_dir": ["self", "trial"]}
    for name, parameters in expected.items():
        assert list(inspect.signature(getattr(Trainer, name)).parameters) == parameters, name
