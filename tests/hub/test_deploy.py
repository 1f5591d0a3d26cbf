"""`ham-hf deploy` at the HfApi boundary (offline), the Trainer's push convention, and the Space run from its files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import SpaceCard

from ham_hf.cli import main
from ham_hf.hub import deploy

SECRET = "hf_secret_token_never_logged"


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """HfApi with every network call recorded; uploaded folders are copied to tmp_path/uploaded/REPO."""
    from huggingface_hub import HfApi

    calls: list[tuple[str, dict]] = []
    monkeypatch.setenv("HF_TOKEN", SECRET)

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        copy = tmp_path / "uploaded" / kw["repo_id"]
        shutil.copytree(kw["folder_path"], copy)
        calls.append(("upload_folder", {**kw, "copy": copy}))

    def create_commit(self, **kw):
        calls.append(("create_commit", {**kw, "files": sorted(op.path_in_repo for op in kw["operations"])}))

    def add_space_variable(self, repo_id, key, value, **kw):
        calls.append(("add_space_variable", {"repo_id": repo_id, "key": key, "value": value}))

    for name, fn in (("create_repo", create_repo), ("upload_folder", upload_folder),
                     ("create_commit", create_commit), ("add_space_variable", add_space_variable)):
        monkeypatch.setattr(HfApi, name, fn)
    return calls


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_deploy_uploads_exactly_the_space_files_with_the_bundled_model(fake_hub, bundled_model, caplog, capsys):
    assert main(["deploy", "--space_id", "me/ham-demo", "--hardware", "cpu-basic"]) == 0
    assert "https://huggingface.co/spaces/me/ham-demo" in capsys.readouterr().out
    (kind, create), (_, upload) = fake_hub
    assert kind == "create_repo" and create["repo_type"] == "space" and create["space_sdk"] == "gradio"
    assert create["space_hardware"] == "cpu-basic" and create["private"] is False
    assert upload["repo_type"] == "space" and upload["repo_id"] == "me/ham-demo"
    files = _files(upload["copy"])
    assert {"app.py", "requirements.txt", "README.md", "ham_hf/__init__.py", "ham_hf/inference.py",
            "ham_hf/evaluate_modules/ham10000_metrics/ham10000_metrics.py",
            "models/ham10000-resnet50/model.safetensors", "models/ham10000-resnet50/ood_guard.safetensors",
            "models/ham10000-resnet50/config.json"} <= files
    assert len([f for f in files if f.startswith("examples/") and f.endswith(".jpg")]) == 7
    assert not [f for f in files if f.startswith(("tests/", "notebooks/", "benchmarks/", "research/", "docs/"))
                or "__pycache__" in f or f.endswith((".pyc", ".pkl", ".bin", ".pt", ".ipynb")) or "checkpoint" in f]
    readme = (upload["copy"] / "README.md").read_text()
    card, project = SpaceCard(readme), SpaceCard(f"---\n{deploy.front_matter()}---\n")
    assert card.data.to_dict() == project.data.to_dict()  # one source for the front matter
    assert card.data.models is None  # the model travels inside: the Space links to no Hub model
    requirements = (upload["copy"] / "requirements.txt").read_text()
    assert "whl/cpu" in requirements and "gradio" in requirements and "optuna" not in requirements
    assert SECRET not in caplog.text


def test_deploy_with_a_hub_model_sets_the_variable(fake_hub):
    assert main(["deploy", "--space_id", "me/ham-demo", "--model", "org/ham10000-resnet50", "--private"]) == 0
    upload = next(kw for name, kw in fake_hub if name == "upload_folder")
    assert not any(f.startswith("models/") for f in _files(upload["copy"]))
    card = SpaceCard((upload["copy"] / "README.md").read_text())
    assert card.data.models == ["org/ham10000-resnet50"]  # the Hub links the Space to the model it serves
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert ("add_space_variable", {"repo_id": "me/ham-demo", "key": "HAM_MODEL", "value": "org/ham10000-resnet50"}) \
        in fake_hub
    assert next(kw for name, kw in fake_hub if name == "create_repo")["private"] is True


def test_deploy_with_a_local_model_pushes_it_first(fake_hub, tiny_model):
    assert main(["deploy", "--space_id", "me/ham-demo", "--model", str(tiny_model)]) == 0
    order = [(name, kw["repo_id"]) for name, kw in fake_hub]
    assert order[:2] == [("create_repo", "me/ham-demo-model"), ("create_commit", "me/ham-demo-model")]
    assert ("add_space_variable", "me/ham-demo") in order
    variable = next(kw for name, kw in fake_hub if name == "add_space_variable")
    assert variable["value"] == "me/ham-demo-model"


@pytest.mark.parametrize("argv, message", [
    (["--space_id", "ham-demo"], "is not a Hub repo id: give ORG/NAME"),
    (["--space_id", "me/x/y"], "is not a Hub repo id"),
    (["--space_id", "me/x", "--hardware", "gpu-huge"], "is not a Space hardware; choose one of cpu-basic"),
    (["--space_id", "me/x", "--model", "not a model"], "neither a model folder nor a Hub model id"),
])
def test_bad_deploy_input_is_one_message_and_uploads_nothing(fake_hub, caplog, argv, message):
    assert main(["deploy", *argv]) == 2
    assert message in caplog.text and fake_hub == []


def test_deploy_refuses_a_backbone_folder_and_a_missing_token(fake_hub, tiny_backbone, monkeypatch, caplog):
    assert main(["deploy", "--space_id", "me/x", "--model", str(tiny_backbone)]) == 2
    assert "is not a HAM10000 classifier" in caplog.text and fake_hub == []
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert main(["deploy", "--space_id", "me/x", "--model", "org/m"]) == 2
    assert "no Hugging Face token" in caplog.text and fake_hub == []


def test_train_push_to_hub_without_an_id_uses_the_output_dir_name(tmp_path, ham_dir_ro, tiny_backbone, monkeypatch):
    from ham_hf import hub

    from conftest import train_argv

    pushed = []
    monkeypatch.setattr(hub, "push_model", lambda folder, repo_id, **kw: pushed.append((Path(folder), repo_id)))
    out = tmp_path / "my-ham-run"
    assert main(train_argv(ham_dir_ro, tiny_backbone, out, "--push_to_hub", "true", "--calibrate", "false",
                           "--num_train_epochs", "1")) == 0
    assert pushed == [(out, "my-ham-run")]


@pytest.mark.slow
def test_the_space_runs_from_its_uploaded_files_alone(fake_hub, bundled_model, real_images, tmp_path):
    """What the Space would run: a fresh Python in the uploaded folder (its own ham_hf) answers a real image."""
    assert main(["deploy", "--space_id", "me/ham-demo"]) == 0
    space = next(kw for name, kw in fake_hub if name == "upload_folder")["copy"]
    script = (
        "import sys, ham_hf, app\n"
        "assert ham_hf.__file__.startswith(sys.argv[1]), ham_hf.__file__\n"
        "demo = app.create_demo()\n"
        "fn = next(f for f in demo.fns.values() if f.api_name == 'predict').fn\n"
        "from ham_hf.serve.uploads import uploads\n"
        "uploads().keep([sys.argv[2]])  # as the upload route records a stored upload\n"
        "label, text, verdict = fn({'path': sys.argv[2]}, False, False)\n"
        "assert len(label['confidences']) == 7 and verdict['in_distribution'] is True, (label, verdict)\n"
        "print('SPACE OK', label['label'])\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path), "HAM_HF_CACHE": str(tmp_path / "c")}
    upload = tmp_path / "nv.jpg"
    shutil.copy(real_images["nv"], upload)
    done = subprocess.run([sys.executable, "-c", script, str(space), str(upload)], cwd=space,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "SPACE OK" in done.stdout, done.stderr[-3000:]
