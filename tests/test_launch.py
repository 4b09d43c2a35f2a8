"""The update phase under a real ``accelerate launch`` (loop/launch.py): 2 CPU processes
(gloo), data parallel and FSDP2, train the in-process adapter; a SIGKILLed launched update
resumes to the same adapter; a failing launch fails the phase with its log; bad launch
and QLoRA settings are refused at validation (exit 2). QLoRA on CUDA behind ``gpu``.

One in-process DPO round of the tiny world is run once (module fixture); the launched
updates re-run its update phase on copies (``resume --redo round-1.update``), so each
test pays only for the launch.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from world_runs import ENV, ROOT, q, run_world

DDP = ROOT / "configs" / "accelerate" / "ddp.yaml"
LAUNCH2 = f'updater.launch={{num_processes=2, config_file="{DDP}"}}'
ENV1 = {**ENV, "OMP_NUM_THREADS": "1"}  # two ranks on two cores


@pytest.fixture(scope="module")
def base_run(world_runs_dir):
    """One round, DPO in-process: the reference adapter and the state to re-run from."""
    return run_world(world_runs_dir, "launch-base", 'name="pairs"', 'name="dpo"', "--set", "rounds=1")


def redo_copy(base: Path, name: str) -> Path:
    """A copy of the base run without its reference cache (the launch recomputes it)."""
    dest = base.parent / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(base, dest)
    shutil.rmtree(dest / "cache", ignore_errors=True)
    return dest


def resume_cmd(run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "loop", "resume", str(run_dir), "--progress", "plain", *args]


def tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapters" / "round-1" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def launched2(base_run):
    run = redo_copy(base_run, "launch-two")
    proc = subprocess.run(resume_cmd(run, "--redo", "round-1.update", "--set", LAUNCH2),
                          cwd=ROOT, env=ENV1, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.mark.slow
def test_two_processes_train_the_one_process_adapter(base_run, launched2):
    import torch

    one, two = tensors(base_run), tensors(launched2)
    assert one.keys() == two.keys()
    assert any(t.abs().max() > 0 for t in one.values())  # LoRA B moved off its zero init
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-5), k
    steps = "select step, loss, grad_norm, learning_rate from train_steps where round = 1 order by step"
    a, b = q(base_run / "run.db", steps), q(launched2 / "run.db", steps)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert x["step"] == y["step"] and x["learning_rate"] == y["learning_rate"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    folder = launched2 / "launch" / "round-1.attempt-1"
    assert (folder / "launch.log").is_file() and (folder / "result.json").is_file()
    assert (launched2 / "cache" / "ref-round-1-pairs.safetensors").is_file()  # rank 0 wrote it
    events = [e["message"] for e in q(launched2 / "run.db", "select message from events where round = 1")]
    assert any("update launched: 2 process(es)" in m for m in events)


@pytest.mark.slow
def test_fsdp2_on_two_gloo_ranks_trains_the_one_process_adapter(base_run):
    import torch

    run = redo_copy(base_run, "launch-fsdp2")
    fsdp2 = ROOT / "configs" / "accelerate" / "fsdp2.yaml"
    proc = subprocess.run(
        resume_cmd(run, "--redo", "round-1.update", "--set",
                   f'updater.launch={{num_processes=2, config_file="{fsdp2}"}}'),
        cwd=ROOT, env=ENV1, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [e["message"] for e in q(run / "run.db", "select message from events where round = 1")]
    assert any(re.fullmatch(r"FSDP2: the model sharded over 2 ranks \([1-9]\d* blocks \+ the root\)", m)
               for m in events), events
    one, two = tensors(base_run), tensors(run)
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-5), k
    steps = "select loss, grad_norm from train_steps where round = 1 order by step"
    for x, y in zip(q(base_run / "run.db", steps), q(run / "run.db", steps), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def _ranks_alive(marker: str) -> list[int]:
    """Pids whose command line names ``marker`` (the attempt's inputs file)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
def test_killed_launched_update_resumes_to_the_same_adapter(base_run, launched2):
    run = redo_copy(base_run, "launch-killed")
    proc = subprocess.Popen(resume_cmd(run, "--redo", "round-1.update", "--set", LAUNCH2), cwd=ROOT,
                            env=ENV1, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    progress = run / "launch" / "round-1.attempt-1" / "progress.jsonl"
    try:
        deadline = time.time() + 600
        while not (progress.is_file() and progress.stat().st_size):  # rank 0 is training
            assert proc.poll() is None, "the run ended before its launched update could be killed"
            if time.time() > deadline:  # a hang guard, not a speed check
                pytest.fail("the launched update never started training")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    marker = str(run / "launch" / "round-1.attempt-1" / "inputs.json")
    deadline = time.time() + 60
    while _ranks_alive(marker) and time.time() < deadline:  # each rank watches the run's pid
        time.sleep(0.2)
    assert not _ranks_alive(marker), "trainer processes outlived the killed run"
    assert not (run / "adapters" / "round-1").exists()
    resumed = subprocess.run(resume_cmd(run), cwd=ROOT, env=ENV1, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "launch" / "round-1.attempt-2" / "result.json").is_file()
    a = (launched2 / "adapters" / "round-1" / "adapter_model.safetensors").read_bytes()
    b = (run / "adapters" / "round-1" / "adapter_model.safetensors").read_bytes()
    assert a == b
    steps = "select step, loss from train_steps where round = 1 order by step"
    assert q(run / "run.db", steps) == q(launched2 / "run.db", steps)


@pytest.mark.slow
def test_a_failing_launch_fails_the_phase_with_its_log(base_run, tmp_path):
    run = redo_copy(base_run, "launch-failing")
    bad = tmp_path / "one-gpu.yaml"  # accelerate refuses: multi-GPU with one GPU id
    bad.write_text(DDP.read_text().replace("gpu_ids: all", "gpu_ids: '0'"))
    proc = subprocess.run(
        resume_cmd(run, "--redo", "round-1.update", "--set",
                   f'updater.launch={{num_processes=2, config_file="{bad}"}}'),
        cwd=ROOT, env=ENV1, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    log = run / "launch" / "round-1.attempt-1" / "launch.log"
    assert str(log) in proc.stderr and "Less than two GPU ids" in proc.stderr
    assert q(run / "run.db", "select status from phases where round = 1 and phase = 'update'")[0][
        "status"] == "failed"
    assert not (run / "adapters" / "round-1").exists()


def _validate(*sets: str, tmp_path: Path):
    from tests.core_helpers import cli_inprocess

    args = [x for s in sets for x in ("--set", s)]
    return cli_inprocess("run", str(ROOT / "configs" / "demo.toml"), "--set", f"runs_dir={tmp_path}",
                         *args)


@pytest.mark.parametrize("sets, words", [
    (['model.quantization="4bit"', 'model.device="cpu"'], ["model.quantization", "CUDA"]),
    (['updater.launch={config_file="accelerate/zero3.yaml"}'],
     ["updater.launch.config_file", "DEEPSPEED", "not supported"]),
    (['updater.launch={config_file="accelerate/none.yaml"}'], ["updater.launch.config_file", "not found"]),
], ids=["qlora-on-cpu", "deepspeed-refused", "missing-file"])
def test_bad_launch_and_quantization_are_refused_at_validation(tmp_path, sets, words):
    result = _validate(*sets, tmp_path=tmp_path)
    assert result.exit_code == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.stderr
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.gpu
def test_qlora_trains_a_dpo_update_on_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("bitsandbytes")
    from conftest import build_tiny_model, make_context

    from loop import components as c
    from loop.policy import Policy
    from plugins.updaters.dpo import DPOUpdater

    folder = build_tiny_model(tmp_path / "model")
    policy = Policy(str(folder), device="cuda", dtype="bfloat16", quantization="4bit")
    assert getattr(policy.base, "hf_quantizer", None) is not None  # loaded through bitsandbytes
    prompt = c.Prompt(text="sort: c a b", id=1)
    pairs = [c.Pair(prompt=prompt, chosen=c.Candidate(prompt=prompt, text="a b c"),
                    rejected=c.Candidate(prompt=prompt, text="c b a"), id=i) for i in range(4)]
    upd = DPOUpdater(DPOUpdater.Options(max_steps=3, batch_size=2, learning_rate=1e-3))
    ctx = make_context(policy, phase="update", run_dir=tmp_path)
    result = upd.update(ctx, c.Selection(pairs=pairs), str(tmp_path / "adapter"))
    assert len(result.steps) == 3 and all(s.loss == s.loss for s in result.steps)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
