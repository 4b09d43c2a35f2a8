"""The `dataset` prompt source: your own prompts file, checked before anything is written."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from core_helpers import FAKE_PLUGIN, cli, cli_inprocess


def write(tmp: Path, prompts_spec: str, rounds: int = 3) -> Path:
    config = tmp / "conf" / "run.toml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(f"""
name = "ds"
rounds = {rounds}
seed = 3
runs_dir = "{tmp / 'runs'}"
plugins = ["{FAKE_PLUGIN}"]
[model]
build = {{ name = "fake" }}
[generator]
name = "fake"
[generate]
n = 2
[[prompts]]
{prompts_spec}
[[judges]]
name = "fake"
[selector]
name = "fake_pairs"
[updater]
name = "fake"
""")
    return config


def prompts_by_round(db: Path) -> dict[int, list[str]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    out: dict[int, list[str]] = {}
    for r, text in conn.execute("select round, text from prompts order by id"):
        out.setdefault(r, []).append(text)
    conn.close()
    return out


def test_rounds_take_the_next_prompts_of_a_seeded_order(tmp_path):
    data = tmp_path / "conf" / "prompts.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"q": f"question {i}", "sys": "be brief"}) + "\n" for i in range(5)))
    config = write(tmp_path, 'name = "dataset"\npath = "prompts.jsonl"\nfield = "q"\n'
                             'system_field = "sys"\nper_round = 3')
    result = cli_inprocess("run", str(config), "--progress", "off")
    assert result.exit_code == 0, result.stderr
    run_dir = tmp_path / "runs" / "ds"
    got = prompts_by_round(run_dir / "run.db")
    assert [len(got[r]) for r in (1, 2, 3)] == [3, 3, 3]
    # One pass over the file covers every prompt once before any repeats.
    first_pass = got[1] + got[2][:2]
    assert sorted(first_pass) == [f"question {i}" for i in range(5)]
    assert first_pass != [f"question {i}" for i in range(5)], "shuffled by default"
    # The relative path was resolved against the config's folder and saved absolute.
    saved = json.loads((run_dir / "config.json").read_text())["prompts"][0]
    assert saved["path"] == str(data.resolve())
    conn = sqlite3.connect(run_dir / "run.db")
    assert {s for (s,) in conn.execute("select system from prompts")} == {"be brief"}
    conn.close()
    # The same seed gives the same prompts in a fresh run folder.
    again = cli_inprocess("run", str(config), "--set", "name=ds2", "--progress", "off")
    assert again.exit_code == 0
    assert prompts_by_round(tmp_path / "runs" / "ds2" / "run.db") == got


def test_text_files_hold_one_prompt_per_line(tmp_path):
    data = tmp_path / "p.txt"
    data.write_text("alpha\n\nbeta\ngamma\n")
    config = write(tmp_path, f'name = "dataset"\npath = "{data}"\nper_round = 3\nshuffle = false', rounds=1)
    assert cli_inprocess("run", str(config), "--progress", "off").exit_code == 0
    assert prompts_by_round(tmp_path / "runs" / "ds" / "run.db")[1] == ["alpha", "beta", "gamma"]


@pytest.mark.parametrize(
    "body, spec, needle",
    [
        (None, 'path = "missing.jsonl"', "prompts[0].path: prompts file 'missing.jsonl' not found"),
        ('{"prompt": "a"}\nnot json\n', 'path = "p.jsonl"', "line 2 is not JSON"),
        ('{"text": "a"}\n', 'path = "p.jsonl"', "line 1 has no text under 'prompt'"),
        ("\n\n", 'path = "p.jsonl"', "no prompts in the file"),
        ('{"prompt": "a"}\n', 'path = "p.jsonl"\nper_round = 0', "prompts[0].per_round"),
    ],
)
def test_bad_prompt_files_exit_2_before_anything_is_written(tmp_path, body, spec, needle):
    if body is not None:
        (tmp_path / "conf").mkdir()
        (tmp_path / "conf" / "p.jsonl").write_text(body)
    config = write(tmp_path, f'name = "dataset"\n{spec}')
    proc = cli("run", str(config))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and str(config) in lines[0], lines
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
