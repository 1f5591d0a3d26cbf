"""Recipe pieces: mixed precision on the CPU, logit adjustment folded into the head, tau chosen on validation."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import balanced_accuracy_score

from ham_hf import head, metrics, precision, train
from ham_hf.cli import main
from ham_hf.errors import UserError
from ham_hf.finish import calibration

from conftest import train_argv

NATIVE_CPU_BF16 = precision.cpu_bf16_native() and not torch.cuda.is_available()


# ----------------------------------------------------------------------------- precision


@pytest.mark.skipif(not NATIVE_CPU_BF16, reason="this CPU has no native bf16 (AVX512-BF16 / AMX), or a GPU is present")
def test_cpu_bf16_is_automatic_and_saved_weights_stay_float32(tmp_path, ham_dir_ro, tiny_backbone):
    out = tmp_path / "bf16"
    assert main(train_argv(ham_dir_ro, tiny_backbone, out)) == 0
    training = json.loads((out / "results.json").read_text())["training"]
    assert training["precision"] == "bf16" and training["device"].startswith("CPU")
    assert all(t.dtype == torch.float32 for t in load_file(str(out / "model.safetensors")).values()
               if t.is_floating_point())
    assert f"on {training['device']} (bf16)" in (out / "README.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rules; a GPU decides for itself")
def test_precision_choice_on_the_cpu(monkeypatch):
    auto = train.resolve_precision(train.HamTrainingArguments(output_dir="/tmp/x"))
    assert auto.bf16 is precision.cpu_bf16_native()
    assert train.resolve_precision(train.HamTrainingArguments(output_dir="/tmp/x", bf16=False)).bf16 is False
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    assert train.resolve_precision(train.HamTrainingArguments(output_dir="/tmp/x")).bf16 is False
    with pytest.raises(UserError, match="no native bf16.*--bf16 false"):
        train.HamTrainingArguments(output_dir="/tmp/x", bf16=True)


def test_the_cpu_is_named_with_its_family_and_model():
    # Two /proc/cpuinfo blocks (a virtual machine that shows only "AMD EPYC"): the first one names the CPU.
    amd = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
           "model name\t: AMD EPYC\nflags\t\t: fpu avx512f\n\nprocessor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\n")
    assert precision.cpu_name(amd) == "AMD EPYC, family 26 model 2"
    intel = "model name\t: Intel(R) Xeon(R)  Platinum 8481C CPU @ 2.70GHz\ncpu family\t: 6\nmodel\t\t: 143\n"
    assert precision.cpu_name(intel) == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz, family 6 model 143"
    assert precision.cpu_name("")  # no /proc/cpuinfo (not Linux): the platform's name, never empty
    if not torch.cuda.is_available():
        assert precision.device_name().startswith(f"CPU ({precision.cpu_name()}; ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_bf16_true_on_a_cpu_without_it_is_one_message(tmp_path, ham_dir_ro, tiny_backbone, monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    assert main(train_argv(ham_dir_ro, tiny_backbone, tmp_path / "o", "--bf16", "true")) == 2
    assert "this CPU has no native bf16" in caplog.text and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- logit adjustment


def _final_weights(tmp_path, ham_dir_ro, tiny_backbone, name, *extra):
    """Train without checkpoint selection (so runs differ only by `extra`) and return (weights, results)."""
    out = tmp_path / name
    argv = train_argv(ham_dir_ro, tiny_backbone, out, "--class_weighting", "none", "--bf16", "false",
                      "--calibrate", "false",
                      "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false", *extra)
    assert main(argv) == 0
    return load_file(str(out / "model.safetensors")), json.loads((out / "results.json").read_text())["head"]


def test_logit_adjustment_folds_minus_tau_log_prior_into_the_head_bias(tmp_path, ham_dir_ro, tiny_backbone):
    from ham_hf import data

    plain, _ = _final_weights(tmp_path, ham_dir_ro, tiny_backbone, "plain")
    adjusted, results = _final_weights(tmp_path, ham_dir_ro, tiny_backbone, "adjusted", "--logit_adjustment_tau", "0.5")
    assert results["logit_adjustment_tau"] == 0.5
    train_labels = torch.tensor(data.load_splits(str(ham_dir_ro))["train"]["label"])
    expected = -0.5 * head.log_prior(train_labels)
    # Training is the same (plain cross-entropy); only the saved decision rule moved.
    assert torch.allclose(adjusted["fc.bias"] - plain["fc.bias"], expected, atol=1e-5)
    assert all(torch.equal(adjusted[k], plain[k]) for k in plain if k != "fc.bias")
    assert expected[0] > expected[5]  # akiec (rare) is pushed up, nv (common) down


def test_choose_tau_recovers_a_prior_shifted_decision_and_prefers_small_tau_on_ties():
    log_prior = np.log([0.1, 0.1, 0.1, 0.05, 0.05, 0.55, 0.05])
    labels = np.arange(7).repeat(10)
    signal = np.eye(7)[labels]
    # Raw logits = a weak signal + the log prior: the majority class wins everything until tau = 1.
    tau, table = calibration.choose_tau(0.1 * signal + log_prior, labels, log_prior, max_ece=1)
    assert tau == 1.0 and table[1.0]["balanced_accuracy"] == 1.0
    assert table[0.0]["balanced_accuracy"] == pytest.approx(1 / 7)
    # A strong signal: every tau is perfect, and the smallest (most accurate on the majority) wins.
    tau, table = calibration.choose_tau(20 * signal + log_prior, labels, log_prior, max_ece=1)
    assert tau == 0.0 and {r["balanced_accuracy"] for r in table.values()} == {1.0}


def _prior_biased_logits(seed=1):
    """Validation-like logits of a model that learnt the (imbalanced) prior: (raw, labels, log prior)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(7), [30, 40, 60, 10, 50, 300, 12])
    prior = np.log(np.bincount(labels) / len(labels))
    return 2.0 * np.eye(7)[labels] + rng.normal(0, 1.0, (len(labels), 7)) + prior, labels, prior


def test_choose_tau_takes_the_best_balanced_accuracy_among_the_calibrated_taus(caplog):
    raw, labels, prior = _prior_biased_logits()
    free, table = calibration.choose_tau(raw, labels, prior, max_ece=1)
    assert free == max(table, key=lambda t: table[t]["balanced_accuracy"])
    # A goal the freely chosen tau misses but others meet: the best of those others is chosen.
    goal = max(r["ece"] for r in table.values() if r["ece"] < table[free]["ece"])
    tau, _ = calibration.choose_tau(raw, labels, prior, max_ece=goal)
    calibrated = [t for t in table if table[t]["ece"] <= goal]
    assert tau != free and tau == max(calibrated, key=lambda t: table[t]["balanced_accuracy"])
    for t, r in table.items():  # each row: the adjusted decision, calibrated by its own temperature
        assert r["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, (raw - t * prior).argmax(1)))
        calibrated_probs = metrics.softmax((raw - t * prior) / r["temperature"])
        assert r["ece"] == pytest.approx(metrics.compute(calibrated_probs, labels)["ece"])
    # A goal no tau meets: balanced accuracy alone decides, and the log says so.
    assert calibration.choose_tau(raw, labels, prior, max_ece=1e-9)[0] == free
    assert "choosing by balanced accuracy alone" in caplog.text






def test_tuned_logit_adjustment_records_a_grid_tau(tmp_path, ham_dir_ro, tiny_backbone):
    out = tmp_path / "tuned"
    argv = train_argv(ham_dir_ro, tiny_backbone, out, "--class_weighting", "none", "--logit_adjustment_tau", "1",
                      "--tune_logit_adjustment", "true")
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())["head"]
    assert results["logit_adjustment_tau"] in calibration.TAU_GRID
    assert results["logit_adjustment_max_ece"] == calibration.MAX_ECE


def _validation_logits(folder, dsd) -> np.ndarray:
    """A saved model's validation logits, float64."""
    from ham_hf import model as model_lib
    from ham_hf.finish.evaluation import embed
    from ham_hf.transforms import cache_split

    model = model_lib.load_model(str(folder)).float().eval()
    dc = model_lib.data_config(model)
    with torch.inference_mode():
        return embed(model, cache_split(dsd["validation"], dc), dc)[1].astype(np.float64)


def test_calibrate_retunes_tau_and_refolds_the_head(tmp_path, ham_dir_ro, tiny_backbone):
    from ham_hf import data

    src, out = tmp_path / "adjusted", tmp_path / "retuned"
    assert main(train_argv(ham_dir_ro, tiny_backbone, src, "--class_weighting", "none", "--logit_adjustment_tau", "0.5",
                           "--calibrate", "false")) == 0
    assert main(["calibrate", "--model", str(src), "--data", str(ham_dir_ro), "--output", str(out),
                 "--retune_logit_adjustment", "true", "--logit_adjustment_max_ece", "1"]) == 0
    results = json.loads((out / "results.json").read_text())["head"]
    tau, temperature = results["logit_adjustment_tau"], results["temperature"]
    dsd = data.load_splits(str(ham_dir_ro))
    prior = head.log_prior(dsd["train"]["label"]).double().numpy()
    raw = _validation_logits(src, dsd) + 0.5 * prior  # the head held raw - 0.5 log prior, T 1
    assert tau == calibration.choose_tau(raw, np.array(dsd["validation"]["label"]), prior, max_ece=1)[0]
    # The saved head now gives (raw - tau log prior) / T: what the pipeline and the app read.
    assert np.allclose(_validation_logits(out, dsd), (raw - tau * prior) / temperature, rtol=1e-4, atol=1e-4)
    assert f"**tau = {tau:g}**" in (out / "README.md").read_text()
    from huggingface_hub import ModelCard  # the Hub's results follow the re-decided head

    test = json.loads((out / "test_metrics.json").read_text())
    listed = {r.metric_type: r.metric_value for r in ModelCard.load(out / "README.md").data.eval_results}
    assert listed["balanced_accuracy"] == round(test["balanced_accuracy"], 4)
    assert listed["accuracy"] == round(test["accuracy"], 4)


def test_retuning_needs_a_logit_adjusted_model(tiny_model, ham_dir_ro, tmp_path, caplog):
    out = tmp_path / "o"
    assert main(["calibrate", "--model", str(tiny_model), "--data", str(ham_dir_ro), "--output", str(out),
                 "--retune_logit_adjustment", "true"]) == 2
    assert "not trained with logit adjustment" in caplog.text and not out.exists()
    assert main(["calibrate", "--model", str(tiny_model), "--data", str(ham_dir_ro), "--int8_only", "true",
                 "--retune_logit_adjustment", "true"]) == 2
    assert "keep the weights: drop --retune_logit_adjustment" in caplog.text
    assert main(["calibrate", "--model", str(tiny_model), "--data", str(ham_dir_ro),
                 "--logit_adjustment_max_ece", "0"]) == 2
    assert "must be in (0, 1]" in caplog.text


def test_negative_tau_is_refused(tmp_path, ham_dir_ro, tiny_backbone, caplog):
    argv = train_argv(ham_dir_ro, tiny_backbone, tmp_path / "o", "--logit_adjustment_tau", "-1")
    assert main(argv) == 2 and "--logit_adjustment_tau must be >= 0" in caplog.text
    argv = train_argv(ham_dir_ro, tiny_backbone, tmp_path / "o", "--logit_adjustment_max_ece", "1.5")
    assert main(argv) == 2 and "--logit_adjustment_max_ece must be in (0, 1]" in caplog.text


# ----------------------------------------------------------------------------- ham-hf tune


def test_tune_writes_trials_and_a_config_that_train_reads(tmp_path, ham_dir_ro, tiny_backbone):
    import csv

    from ham_hf import data
    from ham_hf.cli import parse
    from ham_hf.train import tune
    from ham_hf.transforms import AugmentArguments

    out = tmp_path / "tune"
    argv = ["tune", "--data", str(ham_dir_ro), "--model_name_or_path", str(tiny_backbone), "--output_dir", str(out),
            "--n_trials", "2", "--image_size", "40", "--per_device_train_batch_size", "8", "--num_train_epochs", "1",
            "--bf16", "false", "--params", "learning_rate,imbalance"]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 2 and all(r["state"] == "COMPLETE" for r in rows)
    assert {"params_learning_rate", "params_imbalance", "validation_balanced_accuracy"} <= set(rows[0])
    best_row = max(rows, key=lambda r: float(r["validation_balanced_accuracy"]))
    config = json.loads((out / "best_config.json").read_text())
    assert config["learning_rate"] == pytest.approx(float(best_row["params_learning_rate"]))
    assert config["class_weighting"] == tune.IMBALANCE[best_row["params_imbalance"]]["class_weighting"]
    assert 1e-4 <= config["learning_rate"] <= 3e-3
    # `ham-hf train best_config.json` takes it as its configuration.
    *_, recipe, _, _, args = parse([str(out / "best_config.json"), "--output_dir", str(tmp_path / "t")],
                                   train.ModelArguments, train.DataArguments, train.RecipeArguments,
                                   AugmentArguments, data.SplitArguments, train.HamTrainingArguments)
    assert args.learning_rate == pytest.approx(config["learning_rate"])
    assert recipe.class_weighting == config["class_weighting"]


def test_trial_options_reach_the_recipe_and_the_arguments(tmp_path, ham_dir_ro, tiny_backbone):
    from ham_hf import data
    from ham_hf import model as model_lib
    from ham_hf.train import tune
    from ham_hf.transforms import Preprocess

    model = model_lib.load_model(str(tiny_backbone))
    dc = model_lib.data_config(model)
    _, cached = train.load_cached_splits(train.DataArguments(data=str(ham_dir_ro)), data.SplitArguments(), dc)
    trainer = tune.TuneTrainer(model_init=lambda trial=None: model_lib.load_model(str(tiny_backbone)),
                               args=train.HamTrainingArguments(output_dir=str(tmp_path), bf16=False),
                               train_dataset=cached["train"], eval_dataset=cached["validation"],
                               preprocess=Preprocess(dc), recipe=train.RecipeArguments())
    trainer.hp_search_backend = "optuna"
    trainer.hp_space = lambda trial: {"learning_rate": 5e-4, "label_smoothing": 0.15, "imbalance": "logit-adjusted"}
    trainer._hp_search_setup(trial=types.SimpleNamespace(params={}))
    assert trainer.args.learning_rate == 5e-4 and trainer.recipe.label_smoothing == 0.15
    assert trainer.recipe.class_weighting == "none" and trainer.loss_weights is None
    assert torch.allclose(trainer.logit_offset, -0.75 * head.log_prior(cached["train"].labels))


def test_tune_refuses_unknown_parameters_and_a_budget_below_one_trial(tmp_path, ham_dir_ro, tiny_backbone, caplog):
    base = ["tune", "--data", str(ham_dir_ro), "--model_name_or_path", str(tiny_backbone), "--output_dir",
            str(tmp_path / "t"), "--image_size", "40", "--bf16", "false"]
    assert main([*base, "--params", "learning_rate,dropout"]) == 2
    assert "unknown tuning parameter(s) dropout; choose from learning_rate, backbone_lr_multiplier" in caplog.text
    assert main([*base, "--timeout_s", "0.001"]) == 2
    assert "one trial needs about" in caplog.text and "raise --timeout_s" in caplog.text
    assert not (tmp_path / "t" / "trials.csv").exists()


def test_json_config_passes_dict_options_and_refuses_unknown_ones(tmp_path):
    from ham_hf import data
    from ham_hf.cli import parse
    from ham_hf.transforms import AugmentArguments

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr_scheduler_kwargs": {"num_cycles": 2}, "num_train_epochs": 3,
                                "output_dir": str(tmp_path / "from-file")}))
    *_, args = parse([str(path), "--num_train_epochs", "4"], train.ModelArguments, train.DataArguments,
                     train.RecipeArguments, AugmentArguments, data.SplitArguments, train.HamTrainingArguments)
    assert args.lr_scheduler_kwargs == {"num_cycles": 2} and args.num_train_epochs == 4
    assert args.output_dir == str(tmp_path / "from-file")  # a required option the file gives
    path.write_text(json.dumps({"num_train_epoch": 3}))
    with pytest.raises(UserError, match="unknown option.*num_train_epoch"):
        parse([str(path)], train.HamTrainingArguments)


