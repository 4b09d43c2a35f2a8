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
        ('{"text": "a"}\n', 'path = "p.jsonl"', "no column 'prompt' (prompt text)"),
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


# -- formats, read through `datasets` -----------------------------------------------------

ROWS = [{"prompt": f"question {i}, with a comma", "answer": str(i)} for i in range(4)]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    """datasets' Arrow cache in a session folder (CLI subprocesses get it through the env)."""
    cache = tmp_path_factory.getbasetemp() / "datasets-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def write_formats(folder: Path) -> dict[str, Path]:
    """The same four prompts in every format users have."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(exist_ok=True)
    out = {}
    out["jsonl"] = folder / "p.jsonl"
    out["jsonl"].write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    out["json"] = folder / "p.json"
    out["json"].write_text(json.dumps(ROWS))
    out["csv"] = folder / "p.csv"
    out["csv"].write_bytes(b"\xef\xbb\xbfprompt,answer\n" + "".join(
        f'"{r["prompt"]}",{r["answer"]}\n' for r in ROWS).encode())
    out["tsv"] = folder / "p.tsv"
    out["tsv"].write_text("prompt\tanswer\n" + "".join(f'{r["prompt"]}\t{r["answer"]}\n' for r in ROWS))
    out["parquet"] = folder / "p.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), out["parquet"])
    out["saved"] = folder / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(out["saved"]))
    out["txt"] = folder / "p.txt"
    out["txt"].write_bytes(b"\xef\xbb\xbf" + "".join(r["prompt"] + "\n\n" for r in ROWS).encode())
    return out


def cache_as_hub_dataset(source: Path, repo: str, cache: Path, commit: str = "0123abcd") -> None:
    """Leave ``source`` in datasets' cache the way a download of hub dataset ``repo`` does
    (``<owner>___<name>/default/0.0.0/<commit>/<name>-train.arrow``), without a network."""
    from datasets.packaged_modules.json.json import Json

    owner, name = repo.split("/")
    builder = Json(cache_dir=str(cache / "build"), data_files={"train": str(source)},
                   dataset_name=name, hash=commit, config_name="default")
    builder.download_and_prepare()
    built = Path(builder.cache_dir)  # .../<name>/default-<hash>/0.0.0/<commit>
    target = cache / f"{owner}___{name}" / "default" / "0.0.0"
    target.parent.mkdir(parents=True, exist_ok=True)
    built.parent.rename(target)


def test_every_format_reads_the_same_prompts_and_answers(tmp_path, _datasets_cache):
    from plugins.prompts.reading import PromptSpec, read_prompt_data

    files = write_formats(tmp_path / "data")
    cache_as_hub_dataset(files["jsonl"], "someone/toy-prompts", _datasets_cache)
    want = [(r["prompt"], None, r["answer"]) for r in ROWS]
    for kind, path in [*files.items(), ("hub", "someone/toy-prompts")]:
        data = read_prompt_data(PromptSpec(str(path)))
        got = [data.row(i) for i in range(len(data))]
        if kind == "txt":  # one prompt per line: no answers; blank lines skipped
            assert got == [(t, None, None) for t, _, _ in want], kind
        else:  # CSV/TSV columns come back as text; the BOM never stays in the first prompt
            assert [(t, s, str(a)) for t, s, a in got] == want, kind


def test_chat_rows_answer_the_last_user_turn(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": "a reference answer"}],
             "answer": f"a{i}"} for i in range(3)]
    data = tmp_path / "conf" / "chat.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write(tmp_path, 'name = "dataset"\npath = "chat.jsonl"\nper_round = 3\nshuffle = false',
                   rounds=1)
    result = cli_inprocess("run", str(config), "--progress", "off")
    assert result.exit_code == 0, result.stderr
    conn = sqlite3.connect(tmp_path / "runs" / "ds" / "run.db")
    got = conn.execute("select text, system, answer from prompts where round = 1 order by id").fetchall()
    conn.close()
    assert [(t, s) for t, s, _ in got] == [(f"question {i}", "be brief") for i in range(3)]
    assert [a for _, _, a in got] == ["a0", "a1", "a2"]


@pytest.mark.parametrize(
    "name, body, needle",
    [
        ("p.csv", "text,kind\nhello,general\n",
         "no column 'prompt' (prompt text) or 'messages' (chat messages); it has ['text', 'kind']"),
        ("p.jsonl", json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"},
                                             {"role": "user", "content": "c"}]}) + "\n",
         "row 1: 'messages': turn 2: a second user turn"),
        ("p.jsonl", json.dumps({"messages": [{"role": "tool", "content": "a"}]}) + "\n",
         "row 1: 'messages': turn 0: needs a role (system, user, assistant)"),
        ("p.xlsx", "x", "unknown prompts file type '.xlsx'"),
        # issue 13.12: a lone surrogate and bad UTF-8 fail at validation, naming the line
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": "x\\ud800"}\n', "line 2 is not JSON"),
        ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "caf\x92"}\n',
         "line 2 is not UTF-8 (byte 0x92 at column 16)"),
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": "  "}\n', "row 2 has no text under 'prompt'"),
        (None, "someone/not-cached", "neither a file nor a dataset in the local datasets cache"),
    ],
)
def test_bad_data_names_file_row_and_field(tmp_path, name, body, needle):
    if name is not None:
        (tmp_path / "conf").mkdir()
        path = tmp_path / "conf" / name
        path.write_bytes(body if isinstance(body, bytes) else body.encode())
        spec = f'path = "{name}"'
    else:
        spec = f'path = "{body}"'
    config = write(tmp_path, f'name = "dataset"\n{spec}')
    result = cli_inprocess("run", str(config), "--progress", "off")
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    if name is not None:
        assert str((tmp_path / "conf" / name).resolve()) in lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
