"""Files that ship with selfloop: prompt templates, the constitution, the example configs.

In the repository they live in the top-level ``prompts/`` and ``configs/`` folders. A wheel
ships those same folders as the data-only packages ``selfloop_prompts`` and
``selfloop_configs`` (pyproject.toml maps each package name onto its folder, so there is one
copy of every file), and they are found through importlib.resources.

A source checkout on ``sys.path`` (tests, ``python -m loop`` in a worktree) reads its own
folders even when another checkout is installed in editable mode, so a template edited in
the checkout is the one that runs.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

PACKAGES = {"prompts": "selfloop_prompts", "configs": "selfloop_configs"}

_CHECKOUT = Path(__file__).resolve().parent.parent


def shipped(folder: str, filename: str) -> Path:
    """The path of ``folder/filename`` as shipped (it may not exist: callers check)."""
    local = _CHECKOUT / folder
    if (_CHECKOUT / "pyproject.toml").is_file() and local.is_dir():
        return local / filename
    try:
        root = importlib.resources.files(PACKAGES[folder])
    except ModuleNotFoundError:
        return local / filename
    # Wheels install unpacked, so the package is a folder and joinpath gives a real path
    # (for a namespace package too: the location that holds the file).
    return Path(str(root.joinpath(filename)))
