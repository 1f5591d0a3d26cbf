"""Fine-tuned models as starting points: soups (unfolded heads averaged, the greedy choice on validation,
what cannot be averaged), training on from a fine-tuned model, and distillation from fine-tuned teachers."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from ham_hf import data, head, hub, results, train
from ham_hf import model as model_lib
from ham_hf.cli import main
from ham_hf.errors import UserError
from ham_hf.finish import calibration
from ham_hf.train import soup
from ham_hf.transforms import AugmentArguments

from conftest import train_argv


@pytest.fixture(scope="module")
def adjusted_tiny_model(tmp_path_factory, ham_dir_ro, tiny_backbone):
    """A tiny model with logit adjustment (tau 0.5) and a folded temperature: both must be unfolded."""
    out = tmp_path_factory.mktemp("adjusted_tiny_model")
    assert main(train_argv(ham_dir_ro, tiny_backbone, out, "--class_weighting", "none",
                           "--logit_adjustment_tau", "0.5", "--learning_rate", "5e-3")) == 0
    return out


def _prior(ham_dir):
    """The log train prior of the synthetic data."""
    return head.log_prior(data.load_splits(str(ham_dir))["train"]["label"])


def test_greedy_soup_keeps_what_helps_and_leaves_out_what_hurts():
    states = {"a": {"w": torch.tensor([1.25])}, "b": {"w": torch.tensor([0.75])}, "c": {"w": torch.tensor([3.0])}}

    def scorer(state):  # balanced accuracy best at w = 1, AUC best at w = 1.25
        w = float(state["w"])
        return {"balanced_accuracy": -abs(w - 1.0), "roc_auc_macro": -abs(w - 1.25) if w < 2 else -9, "tau": 0.25}

    kept, state, tau, steps = soup.greedy_soup(states, scorer)
    # + b: balanced accuracy 0 >= -0.25 but AUC -0.25 < 0, left out; + c hurts both.
    assert kept == ["a"] and tau == 0.25 and [s["step"] for s in steps] == ["ingredient"] * 3 + ["reject", "reject"]

    def bal_only(state):  # AUC flat: balanced accuracy alone decides
        return {**scorer(state), "roc_auc_macro": 0.0}

    kept, state, _, steps = soup.greedy_soup(states, bal_only)
    assert kept == ["a", "b"] and torch.allclose(state["w"], torch.tensor([1.0]))
    assert [s["step"] for s in steps] == ["ingredient"] * 3 + ["add", "reject"]
    kept, state, _, steps = soup.greedy_soup(states, bal_only, greedy=False)
    assert sorted(kept) == ["a", "b", "c"] and torch.allclose(state["w"], torch.tensor([5.0 / 3]))
    assert steps[-1]["step"] == "uniform soup" and set(steps[-1]) >= {"balanced_accuracy", "roc_auc_macro", "tau"}


def test_greedy_soup_scores_every_state_as_prepared():
    states = {"a": {"w": torch.tensor([1.0])}, "b": {"w": torch.tensor([3.0])}}
    seen = []

    def scorer(state):  # records what it was given
        seen.append(float(state["w"]))
        return {"balanced_accuracy": float(state["w"]), "roc_auc_macro": 0.0, "tau": 0.5}

    kept, state, _, _ = soup.greedy_soup(states, scorer, prepare=lambda s: {"w": s["w"] + 10})
    # Ingredients 11 and 13, then b first (13) and the prepared average (2 + 10 = 12) is rejected.
    assert seen == [11.0, 13.0, 12.0] and kept == ["b"] and float(state["w"]) == 13.0


def test_batchnorm_is_re_estimated_from_the_eval_preprocessed_sample(ham_dir_ro, tiny_model):
    from ham_hf.transforms import Preprocess, cache_split

    model = model_lib.load_model(str(tiny_model)).float().eval()
    dc = model_lib.data_config(model)
    images = cache_split(data.load_splits(str(ham_dir_ro))["train"], dc)
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    inputs = []
    hook = norm.register_forward_hook(lambda module, args, out: inputs.append(args[0].detach()))
    n = len(images) - 1  # all but one, in one batch: the statistics are those of exactly these images
    soup.reestimate_batchnorm(model, images, dc, n, bf16=False, batch_size=n)
    hook.remove()
    assert len(inputs) == 1 and not model.training and norm.momentum == 0.1  # eval mode, momentum restored
    channels = inputs[0].transpose(0, 1).flatten(1)
    assert torch.allclose(norm.running_mean, channels.mean(1), atol=1e-5)
    assert torch.allclose(norm.running_var, channels.var(1, unbiased=True), atol=1e-4)
    # The batch was the eval preprocessing of the seeded sample (the first norm's input needs no statistics).
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]
    hook = norm.register_forward_hook(lambda module, args, out: inputs.append(args[0].detach()))
    with torch.no_grad():
        model(pixel_values=Preprocess(dc)(images.images[pick], train=False))
    hook.remove()
    assert torch.allclose(inputs[1], inputs[0], atol=1e-5)


def test_average_keeps_integer_buffers_and_refuses_other_shapes():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([2.0, 4.0]), "n": torch.tensor(5)}
    avg = soup.average([a, b])
    assert torch.equal(avg["w"], torch.tensor([1.0, 3.0])) and int(avg["n"]) == 3
    with pytest.raises(soup.ModelError, match="not one architecture"):
        soup.average([a, {"w": torch.zeros(3), "n": torch.tensor(1)}])


def test_soup_averages_the_unfolded_heads_and_refolds_its_own(tmp_path, ham_dir_ro, calibrated_tiny_model,
                                                               adjusted_tiny_model):
    prior = _prior(ham_dir_ro)
    ingredients = [calibrated_tiny_model, adjusted_tiny_model]
    expected = soup.average([head.unfolded_state(p, prior) for p in ingredients])
    raw_head = torch.cat([expected["timm_model.fc.weight"], expected["timm_model.fc.bias"][:, None]], 1)
    out = tmp_path / "soup"
    assert main(["soup", "--models", *map(str, ingredients), "--data", str(ham_dir_ro), "--output_dir", str(out),
                 "--greedy", "false", "--logit_adjustment_max_ece", "1"]) == 0
    record = results.load(out)
    assert record["training"]["ingredients"] and record["training"]["greedy"] is False
    card = (out / "README.md").read_text()
    assert all(f"- averaged `{p}` (base model `" in card for p in ingredients)  # how each ingredient was made
    tau, temperature = record["head"]["logit_adjustment_tau"], record["head"]["temperature"]
    assert tau in calibration.TAU_GRID and temperature > 0
    # Unfolded by its own record, the soup is exactly the average of the unfolded ingredients.
    got = head.unfolded_state(out, prior)
    for key, value in expected.items():
        if value.is_floating_point():
            assert torch.allclose(got[key], value, atol=1e-5), key
    # Its folded head is (raw - tau log prior) / T, as a trained model's.
    folded = torch.cat([raw_head[:, :-1], (raw_head[:, -1] - tau * prior)[:, None]], 1)
    from safetensors.torch import load_file

    saved = load_file(out / "model.safetensors")
    saved_head = torch.cat([saved["fc.weight"], saved["fc.bias"][:, None]], 1)  # timm names on disk
    assert torch.allclose(saved_head, folded / temperature, atol=1e-5)
    # A complete model folder: reports (test scored once), guard, the steps, a card that says what it is.
    for name in ("config.json", "split.csv", "soup.csv", "validation_metrics.json", "test_metrics.json",
                 "ood_guard.safetensors"):
        assert (out / name).is_file(), name
    assert "soup.csv" in hub.model_files(out)  # pushed and bundled with the weights
    card = (out / "README.md").read_text()
    assert "uniform soup" in card and "ham-hf soup --models" in card and "Temperature scaling" in card
    with (out / "soup.csv").open() as fh:
        assert [r["step"] for r in csv.DictReader(fh)] == ["ingredient", "ingredient", "uniform soup"]


def test_soup_of_a_model_with_its_copy_is_that_model(tmp_path, ham_dir_ro, adjusted_tiny_model):
    copy = tmp_path / "copy"
    shutil.copytree(adjusted_tiny_model, copy)
    out = tmp_path / "soup"
    assert main(["soup", "--models", str(adjusted_tiny_model), str(copy), "--data", str(ham_dir_ro),
                 "--output_dir", str(out)]) == 0
    prior = _prior(ham_dir_ro)
    before, after = head.unfolded_state(adjusted_tiny_model, prior), head.unfolded_state(out, prior)
    assert all(torch.allclose(after[k], v, atol=1e-5) for k, v in before.items() if v.is_floating_point())
    assert results.load(out)["training"]["ingredients"] == [str(adjusted_tiny_model), str(copy)]


def test_soup_with_batchnorm_re_estimated_saves_the_statistics_it_was_scored_with(tmp_path, ham_dir_ro,
                                                                                  adjusted_tiny_model):
    copy = tmp_path / "copy"
    shutil.copytree(adjusted_tiny_model, copy)
    out = tmp_path / "soup"
    assert main(["soup", "--models", str(adjusted_tiny_model), str(copy), "--data", str(ham_dir_ro),
                 "--output_dir", str(out), "--bn_images", "16", "--bf16", "false"]) == 0
    assert results.load(out)["training"]["bn_images"] == 16 and "--bn_images 16" in (out / "README.md").read_text()
    # The model itself with its statistics re-estimated on the same 16 images, nothing else changed.
    from ham_hf.transforms import cache_split

    model = model_lib.load_model(str(adjusted_tiny_model)).float().eval()
    dc = model_lib.data_config(model)
    soup.reestimate_batchnorm(model, cache_split(data.load_splits(str(ham_dir_ro))["train"], dc), dc, 16, bf16=False)
    prior = _prior(ham_dir_ro)
    before, after = head.unfolded_state(adjusted_tiny_model, prior), head.unfolded_state(out, prior)
    stats = {k for k in before if k.endswith(("running_mean", "running_var"))}
    assert stats and all(torch.allclose(after[k], v, atol=1e-5) for k, v in before.items()
                         if v.is_floating_point() and k not in stats)
    own = model.state_dict()
    assert all(torch.allclose(after[k], own[k], atol=1e-5) for k in stats)
    assert not all(torch.allclose(before[k], own[k], atol=1e-3) for k in stats)  # they did change


def test_soup_refuses_what_cannot_be_averaged(tmp_path, ham_dir_ro, tiny_model, tiny_backbone, caplog):
    def run(*models, out=tmp_path / "soup"):
        return main(["soup", "--models", *map(str, models), "--data", str(ham_dir_ro), "--output_dir", str(out)])

    assert run(tiny_model) == 2 and "two or more different models" in caplog.text
    assert run(tiny_model, tiny_model) == 2
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    assert run(tiny_model, other, out=other) == 2 and "is one of the ingredients" in caplog.text
    assert run(tiny_model, tiny_backbone) == 2 and "is not a HAM10000 model folder" in caplog.text
    config = json.loads((other / "config.json").read_text())
    resized = {**config, "pretrained_cfg": {**config["pretrained_cfg"], "input_size": [3, 48, 48]}}
    (other / "config.json").write_text(json.dumps(resized))
    soup.check_ingredients([tiny_model, other])  # allowed (same weights' shapes), but said
    assert "trained at another resolution" in caplog.text
    (other / "config.json").write_text(json.dumps({**config, "architecture": "resnet18"}))
    assert run(tiny_model, other) == 2 and "a soup averages models of one architecture" in caplog.text
    (other / "config.json").write_text(json.dumps(config))
    rows = list(csv.DictReader((other / "split.csv").open()))
    moved = next(r for r in rows if r["split"] == "validation")
    moved["split"] = "train"
    with (other / "split.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert run(tiny_model, other) == 2 and "validated on different splits" in caplog.text
    assert main(["soup", "--models", str(tiny_model), str(other), "--data", str(ham_dir_ro), "--output_dir",
                 str(tmp_path / "y"), "--logit_adjustment_max_ece", "0"]) == 2
    assert main(["soup", "--models", str(tiny_model), str(other), "--data", str(ham_dir_ro), "--output_dir",
                 str(tmp_path / "y"), "--bn_images", "-1"]) == 2 and "--bn_images must be >= 0" in caplog.text
    taken = tmp_path / "taken"
    (taken / "keep.txt").parent.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert run(tiny_model, other, out=taken) == 2 and "--overwrite true" in caplog.text
    assert (taken / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "soup").exists()


def test_training_continues_from_the_bare_logits_of_a_fine_tuned_model(tmp_path, ham_dir_ro, adjusted_tiny_model):
    out = tmp_path / "continued"
    # Learning rate 0 and the backbone frozen throughout (its norms in eval mode): nothing can move, so
    # the run must hand back the bare model it started from, refolded with its own tau and temperature.
    assert main(train_argv(ham_dir_ro, adjusted_tiny_model, out, "--class_weighting", "none", "--logit_adjustment_tau",
                           "0.25", "--learning_rate", "0", "--freeze_backbone_epochs", "2")) == 0
    assert results.load(out)["head"]["logit_adjustment_tau"] == 0.25
    prior = _prior(ham_dir_ro)
    before, after = head.unfolded_state(adjusted_tiny_model, prior), head.unfolded_state(out, prior)
    assert all(torch.allclose(after[k], v, atol=1e-5) for k, v in before.items() if v.is_floating_point())
    # Its card traces it back: the folder it started from, with that folder's base model and command.
    card = (out / "README.md").read_text()
    command = results.load(adjusted_tiny_model)["training"]["command"]
    assert f"- started from `{adjusted_tiny_model}`" in card and f"`{command}`" in card


def test_lineage_nests_each_ancestor_s_own_lineage(tmp_path, adjusted_tiny_model):
    from ham_hf.hub import card

    grand, parent = tmp_path / "grand", tmp_path / "parent"
    for folder, base, cmd, device in ((grand, "imagenet", "ham-hf train --first", "NVIDIA H200"),
                                      (parent, str(grand), "ham-hf train --second", "CPU (2 threads)")):
        results.update(folder, training={"base_model": base, "command": cmd, "device": device,
                                         "lineage": card.lineage([("started from", base)])})
    lineage = card.lineage([("started from", str(parent)), ("taught by", str(adjusted_tiny_model))])
    lines = card.lineage_lines(lineage)
    assert lines[0] == f"- started from `{parent}` (base model `{grand}`, CPU (2 threads)): `ham-hf train --second`"
    assert lines[1] == f"  - started from `{grand}` (base model `imagenet`, NVIDIA H200): `ham-hf train --first`"
    assert lines[2].startswith(f"- taught by `{adjusted_tiny_model}`")
    # A bare backbone (no record this project wrote) or a Hub id leaves no trace to follow.
    (tmp_path / "backbone").mkdir()
    (tmp_path / "backbone" / "README.md").write_text("Base model: the ImageNet ResNet-50 of `../w` (Keras).\n")
    assert card.lineage([("started from", str(tmp_path / "backbone")), ("taught by", "timm/resnet50.a1_in1k")]) == []
    assert card.base_model_of(tmp_path / "backbone") == "unknown"  # a card's prose is never read back
    assert card.base_model_of(parent) == str(grand)


def test_training_on_refuses_a_split_that_tests_on_the_model_s_training_images(tmp_path, ham_dir_ro,
                                                                               adjusted_tiny_model, caplog):
    argv = train_argv(ham_dir_ro, adjusted_tiny_model, tmp_path / "o", "--split_seed", "7")
    assert main(argv) == 2 and "were in the training split of" in caplog.text and "--split_seed" in caplog.text


# ----------------------------------------------------------------------------- distillation


def test_distillation_loss_is_zero_on_agreement_and_pulls_the_student_to_the_teacher():
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    assert train.distillation_loss(teacher + 3.0, teacher, 2.0).abs() < 1e-6  # a shift of the logits is no change
    student = torch.zeros_like(teacher, requires_grad=True)
    loss = train.distillation_loss(student, teacher, 2.0)
    loss.backward()
    assert loss > 0 and torch.equal(student.grad.argmin(1), teacher.argmax(1))  # descent raises the teacher's class
    # T^2 scaling: at a high temperature the gradient keeps the scale of T = 1 (about (p - q) / T x T^2).
    hot = torch.zeros_like(teacher, requires_grad=True)
    train.distillation_loss(hot, teacher * 8, 8.0).backward()
    assert hot.grad.abs().sum() > 0.5 * student.grad.abs().sum()


def test_teachers_answer_the_mean_of_their_log_probabilities(adjusted_tiny_model):
    model = model_lib.load_model(str(adjusted_tiny_model))
    teachers = train.Teachers([model, model_lib.load_model(str(adjusted_tiny_model))])
    x = torch.randn(3, 3, 40, 40)
    alone = torch.log_softmax(model.eval()(pixel_values=x).logits, -1)
    assert torch.allclose(teachers(x), alone, atol=1e-5)
    assert not any(p.requires_grad for p in teachers.parameters()) and not teachers.models[0].training


def test_distilled_training_mixes_the_labels_with_the_teachers(tmp_path, ham_dir_ro, tiny_backbone,
                                                              adjusted_tiny_model):
    out = tmp_path / "student"
    argv = train_argv(ham_dir_ro, tiny_backbone, out, "--class_weighting", "none", "--distill_from",
                      str(adjusted_tiny_model), "--distill_alpha", "0.75", "--distill_temperature", "3",
                      "--calibrate", "false", "--num_train_epochs", "1")
    assert main(argv) == 0
    card = (out / "README.md").read_text()
    assert "distill_from" in card and f"- taught by `{adjusted_tiny_model}`" in card
    # The training loss of one batch is (1 - alpha) CE + alpha KD against the unfolded teacher.
    recipe = train.RecipeArguments(distill_from=[str(adjusted_tiny_model)], distill_alpha=0.75,
                                   distill_temperature=3.0, class_weighting="none")
    model = model_lib.load_model(str(tiny_backbone))
    dc = model_lib.data_config(model)
    dsd, cached = train.load_cached_splits(train.DataArguments(data=str(ham_dir_ro)), data.SplitArguments(), dc)
    teachers = train.load_teachers(recipe.distill_from, dc, dsd, cached)
    args = train.HamTrainingArguments(output_dir=str(tmp_path / "t"), bf16=False, report_to="none")
    trainer = train.build_trainer(model, args, dc, cached, recipe, AugmentArguments(), teachers)
    pixels = trainer.preprocess(cached["train"][0]["pixel_values"][None].repeat(4, 1, 1, 1), train=False)
    labels = cached["train"].labels[:4]
    trainer.preprocess = lambda images, train=False: pixels  # the same pixels reach student and teachers
    trainer.model.train()
    logits = trainer.model(pixel_values=pixels).logits
    expected = (0.25 * torch.nn.functional.cross_entropy(logits, labels)
                + 0.75 * train.distillation_loss(logits, teachers(pixels), 3.0))
    loss = trainer.compute_loss(trainer.model, {"pixel_values": None, "labels": labels})
    assert torch.allclose(loss, expected, atol=1e-5)
    trainer.model.eval()  # evaluation scores the labels alone
    plain = torch.nn.functional.cross_entropy(trainer.model(pixel_values=pixels).logits, labels)
    assert torch.allclose(trainer.compute_loss(trainer.model, {"pixel_values": None, "labels": labels}), plain)
    # The teacher's unfolded logits are its bare ones: tau 0.5 and its temperature undone.
    unfolded = head.unfolded_state(adjusted_tiny_model, _prior(ham_dir_ro))
    fc = teachers.models[0].timm_model.fc
    assert torch.allclose(fc.bias, unfolded["timm_model.fc.bias"], atol=1e-5)


def test_distillation_refuses_bad_teachers_and_settings(tmp_path, ham_dir_ro, tiny_backbone, adjusted_tiny_model,
                                                        caplog):
    def run(*extra):
        return main(train_argv(ham_dir_ro, tiny_backbone, tmp_path / "o", "--num_train_epochs", "1", *extra))

    assert run("--distill_from", str(tmp_path / "missing")) == 2 and "not a fine-tuned HAM10000 model" in caplog.text
    assert run("--distill_from", str(tiny_backbone)) == 2
    assert run("--distill_from", str(adjusted_tiny_model), "--image_size", "48") == 2
    assert "--image_size 40" in caplog.text
    assert run("--distill_from", str(adjusted_tiny_model), "--split_seed", "7") == 2
    assert "were in the training split of" in caplog.text
    with pytest.raises(UserError, match="--distill_alpha must be in"):
        train.RecipeArguments(distill_alpha=0)
    with pytest.raises(UserError, match="--distill_temperature must be > 0"):
        train.RecipeArguments(distill_temperature=0)


