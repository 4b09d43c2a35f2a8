"""The tracker observers with the real libraries, offline, read back with each library's
own reader: TensorBoard event files (tensorboard's EventAccumulator), a W&B offline run
folder (its .wandb transaction log decoded with wandb's own protobuf records), an MLflow
file store (MlflowClient), a trackio local store (trackio's SQLiteStorage, when trackio is
installed). One fake-components run (a subprocess of the real CLI) feeds all of them; the
values read back must equal the run database's.

Then the guard: an observer that raises (a plugin's, and TensorBoard pointed at a file)
leaves the run completed, with a warning event naming it; ``register_observers`` is the
hook third parties use.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import loop
from loop import plugins
from tests.core_helpers import ROOT, cli, cli_inprocess, fake_config, rows, run_inprocess

HAS = {m: importlib.util.find_spec(m) is not None for m in ("tensorboard", "wandb", "mlflow", "trackio")}


def needs(module: str):
    return pytest.mark.skipif(not HAS[module], reason=f"{module} is not installed "
                              f"(pip install -e '.[{module}]'; `make test` installs it)")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trackers")
    uri = (tmp / "mlruns").as_uri()
    blocks = {
        "tensorboard": '[[observers]]\nname = "tensorboard"\n',
        "wandb": '[[observers]]\nname = "wandb"\nmode = "offline"\nproject = "selfloop-test"\n'
                 'tags = ["test"]\n',
        "mlflow": f'[[observers]]\nname = "mlflow"\ntracking_uri = "{uri}"\nexperiment = "tests"\n',
        "trackio": '[[observers]]\nname = "trackio"\nproject = "selfloop-test"\n',
    }
    extra = "\n".join(b for m, b in blocks.items() if HAS[m])
    config = tmp / "c.toml"
    config.write_text(fake_config(tmp / "runs", rounds=2, per_round=3, n=2, extra=extra))
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp / "wb"),
           "WANDB_CACHE_DIR": str(tmp / "wb"), "WANDB_DATA_DIR": str(tmp / "wb"),
           "MLFLOW_ALLOW_FILE_STORE": "true", "TRACKIO_DIR": str(tmp / "trackio"),
           "HF_HUB_OFFLINE": "1"}
    out = cli("run", str(config), "--progress", "off", timeout=600, **env)
    assert out.returncode == 0, out.stderr[-4000:]
    run_dir = tmp / "runs" / "fake"
    assert rows(run_dir / "run.db", "select status from runs")[0]["status"] == "completed"
    failures = rows(run_dir / "run.db", "select message from events where level != 'info'")
    assert not [f for f in failures if "observer" in f["message"]], failures
    return run_dir, uri, env


def stored(run_dir: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in rows(run_dir / "run.db", "select round, name, value from metrics where value is not null"):
        out.setdefault(r["name"], {})[r["round"]] = r["value"]
    return out


def stored_steps(run_dir: Path) -> dict[int, float]:
    steps = rows(run_dir / "run.db", "select loss from train_steps order by round, step, id")
    return {i + 1: s["loss"] for i, s in enumerate(steps)}


@needs("tensorboard")
def test_tensorboard_event_files_read_back(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = tracked
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    metrics = stored(run_dir)
    assert {"eval/accuracy", "judge/parse_failures", "select/pairs", "train/steps"} <= set(metrics)
    for name, by_round in metrics.items():
        got = {e.step: e.value for e in acc.Scalars(name)}
        assert got == pytest.approx(by_round, rel=1e-6, abs=1e-7), name  # float32 in the file
    assert {e.step: e.value for e in acc.Scalars("train_steps/loss")} == pytest.approx(
        stored_steps(run_dir), rel=1e-6)
    assert [e.step for e in acc.Scalars("time/update")] == [1, 2]
    assert "config/text_summary" in acc.Tags()["tensors"]


def wandb_records(path: Path):
    """Decode a .wandb file: W&B's LevelDB-style log (7-byte file header ':W&B', magic,
    version; 32 KiB blocks of records: crc32, length, type FULL/FIRST/MIDDLE/LAST) whose
    payloads are wandb's own protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, _magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and version == 0
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        body = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + body) == checksum
        pos += 7 + length
        parts.append(body)
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


@needs("wandb")
def test_wandb_offline_run_folder_holds_the_history(tracked):
    run_dir, _, _ = tracked
    run_id = json.loads((run_dir / "observers" / "wandb.json").read_text())["id"]
    (log,) = glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    by_round: dict[int, dict] = {}
    by_step: dict[int, float] = {}
    kinds: dict[str, list] = {}
    for rec in wandb_records(Path(log)):
        kind = rec.WhichOneof("record_type")
        kinds.setdefault(kind, []).append(rec)
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            if "round" in row:
                by_round[row["round"]] = row
            if "train_step" in row:
                by_step[row["train_step"]] = row["train_steps/loss"]
    metrics = stored(run_dir)
    for name, values in metrics.items():
        assert {r: by_round[r][name] for r in values} == pytest.approx(values), name
    assert by_step == pytest.approx(stored_steps(run_dir))
    (run,) = kinds["run"]
    config = {u.key: json.loads(u.value_json) for u in run.run.config.update}
    assert config["updater"]["name"] == "fake" and run.run.tags == ["test"]
    (art,) = kinds["artifact"]
    assert art.artifact.type == "report"
    assert [e.path for e in art.artifact.manifest.contents] == ["report.html"]
    assert kinds["exit"][0].exit.exit_code == 0


@needs("mlflow")
def test_mlflow_file_store_returns_the_metrics(tracked, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    run_dir, uri, _ = tracked
    run_id = json.loads((run_dir / "observers" / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "fake"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    assert run.data.params["updater.name"] == "fake" and run.data.params["generate.n"] == "2"
    for name, values in stored(run_dir).items():
        got = {m.step: m.value for m in client.get_metric_history(run_id, name)}
        assert got == pytest.approx(values), name
    got = {m.step: m.value for m in client.get_metric_history(run_id, "train_steps/loss")}
    assert got == pytest.approx(stored_steps(run_dir))
    assert [a.path for a in client.list_artifacts(run_id)] == ["report.html"]


@needs("trackio")
def test_trackio_local_store_holds_the_metrics(tracked):
    run_dir, _, env = tracked
    read = ("import json; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps(S.get_logs('selfloop-test', 'fake'), default=str))")
    out = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env}, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    logs = json.loads(out.stdout)
    for name, values in stored(run_dir).items():
        got = {row["step"]: row[name] for row in logs if name in row}
        assert got == pytest.approx(values), name
    got = {row["step"]: row["train_steps/loss"] for row in logs if "train_steps/loss" in row}
    assert got == pytest.approx(stored_steps(run_dir))


# -- the guard, and the hook third parties use ------------------------------------------


class Flaky(loop.Observer):
    """Records what it sees; raises in round_end of the round its option names."""

    name = "hk_flaky"
    seen: list = []

    class Options(loop.Observer.Options):
        fail_round: int = 1

    def run_start(self, run):
        self.seen.append(("run_start", run.name))

    def phase_end(self, run, round, phase, status, seconds):
        self.seen.append(("phase_end", round, phase, status))

    def round_end(self, run, round, metrics):
        self.seen.append(("round_end", round, metrics.get("eval/accuracy")))
        if round == self.options.fail_round:
            raise ConnectionError("tracker server went away")

    def run_end(self, run, status):
        self.seen.append(("run_end", status))

    def close(self):
        self.seen.append(("close",))


class FlakyPlugin:
    @loop.hookimpl
    def register_observers(self, register):
        register(Flaky)


def test_hook_register_observers(tmp_path):
    """A third party's observer, registered through the hook and enabled in the config,
    follows the run; when it raises (and when a real tracker fails) the run completes and
    an event names it."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    config = tmp_path / "c.toml"
    config.write_text(fake_config(tmp_path / "runs", rounds=2, per_round=3, n=2, extra=(
        '[[observers]]\nname = "hk_flaky"\nfail_round = 1\n\n'
        f'[[observers]]\nname = "tensorboard"\nlogdir = "{blocked}/tb"\n')))
    Flaky.seen = []
    name = plugins.register(FlakyPlugin(), name="hk-observers")
    try:
        assert plugins.registry().components["observer"]["hk_flaky"] is Flaky
        run_dir = run_inprocess(config)
    finally:
        plugins.unregister(name=name)
    db = run_dir / "run.db"
    assert rows(db, "select status from runs")[0]["status"] == "completed"
    assert [r["round"] for r in rows(db, "select round from rounds where status = 'done'")] == [0, 1, 2]
    seen = Flaky.seen
    assert seen[0] == ("run_start", "fake") and ("phase_end", 1, "update", "done") in seen
    rounds = [s for s in seen if s[0] == "round_end"]
    assert [s[1] for s in rounds] == [0, 1]  # switched off after its failure in round 1
    assert ("run_end", "completed") not in seen and seen[-1] == ("close",)
    events = rows(db, "select round, phase, level, message, plugin, data from events "
                      "where message like 'observer %'")
    assert len(events) == 2
    flaky, tb = sorted(events, key=lambda e: "tensorboard" in e["message"])
    assert flaky["level"] == "warning" and flaky["round"] == 1 and flaky["plugin"] == "hk-observers"
    assert "observer 'hk_flaky' (plugin hk-observers) failed in round_end: ConnectionError: " \
           "tracker server went away; it is switched off" in flaky["message"]
    assert json.loads(flaky["data"])["hook"] == "round_end"
    assert tb["plugin"] == "plugins.observers" and "failed in run_start" in tb["message"]
    assert "observer 'tensorboard'" in tb["message"] and json.loads(tb["data"])["traceback"]
    saved = json.loads((run_dir / "config.json").read_text())["observers"]
    assert saved[0] == {"name": "hk_flaky", "fail_round": 1}
    assert saved[1]["name"] == "tensorboard" and saved[1]["report"] is True


def test_observer_config_errors_are_one_line(tmp_path):
    for block, field in (('[[observers]]\nname = "nope"\n', "observers[0].name"),
                         ('[[observers]]\nname = "tensorboard"\nflush_secs = "x"\n',
                          "observers[0].flush_secs"),
                         ('[[observers]]\nname = "wandb"\nmode = "sometimes"\n', "observers[0].mode")):
        config = tmp_path / "c.toml"
        config.write_text(fake_config(tmp_path / "runs", rounds=1, extra=block))
        result = cli_inprocess("run", str(config), "--progress", "off")
        assert result.exit_code == 2, result.output
        assert field in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "runs" / "fake").exists()


@needs("mlflow")
def test_a_resumed_run_continues_the_same_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    config = tmp_path / "c.toml"
    config.write_text(fake_config(tmp_path / "runs", rounds=1, per_round=3, n=2, extra=(
        f'[[observers]]\nname = "mlflow"\ntracking_uri = "{uri}"\nreport = false\n')))
    run_dir = run_inprocess(config)
    first = json.loads((run_dir / "observers" / "mlflow.json").read_text())["run_id"]
    result = cli_inprocess("resume", str(run_dir), "--set", "rounds=2", "--progress", "off")
    assert result.exit_code == 0, result.stderr
    assert json.loads((run_dir / "observers" / "mlflow.json").read_text())["run_id"] == first
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("selfloop").experiment_id])
    assert run.info.run_id == first and run.info.status == "FINISHED"
    got = {m.step: m.value for m in client.get_metric_history(first, "eval/accuracy")}
    assert got == pytest.approx(stored(run_dir)["eval/accuracy"]) and sorted(got) == [0, 1, 2]
    steps = {m.step: m.value for m in client.get_metric_history(first, "train_steps/loss")}
    assert steps == pytest.approx(stored_steps(run_dir)) and sorted(steps) == list(range(1, 7))
    assert client.list_artifacts(first) == []  # report = false
