"""The training-throughput benchmark runs end to end on a tiny model and reports what the README quotes."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_train_throughput_reports_pipeline_and_bare_step_with_frozen_stages(tmp_path, ham_dir_ro, tiny_backbone,
                                                                           monkeypatch):
    out = tmp_path / "figures.json"
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its neighbour `common`
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--data", str(ham_dir_ro), "--model", str(tiny_backbone),
                                      "--batch-size", "4", "--steps", "1", "--warmup", "1", "--precisions", "fp32",
                                      "--frozen-stages", "1", "--json", str(out)])
    runpy.run_path(str(BENCHMARKS / "train_throughput.py"), run_name="__main__")
    figures = json.loads(out.read_text())
    assert figures["frozen_stages"] == 1 and figures["image_size"] == 40
    assert figures["cpu"]  # every figure names the CPU it ran on
    fp32 = figures["fp32"]
    assert fp32["pipeline_images_per_s"] > 0 and fp32["bare_step_images_per_s"] > 0
    assert fp32["pipeline_share_of_bare"] == pytest.approx(
        fp32["pipeline_images_per_s"] / fp32["bare_step_images_per_s"], abs=0.01)


def test_predict_throughput_reports_the_loop_and_compares_a_split_graph_with_one_session(tmp_path, ham_dir_ro,
                                                                                       tiny_model, monkeypatch):
    from ham_hf.serve.classifier import Classifier, OnnxGraph

    out = tmp_path / "figures.json"
    monkeypatch.setenv("HAM_HF_CACHE", str(tmp_path / "cache"))  # the ONNX export stays in the test's folder
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", ["predict_throughput.py", "--data-dir", str(ham_dir_ro), "--model",
                                      str(tiny_model), "--n", "12", "--batch-size", "4", "--backends", "onnx,torch",
                                      "--compare-split", "--rounds", "1", "--json", str(out)])
    runpy.run_path(str(BENCHMARKS / "predict_throughput.py"), run_name="__main__")
    figures = json.loads(out.read_text())
    assert figures["n"] == 12 and figures["onnx"]["served"] == "onnx" and figures["onnx"]["skipped"] == 0
    assert figures["onnx"]["per_s"] > 0 and figures["torch"]["per_s"] > 0
    # fp32 ONNX and PyTorch run whole: nothing to compare. A split graph (as int8 is served) is compared.
    assert "split_against_whole" not in figures["onnx"] and "split_against_whole" not in figures["torch"]
    clf = Classifier(str(tiny_model), backend="onnx")
    clf._graph = OnnxGraph(clf._graph.path, threads=2)
    part = clf._graph._part
    script = runpy.run_path(str(BENCHMARKS / "predict_throughput.py"))
    files = sorted(Path(ham_dir_ro).glob("HAM10000_images_part_*/*.jpg"))[:8]
    rounds = script["split_against_whole"](clf, files, 4, 2)
    assert len(rounds["split"]) == len(rounds["whole"]) == 2 and min(rounds["split"] + rounds["whole"]) > 0
    assert clf._graph._part is part  # the split is put back
