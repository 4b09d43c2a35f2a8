"""Guards through the real CLI on the tiny world: a judge that can never parse fails round 1's
judge phase with the message, `resume --set judges.0.max_new_tokens=...` completes; a
round without training examples fails at select; bad [guards] values are refused."""

from __future__ import annotations

import subprocess
import sys

from tests.world_runs import ENV, ROOT, q, world_command


def _run(cmd):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=ENV)


def test_never_parsing_judge_fails_then_resume_completes(world_runs_dir):
    cmd = world_command(world_runs_dir, "never-parses", 'name="pairs"', 'name="dpo"',
                        "--set", "rounds=1", "--set", "judges.0.max_new_tokens=3")
    proc = _run(cmd)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    run_dir = world_runs_dir / "never-parses"
    assert err.startswith("Error: round 1 judge: judge 'self_reward' (judges[0]) could not parse"), err
    for part in ("guards.max_parse_failure_rate = 0.5", "were cut at max_new_tokens", "One raw output: '",
                 "raise judges[0].max_new_tokens (now 3)",
                 f"selfloop resume {run_dir} --set judges.0.max_new_tokens=64"):
        assert part in err, err
    db = run_dir / "run.db"
    assert q(db, "select status from runs")[0]["status"] == "failed"
    assert q(db, "select status, error from phases where round = 1 and phase = 'judge'")[0]["status"] == "failed"
    assert q(db, "select count(*) n from judgments")[0]["n"] == 0  # the failed phase stored nothing

    proc = _run([sys.executable, "-m", "loop", "resume", str(run_dir), "--progress", "plain",
                 "--set", "judges.0.max_new_tokens=40"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert q(db, "select status from runs")[0]["status"] == "completed"
    m = {r["name"]: r["value"] for r in q(db, "select name, value from metrics where round = 1")}
    assert m["judge/self_reward/parse_failure_rate"] <= 0.5
    assert "judge/self_reward/truncated_rate" in m and m["select/examples"] >= 1
    assert (run_dir / "adapters" / "round-1" / "adapter_model.safetensors").is_file()


def test_a_round_without_training_examples_fails_at_select(world_runs_dir):
    # One answer per prompt: no pair can be made.
    cmd = world_command(world_runs_dir, "no-examples", 'name="pairs"', 'name="dpo"',
                        "--set", "rounds=1", "--set", "generate.n=1")
    proc = _run(cmd)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "round 1 select: selector 'pairs' made 0 training examples (guards.min_train_examples = 1)" in err
    assert "guards.min_train_examples=0" in err


def test_bad_guards_are_refused_before_the_run_folder(tmp_path):
    proc = _run([sys.executable, "-m", "loop", "run", "configs/demo.toml", "--set", f"runs_dir={tmp_path}",
                 "--set", "guards.max_parse_failure_rate=1.5"])
    assert proc.returncode == 2
    assert "guards.max_parse_failure_rate: input should be less than or equal to 1" in proc.stderr
    assert not (tmp_path / "demo").exists()


def test_truncation_guard_names_every_length_option_of_the_judge():
    import pytest

    from loop import plugins
    from loop.config import ComponentSpec
    from loop.guards import GuardFailed, GuardsConfig, check_judge

    judge = plugins.build_component("judge", ComponentSpec(name="constitutional", critique_max_new_tokens=24,
                                                           revision_max_new_tokens=24), "judges[0]")
    with pytest.raises(GuardFailed) as e:
        check_judge(GuardsConfig(), field="judges[0]", judge=judge, judgments=[], outputs=32, truncated=30,
                    round=1, run_dir="runs/x", truncated_sample="The answer is too")
    msg = str(e.value)
    assert "round 1 judge: judge 'constitutional' (judges[0]): 30 of 32 outputs (94%) were cut" in msg
    assert "One raw output: 'The answer is too'" in msg
    assert "raise judges[0].critique_max_new_tokens (now 24) / judges[0].revision_max_new_tokens (now 24)" in msg
    assert ("--set judges.0.critique_max_new_tokens=96 --set judges.0.revision_max_new_tokens=96" in msg)
    check_judge(GuardsConfig(max_truncated_rate=1.0), field="judges[0]", judge=judge, judgments=[], outputs=32,
                truncated=30, round=1, run_dir="runs/x")  # switched off: no error
