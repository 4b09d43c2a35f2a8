"""The wheel: every package and every shipped data file in it, and it works outside the
checkout (the CI step .ci/wheel, run here so it reuses the session's tiny model)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_and_data_folder_is_listed():
    setuptools = pyproject()["tool"]["setuptools"]
    found = sorted(
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("loop", "plugins")
        for p in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in p.parts
    )
    assert sorted(p for p in setuptools["packages"] if not p.startswith("selfloop_")) == found, (
        "add new package folders to [tool.setuptools] packages in pyproject.toml")
    assert setuptools["package-dir"] == {"selfloop_prompts": "prompts", "selfloop_configs": "configs"}


def test_wheel_ships_templates_constitution_and_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    names = set(zipfile.ZipFile(next(tmp_path.glob("selfloop-*.whl"))).namelist())
    for folder, package, pattern in [("prompts", "selfloop_prompts", "*.j2"),
                                     ("prompts", "selfloop_prompts", "*.toml"),
                                     ("configs", "selfloop_configs", "*.toml")]:
        files = sorted((ROOT / folder).glob(pattern))
        assert files and all(f"{package}/{f.name}" in names for f in files), (folder, pattern)
    assert "loop/resources.py" in names and "plugins/tinyworld/model.py" in names


@pytest.mark.slow
def test_the_installed_wheel_runs_the_demo_from_another_folder(world_runs_dir):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHON"] = sys.executable
    # The demo tests' shortened recipe: the session's seed model (conftest's world_runs_dir)
    # is reused, not a second one built with the full recipe.
    from conftest import DEMO_SHORT

    proc = subprocess.run([str(ROOT / ".ci" / "wheel"), str(world_runs_dir), *DEMO_SHORT], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "built, installed and ran one demo round" in proc.stdout
