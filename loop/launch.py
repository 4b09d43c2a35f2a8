"""The update phase as an ``accelerate launch`` subprocess (``[updater] launch = {...}``).

Parent side (``run_launched``, called by the runner's update phase):

1. Write the frozen inputs, ``<run>/launch/round-<r>.attempt-<k>/inputs.json``: the
   round, the policy the phase starts from, the model path, the plugin files loaded
   into this process and the parent's pid. Everything else the child reads from the
   run database, opened read-only (the run config as stored, the round's selection).
2. Run ``python -m accelerate.commands.launch ... -m loop.launch <inputs.json>`` in its
   own session, stdout and stderr to ``launch.log`` in the same folder; progress lines
   the child's rank 0 writes are passed on to the dashboard while it runs.
3. Rank 0 writes the adapter into ``adapter/`` and ``result.json`` (steps, metrics,
   events) with a temporary file and a rename. The runner then installs the adapter and
   commits the steps in the update phase's transaction as for an in-process update, so
   a killed run re-runs the phase from scratch on resume, in a new attempt folder.

Child side (``main``): every rank builds the run's updater from the stored config and
calls its ``update`` as in-process (the same code: ``plugins/updaters/training.py``'s
loop splits each micro-batch across ranks and sums gradients, data parallel, or shards
the model with FSDP2 when accelerate's config asks for it; see ``rank`` and
``fsdp_requested``). Each rank
watches the parent's pid and exits when the run is gone (a SIGKILLed run leaves no
trainer behind).

Failure of the child: the phase fails with the log's last lines and the log's path.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator

from loop.checked import Checked
from loop.errors import PhaseFailed

INPUTS = "inputs.json"
RESULT = "result.json"
PROGRESS = "progress.jsonl"
LOG = "launch.log"
TAIL_LINES = 20
# Accelerate config types the launched trainer implements as data parallel (FSDP with
# fsdp_version 2 is sharded, see plugins/updaters/training.py's shard; DeepSpeed is not).
DATA_PARALLEL = {"NO", "MULTI_GPU"}


class LaunchOptions(Checked):
    """``[updater] launch``: run the update under ``accelerate launch``."""

    model_config = {"extra": "forbid", "allow_inf_nan": False}

    num_processes: int = Field(
        1, ge=1, description="Training processes (one per GPU; on CPU, each gets OMP_NUM_THREADS "
        "threads). Each optimizer step's micro-batches are split across them and the gradients "
        "summed, so results match a one-process update.")
    config_file: str | None = Field(
        None, description="An accelerate config file (YAML, `accelerate config` writes one; "
        "examples in configs/accelerate/), relative to the run config; None: accelerate's "
        "defaults. num_processes overrides the file's.")

    @field_validator("config_file")
    @classmethod
    def _config_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        base = (info.context or {}).get("source_dir")
        path = Path(value).expanduser()
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        if not path.is_file():
            raise ValueError(f"accelerate config file {value} not found; give the path of a "
                             "YAML file (examples: configs/accelerate/)")
        kind, fsdp_version = distributed_type(path)
        if kind == "FSDP" and fsdp_version != 2:
            raise ValueError(f"{value}: FSDP version {fsdp_version or 1} is not supported; the "
                             "launched update shards with FSDP2 (fsdp_config.fsdp_version: 2, "
                             "as configs/accelerate/fsdp2.yaml)")
        if kind == "MULTI_CPU":  # accelerate starts one process for it unless MPI is there
            raise ValueError(f"{value}: distributed_type MULTI_CPU is not used by the launched "
                             "update; use configs/accelerate/ddp.yaml (on CPU its ranks use gloo)")
        if kind is not None and kind not in DATA_PARALLEL | {"FSDP"}:
            raise ValueError(
                f"{value}: distributed_type {kind} is not supported by the launched update yet "
                "(data parallel or FSDP2 only; DeepSpeed ZeRO is not implemented, see "
                "docs/scale.md); use configs/accelerate/ddp.yaml or fsdp2.yaml")
        return str(path.resolve())  # absolute: a resumed run reads it from the run folder


def distributed_type(path: Path) -> tuple[str | None, int | None]:
    """The ``distributed_type`` of an accelerate YAML/JSON config file (None: not set)
    and its ``fsdp_config.fsdp_version``."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot be read as an accelerate config file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: an accelerate config file is a mapping of settings")
    kind = data.get("distributed_type")
    fsdp = data.get("fsdp_config") or {}
    version = fsdp.get("fsdp_version") if isinstance(fsdp, dict) else None
    return (None if kind is None else str(kind).upper(),
            None if version is None else int(version))


# ---------------------------------------------------------------------------
# Ranks: what the shared training code asks
# ---------------------------------------------------------------------------


def rank() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) outside a launched update."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank()[0] == 0


def fsdp_requested() -> bool:
    """This launched update was started with an FSDP2 accelerate config (accelerate
    launch sets ACCELERATE_USE_FSDP and FSDP_VERSION for its processes)."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
            and os.environ.get("FSDP_VERSION") == "2")


# ---------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(options: LaunchOptions, inputs: Path, *, port: int) -> list[str]:
    """The ``accelerate launch`` command line for the child."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--num_processes", str(options.num_processes), "--num_machines", "1",
           "--main_process_port", str(port)]
    if options.config_file:
        cmd += ["--config_file", options.config_file]
    elif options.num_processes > 1:
        # accelerate's --cpu starts one process unless MPI is there; torch's elastic
        # launcher (--multi_gpu) starts N, and each rank picks gloo on CPU (main below).
        cmd += ["--multi_gpu"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "loop.launch", str(inputs)]
    return cmd


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_launched(runner, ctx, updater, output_dir: str):
    """Run ``updater.update`` for ``ctx``'s round under accelerate; returns the
    ``UpdateResult`` rank 0 wrote, with the adapter in ``output_dir``."""
    import shutil

    from loop import components as c
    from loop import plugins

    options = updater.options.launch
    attempt = (runner.store.phase(ctx.round, "update") or {}).get("attempt") or 1
    folder = runner.run_dir / "launch" / f"round-{ctx.round}.attempt-{attempt}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    files = [name.removeprefix("file:") for name, _ in plugins.get_manager().list_name_plugin()
             if name and name.startswith("file:")]
    inputs = {
        "run_dir": str(runner.run_dir.resolve()), "round": ctx.round, "adapter": ctx.adapter,
        "policy_label": ctx.policy_label, "system": ctx.system, "model_path": runner.model_path,
        "lora_rank": ctx.lora_rank, "plugin_files": files, "parent_pid": os.getpid(),
        "runs_dir": str(runner.config.runs_dir),
    }
    (folder / INPUTS).write_text(json.dumps(inputs, indent=2))
    cmd = launch_command(options, folder / INPUTS, port=_free_port())
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    log_path = folder / LOG
    ctx.event(f"update launched: {options.num_processes} process(es), log {log_path}",
              command=" ".join(cmd))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, preexec_fn=_die_with_parent)
    seen = 0
    try:
        while proc.poll() is None:
            seen = _pass_progress(ctx, folder / PROGRESS, seen)
            time.sleep(0.2)
    finally:
        if proc.poll() is None:  # interrupted, timed out or failed here: stop the trainer
            _stop(proc)
    _pass_progress(ctx, folder / PROGRESS, seen)
    result_path = folder / RESULT
    if proc.returncode != 0 or not result_path.is_file():
        tail = _tail(log_path)
        raise PhaseFailed(
            f"round {ctx.round} update failed in the launched trainer (accelerate launch exited "
            f"with {proc.returncode}); its log is {log_path}; last lines:\n{tail}\n"
            f"`selfloop resume {runner.run_dir}` retries the phase", plugin=updater.plugin)
    data = json.loads(result_path.read_text())
    for e in data.get("events", []):
        ctx.event(e["message"], level=e.get("level", "info"), **e.get("data", {}))
    for k, v in data.get("reported", {}).items():
        ctx.metric(k, v)
    out = Path(output_dir)
    if out.exists():
        shutil.rmtree(out)
    os.replace(folder / "adapter", out)  # the same file system: the run folder
    steps = [c.TrainStep(**s) for s in data["steps"]]
    return c.UpdateResult(steps=steps, metrics=data["metrics"], reference=data.get("reference"))


def _stop(proc: subprocess.Popen) -> None:
    """Stop the launcher: SIGTERM first (torch's launcher passes it to the ranks, which
    run in sessions of their own), SIGKILL after 10 s; a rank left behind exits when it
    sees its launcher gone (``_watch_parent``)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def _pass_progress(ctx, path: Path, seen: int) -> int:
    """Forward the progress lines rank 0 appended since ``seen`` bytes; the new offset."""
    try:
        with open(path, "rb") as fh:
            fh.seek(seen)
            chunk = fh.read()
    except FileNotFoundError:
        return seen
    end = chunk.rfind(b"\n") + 1
    for line in chunk[:end].splitlines():
        try:
            p = json.loads(line)
        except ValueError:
            continue
        ctx.progress(p["done"], p.get("total"), **p.get("metrics", {}))
    return seen + end


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The log's last lines; when a rank raised, the end of the first such rank's
    traceback instead (torch's launcher ends the log with its own summary)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    all_lines = text.rstrip().splitlines()
    ranked = [x for x in all_lines if x.startswith("[rank") and "]: " in x]
    if ranked:
        first = ranked[0].split("]: ")[0]
        all_lines = [x for x in ranked if x.startswith(first + "]: ")]
    return "\n".join(all_lines[-lines:]) or "(empty log)"


# ---------------------------------------------------------------------------
# Child side: python -m loop.launch <inputs.json>, once per rank
# ---------------------------------------------------------------------------


def _watch_parent(pid: int) -> None:
    """Exit this rank when the run process is gone (SIGKILL of the run) or its launcher
    is (this process was handed to another parent)."""
    launcher = os.getppid()

    def watch():
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(70)
            except PermissionError:
                pass
            if os.getppid() != launcher:
                os._exit(70)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="selfloop-parent-watch").start()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    inputs_path = Path(argv[0])
    folder = inputs_path.parent
    inputs = json.loads(inputs_path.read_text())
    _watch_parent(int(inputs["parent_pid"]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from accelerate import PartialState

    from loop import plugins
    from loop.context import Context
    from loop.policy import Policy, resolve_device
    from loop.runner import _seed_everything, load_selection
    from loop.runs import DB_FILE, build_components, load_run_config
    from loop.store import Store

    run_dir = Path(inputs["run_dir"])
    config = load_run_config(run_dir)  # the database's copy: the authority, with any --set
    config.runs_dir = inputs["runs_dir"]
    m = config.model
    state = PartialState(cpu=resolve_device(m.device) == "cpu")
    me, world = rank()
    device = str(state.device) if world > 1 else m.device
    for f in inputs["plugin_files"]:
        plugins.load_plugin_file(f)
    comps = build_components(config)
    r = inputs["round"]
    updater = comps.updater_for(r)
    store = Store.open_readonly(run_dir / DB_FILE)
    events: list[dict] = []
    progress_file = folder / PROGRESS

    def progress(done, total=None, metrics=None):
        if me == 0:
            with open(progress_file, "a") as fh:
                fh.write(json.dumps({"done": done, "total": total, "metrics": metrics or {}}) + "\n")

    def event(message, level, data):
        events.append({"message": message, "level": level, "data": data})

    policy = Policy(inputs["model_path"], device=device, dtype=m.dtype,
                    trust_remote_code=m.trust_remote_code, threads=m.threads,
                    chat_template=m.chat_template, quantization=getattr(m, "quantization", None))
    ctx = Context(
        config=config, run_dir=run_dir, round=r, phase="update", adapter=inputs["adapter"],
        policy_label=inputs["policy_label"], store=store, generator=None, system=inputs["system"],
        cache_dir=Path(config.runs_dir) / ".cache", lora_rank=inputs["lora_rank"],
        _policy_factory=lambda: policy, _progress=progress, _event=event,
    )
    try:
        selection = load_selection(store, r)
        _seed_everything(ctx.seed)
        updater.setup(ctx)
        out = folder / ("adapter" if me == 0 else f"rank-{me}.discard")
        result = updater.update(ctx, selection, str(out))
    finally:
        store.close()
    if me == 0:
        data = {
            "steps": [{"step": s.step, "loss": s.loss, "learning_rate": s.learning_rate,
                       "grad_norm": s.grad_norm, "metrics": s.metrics} for s in result.steps],
            "metrics": result.metrics, "reference": result.reference,
            "reported": ctx.reported, "events": events,
        }
        _write_atomic(folder / RESULT, json.dumps(data))
    else:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
