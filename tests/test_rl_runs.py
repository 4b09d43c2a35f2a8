"""Online RL through the real CLI on the tiny world (the shortened 250-step seed model of
tests/world_runs.py, shared through the session's runs folder):

- configs/grpo_demo.toml, the verifier as reward: held-out accuracy gains >= 15 points;
- configs/rlhf_demo.toml: the ``trained_rm`` judge learns from verifier-labelled pairs
  of round 1 and ranks held-out pairs in round 2 (rm/accuracy >= 0.8), PPO's figures
  are stored for both rounds; killed during the reward model's training and resumed,
  the run ends with the same reward-model adapter as an uninterrupted one;
- configs/rlaif_demo.toml completes two rounds with the RM's figures stored.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from world_runs import ENV, ROOT, q

SEED_MODEL = ["--set", "model.build.steps=250"]


def command(runs_dir, config, name, *extra):
    return [sys.executable, "-m", "loop", "run", config, "--progress", "plain",
            "--set", f"runs_dir={runs_dir}", "--set", f"name={name}", *SEED_MODEL, *extra]


def run(runs_dir, config, name, *extra):
    proc = subprocess.run(command(runs_dir, config, name, *extra), cwd=ROOT, capture_output=True,
                          text=True, timeout=1800, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return runs_dir / name


def metric(run_dir, round, name):
    rows = q(run_dir / "run.db", "select value from metrics where round = ? and name = ?", [round, name])
    return rows[0]["value"] if rows else None


def test_grpo_demo_gains_with_the_verifier_as_reward(world_runs_dir):
    d = run(world_runs_dir, "configs/grpo_demo.toml", "grpo-demo", "--set", "rounds=1",
            "--set", "prompts.0.per_round=16", "--set", "evaluators.0.heldout=100")
    before, after = metric(d, 0, "eval/accuracy"), metric(d, 1, "eval/accuracy")
    assert after - before >= 0.15, (before, after)
    assert metric(d, 1, "grpo/groups") >= 4
    assert 0 < metric(d, 1, "grpo/clip_frac") < 1


RLHF = ["--set", "evaluators=[]", "--set", "updater.max_steps=1", "--set", "prompts.0.per_round=32"]


def rm_training(run_dir) -> bool:
    db = run_dir / "run.db"
    if not db.is_file():
        return False
    try:
        rows = q(db, "select status, done from phases where round = 2 and phase = 'judge'")
    except Exception:  # the database is being created
        return False
    # The reward model trains first thing in the judge phase: killed as soon as the phase
    # runs (its progress rows are throttled, and on a quiet machine the training can end
    # before the first one lands).
    return bool(rows) and rows[0]["status"] == "running"


@pytest.mark.timeout(1800)  # two runs of two rounds: a hang guard for a loaded machine
def test_rlhf_demo_trained_rm_learns_verifier_pairs_and_resumes_to_the_same_adapter(world_runs_dir):
    """configs/rlhf_demo.toml: round 1 PPO on the verifier's scores, round 2 the reward
    model trained on round 1's verifier-ranked pairs; then the same run killed during
    the reward model's training and resumed."""
    whole = run(world_runs_dir, "configs/rlhf_demo.toml", "rm-whole", *RLHF)
    assert q(whole / "run.db", "select status from runs")[0]["status"] == "completed"
    assert metric(whole, 1, "rm/train_pairs") == 0  # round 1: no earlier pairs, it abstains
    assert metric(whole, 2, "rm/train_pairs") >= 8
    assert metric(whole, 2, "rm/heldout_pairs") >= 4
    assert metric(whole, 2, "rm/accuracy") >= 0.8
    assert metric(whole, 2, "rm/loss") is not None
    scored = q(whole / "run.db", "select count(*) as n from judgments where round = 2 and judge = 'trained_rm'")
    assert scored[0]["n"] == 32 * 4
    for r in (1, 2):
        for key in ("ppo/value_loss", "ppo/kl", "ppo/clip_frac"):
            assert metric(whole, r, key) is not None, (r, key)
        assert (whole / "adapters" / f"round-{r}" / "value_head.safetensors").is_file()

    killed = world_runs_dir / "rm-killed"
    proc = subprocess.Popen(command(world_runs_dir, "configs/rlhf_demo.toml", "rm-killed", *RLHF), cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 1500
        while not rm_training(killed):
            assert proc.poll() is None, "the run ended before the reward model trained"
            if time.time() > deadline:  # a hang guard, not a speed check
                pytest.fail("the run never reached the reward model's training")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (killed / "adapters" / "rm-round-2").exists()
    resumed = subprocess.run([sys.executable, "-m", "loop", "resume", str(killed), "--progress", "plain"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1800)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for f in ("adapter_model.safetensors", "reward_head.safetensors"):
        a, b = (load_file(str(d / "adapters" / "rm-round-2" / f)) for d in (whole, killed))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), f
    assert metric(killed, 2, "rm/accuracy") == metric(whole, 2, "rm/accuracy")


def test_rlaif_demo_completes_two_rounds(world_runs_dir):
    d = run(world_runs_dir, "configs/rlaif_demo.toml", "rlaif", "--set", "evaluators=[]",
            "--set", "prompts.0.per_round=12", "--set", "judges.0.comparisons=1",
            "--set", "judges.1.train.epochs=2", "--set", "updater.max_steps=1")
    assert q(d / "run.db", "select status from runs")[0]["status"] == "completed"
    for key in ("rm/accuracy", "rm/loss", "rm/train_pairs", "grpo/clip_frac"):
        assert metric(d, 2, key) is not None, key
    assert (d / "adapters" / "rm-round-2" / "reward_head.safetensors").is_file()
    assert (d / "adapters" / "round-2" / "adapter_model.safetensors").is_file()


def test_spin_with_dpo_runs_two_rounds(world_runs_dir):
    from world_runs import check_two_rounds, run_world

    d = run_world(world_runs_dir, "spin", 'name="spin"', 'name="dpo"')
    db = check_two_rounds(d, "rewards/margin")
    rows = q(db, "select p.source, c.source as chosen_source, c.text, pr.answer from pairs p "
                 "join candidates c on c.id = p.chosen_id join prompts pr on pr.id = p.prompt_id "
                 "where p.selected = 1")
    assert rows and all(r["source"] == "spin" and r["chosen_source"] == "reference" and r["text"] == r["answer"]
                        for r in rows)
