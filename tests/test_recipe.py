"""Recipe pieces: mixed precision on the CPU, logit adjustment folded into the head, tau chosen on validation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ham_hf import train
from ham_hf.cli import main
from ham_hf.errors import UserError
from conftest import train_argv

NATIVE_CPU_BF16 = train.cpu_bf16_native() and not torch.cuda.is_available()


# ----------------------------------------------------------------------------- precision


@pytest.mark.skipif(not NATIVE_CPU_BF16, reason="this CPU has no native bf16 (AVX512-BF16 / AMX), or a GPU is present")
def test_cpu_bf16_is_automatic_and_saved_weights_stay_float32(tmp_path, ham_dir_ro, tiny_backbone):
    out = tmp_path / "bf16"
    assert main(train_argv(ham_dir_ro, tiny_backbone, out)) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert results["precision"] == "bf16" and results["device"].startswith("CPU")
    assert all(t.dtype == torch.float32 for t in load_file(str(out / "model.safetensors")).values()
               if t.is_floating_point())
    assert "| precision | bf16 |" in (out / "README.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rules; a GPU decides for itself")
def test_precision_choice_on_the_cpu(monkeypatch):
    auto = train.resolve_precision(train.HamTrainingArguments(output_dir="/tmp/x"))
    assert auto.bf16 is train.cpu_bf16_native()
    assert train.resolve_precision(train.HamTrainingArguments(output_dir="/tmp/x", bf16=False)).bf16 is False
    monkeypatch.setattr(train, "cpu_bf16_native", lambda: False)
    assert train.resolve_precision(train.HamTrainingArguments(output_dir="/tmp/x")).bf16 is False
    with pytest.raises(UserError, match="no native bf16.*--bf16 false"):
        train.HamTrainingArguments(output_dir="/tmp/x", bf16=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_bf16_true_on_a_cpu_without_it_is_one_message(tmp_path, ham_dir_ro, tiny_backbone, monkeypatch, caplog):
    monkeypatch.setattr(train, "cpu_bf16_native", lambda: False)
    assert main(train_argv(ham_dir_ro, tiny_backbone, tmp_path / "o", "--bf16", "true")) == 2
    assert "this CPU has no native bf16" in caplog.text and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- logit adjustment


def _final_weights(tmp_path, ham_dir_ro, tiny_backbone, name, *extra):
    """Train without checkpoint selection (so runs differ only by `extra`) and return (weights, results)."""
    out = tmp_path / name
    argv = train_argv(ham_dir_ro, tiny_backbone, out, "--class_weighting", "none", "--bf16", "false",
                      "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false", *extra)
    assert main(argv) == 0
    return load_file(str(out / "model.safetensors")), json.loads((out / "all_results.json").read_text())


def test_logit_adjustment_folds_minus_tau_log_prior_into_the_head_bias(tmp_path, ham_dir_ro, tiny_backbone):
    from ham_hf import data

    plain, _ = _final_weights(tmp_path, ham_dir_ro, tiny_backbone, "plain")
    adjusted, results = _final_weights(tmp_path, ham_dir_ro, tiny_backbone, "adjusted", "--logit_adjustment_tau", "0.5")
    assert results["logit_adjustment_tau"] == 0.5
    train_labels = torch.tensor(data.load_splits(str(ham_dir_ro))["train"]["label"])
    expected = -0.5 * train.log_prior(train_labels)
    # Training is the same (plain cross-entropy); only the saved decision rule moved.
    assert torch.allclose(adjusted["fc.bias"] - plain["fc.bias"], expected, atol=1e-5)
    assert all(torch.equal(adjusted[k], plain[k]) for k in plain if k != "fc.bias")
    assert expected[0] > expected[5]  # akiec (rare) is pushed up, nv (common) down


def test_choose_tau_recovers_a_prior_shifted_decision_and_prefers_small_tau_on_ties():
    log_prior = torch.tensor([0.8, 0.15, 0.05]).log()
    labels = torch.arange(3).repeat_interleave(10)
    signal = torch.nn.functional.one_hot(labels, 3).float()
    # Raw logits = a weak signal + the log prior: the majority class wins everything until tau = 1.
    tau, scores = train.choose_tau(0.1 * signal + log_prior, labels, log_prior)
    assert tau == 1.0 and scores[1.0] == 1.0 and scores[0.0] == pytest.approx(1 / 3)
    # A strong signal: every tau is perfect, and the smallest (most accurate on the majority) wins.
    tau, scores = train.choose_tau(20 * signal + log_prior, labels, log_prior)
    assert tau == 0.0 and set(scores.values()) == {1.0}


def test_tuned_logit_adjustment_records_a_grid_tau(tmp_path, ham_dir_ro, tiny_backbone):
    out = tmp_path / "tuned"
    argv = train_argv(ham_dir_ro, tiny_backbone, out, "--class_weighting", "none", "--logit_adjustment_tau", "1",
                      "--tune_logit_adjustment", "true")
    assert main(argv) == 0
    assert json.loads((out / "all_results.json").read_text())["logit_adjustment_tau"] in train.TAU_GRID


def test_negative_tau_is_refused(tmp_path, ham_dir_ro, tiny_backbone, caplog):
    argv = train_argv(ham_dir_ro, tiny_backbone, tmp_path / "o", "--logit_adjustment_tau", "-1")
    assert main(argv) == 2 and "--logit_adjustment_tau must be >= 0" in caplog.text
