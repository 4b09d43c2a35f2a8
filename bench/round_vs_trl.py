"""One whole self-rewarding round: selfloop against a plain transformers + TRL script.

    python bench/round_vs_trl.py                      # 96 prompts, the demo's settings
    python bench/round_vs_trl.py --prompts 16 --steps 4 --threads 2

The round (Self-Rewarding Language Models, Yuan et al. 2024): answer each prompt n=4
times, have the same model grade every answer with the rubric twice, pair each prompt's
best answer against its worst (ties dropped), train DPO with LoRA on the pairs. Both sides
use the demo's tiny model (configs/demo.toml; built and seed-trained on first use, cached
under ``--runs-dir``/.cache, before anything is timed) and its settings:

- **selfloop**: ``python -m loop run configs/demo.toml`` for one round in a subprocess,
  evaluators off, the real CLI and loop (store, phases, hf generator, self_reward judge,
  pairs selector, dpo updater);
- **peer**: a straightforward script in a second subprocess: ``model.generate`` in
  batches for the answers, the same rubric (``prompts/tinyworld_judge.j2``, the same
  ``Score: N`` parser) through ``model.generate`` for the grades, best-vs-worst pairs,
  TRL's ``DPOTrainer`` with the same LoRA, beta, learning rate, batch size and steps.

The peer answers the very prompts selfloop's round answered (read from its run.db). Each
side's wall time is its whole subprocess (start-up, imports and model load included) and,
inside it, its parts; CPU seconds are the subprocess's user + system time. Printed: both,
the ratio peer / selfloop (above 1: selfloop is faster), the pairs each trained on and the
load average. Sampling differs between the two (different random streams), so the pair
counts may differ a little; the work per phase is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_selfloop(args, runs: Path) -> dict:
    cmd = [sys.executable, "-m", "loop", "run", str(ROOT / "configs" / "demo.toml"), "--progress", "off",
           "--set", "rounds=1", "--set", f"runs_dir={runs}", "--set", f"prompts.0.per_round={args.prompts}",
           "--set", "evaluators=[]", "--set", f"updater.max_steps={args.steps}",
           "--set", f"model.threads={args.threads}", "--set", "name=round"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    c0, t0 = children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall, cpu = time.perf_counter() - t0, children_cpu() - c0
    if proc.returncode != 0:
        sys.exit(f"selfloop run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    db = sqlite3.connect(runs / "round" / "run.db")
    phases = dict(db.execute("select phase, seconds from phases where round = 1").fetchall())
    prompts = [t for (t,) in db.execute(
        "select p.text from round_prompts r join prompts p on p.id = r.prompt_id "
        "where r.round = 1 order by r.position")]
    config = json.loads(db.execute("select config from runs").fetchone()[0])
    pairs = db.execute("select count(*) from pairs where round = 1 and selected = 1").fetchone()[0]
    model_path = db.execute("select model_path from runs").fetchone()[0]
    db.close()
    return {"wall": wall, "cpu": cpu, "phases": phases, "prompts": prompts, "config": config,
            "pairs": pairs, "model_path": model_path}


def run_peer(args, job: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(job), "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    c0, t0 = children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall, cpu = time.perf_counter() - t0, children_cpu() - c0
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"peer script failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return {"wall": wall, "cpu": cpu, **json.loads(lines[-1][len("RESULT "):])}


# -- the peer: a plain script over transformers and TRL -------------------------------


def peer(job_path: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from loop.templates import load_template, quote
    from plugins.judges.self_reward import parse_score

    job = json.loads(Path(job_path).read_text())
    cfg, prompts = job["config"], job["prompts"]
    gen, judge, upd = cfg["generate"], cfg["judges"][0], cfg["updater"]
    parts = {}
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(job["model_path"])
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(job["model_path"], dtype=torch.float32)
    model.eval()
    parts["load"] = time.perf_counter() - t0

    def sample(chats, n, temperature, top_p, max_new_tokens, batch_size):
        texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        out = []
        for s in range(0, len(texts), batch_size):
            enc = tok(texts[s:s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                ids = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                                     max_new_tokens=max_new_tokens, num_return_sequences=n,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new = tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [new[i:i + n] for i in range(0, len(new), n)]
        return out

    torch.manual_seed(0)
    t0 = time.perf_counter()
    answers = sample([[{"role": "user", "content": p}] for p in prompts], gen["n"], gen["temperature"],
                     gen["top_p"], gen["max_new_tokens"], cfg["generator"]["batch_size"])
    parts["generate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rubric = load_template(judge["template"], {"prompt", "response"})
    flat = [(i, a) for i, group in enumerate(answers) for a in group]
    chats = [[{"role": "user", "content": rubric.render(prompt=quote(prompts[i]), response=quote(a))}]
             for i, a in flat]
    grades = sample(chats, judge["samples"], judge["temperature"], judge["top_p"],
                    judge["max_new_tokens"], judge["batch_size"])
    scored: dict[int, list[tuple[float, str]]] = {}
    for (i, a), texts in zip(flat, grades):
        valid = [s for s in (parse_score(t, judge["min_score"], judge["max_score"]) for t in texts)
                 if s is not None]
        if valid:
            scored.setdefault(i, []).append((sum(valid) / len(valid), a))
    rows = []
    for i, group in scored.items():
        best = max(group, key=lambda x: (x[0], -len(x[1])))
        worst = min(group, key=lambda x: (x[0], -len(x[1])))
        if best[0] > worst[0]:
            rows.append({"prompt": [{"role": "user", "content": prompts[i]}],
                         "chosen": [{"role": "assistant", "content": best[1]}],
                         "rejected": [{"role": "assistant", "content": worst[1]}]})
    parts["judge"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tok.padding_side = "right"
    loss = None
    if rows:
        with tempfile.TemporaryDirectory() as out:
            config = DPOConfig(output_dir=out, per_device_train_batch_size=upd["batch_size"],
                               max_steps=upd["max_steps"], learning_rate=upd["learning_rate"],
                               lr_scheduler_type="constant", warmup_steps=0, beta=upd["beta"],
                               loss_type=["sigmoid"], precompute_ref_log_probs=True, logging_steps=1,
                               save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                               max_length=256, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                               gradient_checkpointing=False)
            lora = LoraConfig(r=upd["lora_r"], lora_alpha=upd["lora_alpha"], lora_dropout=upd["lora_dropout"],
                              target_modules=upd["target_modules"], bias="none", task_type="CAUSAL_LM")
            model.train()
            trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                 processing_class=tok, peft_config=lora)
            trainer.train()
            trainer.save_model(str(Path(job_path).parent / "peer-adapter"))
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            loss = losses[-1] if losses else None
    parts["update"] = time.perf_counter() - t0
    print("RESULT " + json.dumps({"parts": parts, "pairs": len(rows), "loss_last": loss,
                                  "threads": torch.get_num_threads()}), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=96, help="prompts in the round (the demo: 96)")
    ap.add_argument("--steps", type=int, default=30, help="DPO steps (the demo: 30)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs"), help="its .cache holds the demo's model")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        peer(args.child, args.threads)
        return 0
    from plugins.tinyworld.model import build

    cache = Path(args.runs_dir).resolve() / ".cache"
    print(f"the demo's model: {build(cache)} (built now if it was not cached; not timed)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        runs.mkdir()
        (runs / ".cache").symlink_to(cache, target_is_directory=True)
        load0 = os.getloadavg()
        ours = run_selfloop(args, runs)
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({k: ours[k] for k in ("config", "prompts", "model_path")}))
        theirs = run_peer(args, job)
        load1 = os.getloadavg()
    n = ours["config"]["generate"]["n"]
    print(f"one round: {len(ours['prompts'])} prompts x {n} answers, judge samples "
          f"{ours['config']['judges'][0]['samples']}, DPO {args.steps} steps, {args.threads} threads")
    print(f"  selfloop  wall {ours['wall']:7.1f} s  cpu {ours['cpu']:7.1f} s  pairs {ours['pairs']:4d}  "
          "phases " + ", ".join(f"{k} {v:.1f}" for k, v in ours["phases"].items() if v is not None))
    print(f"  peer      wall {theirs['wall']:7.1f} s  cpu {theirs['cpu']:7.1f} s  pairs {theirs['pairs']:4d}  "
          "parts " + ", ".join(f"{k} {v:.1f}" for k, v in theirs["parts"].items()))
    outside = ours["wall"] - sum(v for v in ours["phases"].values() if v is not None)
    print(f"  (selfloop's generate phase includes loading the model and wrapping it in PEFT, the "
          f"peer's 'load' part; outside its phases: {outside:.1f} s of start-up, imports and "
          "store)")
    print(f"peer / selfloop: wall {theirs['wall'] / ours['wall']:.2f}x   cpu {theirs['cpu'] / ours['cpu']:.2f}x"
          "   (above 1: selfloop is faster)")
    print(f"loadavg before {' '.join(f'{x:.2f}' for x in load0)}  after {' '.join(f'{x:.2f}' for x in load1)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
