"""Deploy the Gradio app as a Hugging Face Space, with exactly the files the Space needs.

    ham-hf deploy --space_id ORG/NAME                                   # the bundled model travels inside
    ham-hf deploy --space_id ORG/NAME --model ORG/ham10000-resnet50     # the Space loads a model repo
    ham-hf deploy --space_id ORG/NAME --model outputs/run --model_repo_id ORG/run   # pushed first, then used

The Space gets app.py, the ham_hf package, examples/, a requirements.txt for a CPU Space (torch
from PyTorch's CPU wheel index, none of the CUDA libraries) and a README made from
templates/space_readme.md (front matter and page). The model either travels inside the Space
(models/ham10000-resnet50, uploaded through huggingface_hub, which stores large files properly) or is
named by the Space variable HAM_MODEL. Never tests, notebooks, checkpoints or pickles. The token comes
from HF_TOKEN or the saved login and is never printed.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ham_hf import hub
from ham_hf import model as model_lib
from ham_hf.defaults import BUNDLED_DIR, REPO_ROOT
from ham_hf.errors import ModelError, UserError
from ham_hf.repo_ids import REPO_ID

logger = logging.getLogger(__name__)

REPO = REPO_ROOT
BUNDLED = BUNDLED_DIR
# What a CPU Space needs of requirements.txt: the app's runtime, not the training-only tools.
NOT_ON_SPACE = ("optuna",)
CPU_TORCH_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"
NEVER = ("*.pyc", "__pycache__", "*.pkl", "*.pickle", "*.bin", "*.pt", "*.pth", "*.ckpt", "checkpoint-*")


@dataclass
class DeployArguments:
    """Options of `ham-hf deploy`."""

    space_id: str = field(metadata={"help": "The Space to create or update, ORG/NAME."})
    model: str | None = field(default=None, metadata={
        "help": "A Hub model id (the Space loads it) or a model folder (pushed to --model_repo_id first). "
                "Default: the bundled models/ham10000-resnet50 travels inside the Space."})
    model_repo_id: str | None = field(default=None, metadata={
        "help": "Where a local --model folder is pushed (default: the Space's ORG/NAME-model)."})
    private: bool = field(default=False, metadata={"help": "Create the Space (and model repo) private."})
    hardware: str | None = field(default=None, metadata={"help": "Space hardware, e.g. cpu-basic (the default)."})

    def __post_init__(self):
        from huggingface_hub import SpaceHardware

        for name in ("space_id", "model_repo_id"):
            value = getattr(self, name)
            if value is not None and not REPO_ID.match(value):
                raise UserError(f"--{name} {value!r} is not a Hub repo id: give ORG/NAME (letters, digits, . _ -)")
        choices = [h.value for h in SpaceHardware]
        if self.hardware is not None and self.hardware not in choices:
            raise UserError(f"--hardware {self.hardware!r} is not a Space hardware; choose one of {', '.join(choices)}")


# The Space's README: its front matter (sdk, app_file, licence, ...) and page; `ham-hf deploy` fills in the model.
SPACE_TEMPLATE = Path(__file__).parent / "templates" / "space_readme.md"


def front_matter(template: Path = SPACE_TEMPLATE) -> str:
    """The YAML front matter of the Space's README template."""
    text = template.read_text()
    if not text.startswith("---\n"):
        raise UserError(f"{template} has no front matter (--- ... ---) to give the Space")
    return text.split("---\n", 2)[1]


def space_readme(model_note: str, model_id: str | None = None) -> str:
    """The Space's README from its template: `models` naming the Hub model it serves, and the page."""
    from huggingface_hub import SpaceCard

    card = SpaceCard(SPACE_TEMPLATE.read_text().replace("{model_note}", model_note))
    # The Hub links a Space to the models its card lists: the one it loads, none when the model travels inside.
    card.data.models = [model_id] if model_id else None
    return str(card)


def _name(requirement: str) -> str:
    """The package name of a requirement line ("optuna>=4.0" -> "optuna")."""
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0]


def space_requirements(requirements: Path = REPO / "requirements.txt") -> str:
    """requirements.txt for a CPU Space: the app's runtime, torch from the CPU wheel index."""
    keep = [line for line in requirements.read_text().splitlines()
            if line.strip() and not line.startswith("#") and _name(line) not in NOT_ON_SPACE]
    return "\n".join(["# Installed by the Space (CPU): torch from PyTorch's CPU wheels, no CUDA libraries.",
                      CPU_TORCH_INDEX, *keep]) + "\n"


def stage_files(stage: Path, model_dir: Path | None, model_note: str, model_id: str | None = None) -> list[str]:
    """Lay out exactly the Space's files in `stage`; return them, relative, sorted."""
    ignore = shutil.ignore_patterns(*NEVER)
    shutil.copy2(REPO / "app.py", stage / "app.py")
    shutil.copytree(REPO / "ham_hf", stage / "ham_hf", ignore=ignore)
    shutil.copytree(REPO / "examples", stage / "examples", ignore=ignore)
    (stage / "requirements.txt").write_text(space_requirements())
    (stage / "README.md").write_text(space_readme(model_note, model_id))
    if model_dir is not None:
        target = stage / BUNDLED
        target.mkdir(parents=True)
        for name in hub.model_files(model_dir):
            shutil.copy2(model_dir / name, target / name)
    return sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())


def _check_model_folder(folder: Path) -> None:
    """Refuse a folder that is not a HAM10000 classifier with safetensors weights."""
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ModelError(f"{folder} is not a model folder (config.json + model.safetensors); train one with "
                         "`ham-hf train` or pass a Hub model id")
    model_lib.check_fine_tuned(folder)


def deploy(args: DeployArguments, token: str | None = None) -> str:
    """Create or update the Space; return its URL. Everything is checked before anything is uploaded."""
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access)")
    model_dir, variable = None, None
    if args.model is None:
        model_dir = REPO / BUNDLED
        _check_model_folder(model_dir)
        note = "bundled in this Space (`models/ham10000-resnet50`)."
    elif Path(args.model).is_dir():
        _check_model_folder(Path(args.model))
        variable = args.model_repo_id or f"{args.space_id}-model"
        note = f"[{variable}](https://huggingface.co/{variable}) (Space variable HAM_MODEL)."
    elif REPO_ID.match(args.model):
        variable = args.model
        note = f"[{variable}](https://huggingface.co/{variable}) (Space variable HAM_MODEL)."
    else:
        raise ModelError(f"--model {args.model!r} is neither a model folder nor a Hub model id (ORG/NAME)")

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        files = stage_files(stage, model_dir, note, variable)
        if args.model is not None and Path(args.model).is_dir():
            hub.push_model(args.model, variable, private=args.private, token=token)
        api.create_repo(args.space_id, repo_type="space", space_sdk="gradio", private=args.private, exist_ok=True,
                        space_hardware=args.hardware)
        api.upload_folder(repo_id=args.space_id, repo_type="space", folder_path=str(stage),
                          commit_message="Deploy the HAM10000 classifier app (ham-hf deploy)")
    if variable is not None:
        api.add_space_variable(args.space_id, "HAM_MODEL", variable)
    url = f"https://huggingface.co/spaces/{args.space_id}"
    logger.info("deployed %d files to %s (model: %s)", len(files), url, variable or "bundled")
    return url
