"""The one rule for telling a Hugging Face Hub repo id (ORG/NAME) from a local path."""

from __future__ import annotations

import re
from pathlib import Path

# ORG/NAME: letters, digits, '.', '_' and '-', not starting with a separator (the Hub's own rule, simplified).
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_id(value: str | Path | None) -> bool:
    """Whether a string names a Hub repo (ORG/NAME) rather than an existing local path."""
    return bool(value) and bool(REPO_ID.match(str(value))) and not Path(str(value)).exists()
