"""Our DPO updater against TRL's DPOTrainer, side by side, on the same model and pairs.

    /tmp/trlvenv/bin/python bench/dpo_vs_trl.py            # both models, 3 runs each side
    /tmp/trlvenv/bin/python bench/dpo_vs_trl.py --models 30M --repeats 5 --gradient-checkpointing

Needs the ``bench`` extra (``pip install -e .[bench]``: trl). For each model (the tests'
tiny Llama and a ~30M-parameter LlamaForCausalLM, both built in-process from a config,
random weights) it trains with ``plugins.updaters.dpo`` and with TRL's DPOTrainer
(``precompute_ref_log_probs=True``, otherwise its defaults), each run in its own
subprocess, with the same pairs, LoRA configuration, batch size, steps, learning rate
(constant, no warm-up) and sigmoid loss, gradient checkpointing off for both unless
--gradient-checkpointing (TRL's default is on). The two sides alternate ``--repeats``
times (who goes first alternates too), so a burst of load on a shared machine hits
both. It prints the wall time of each (reference pass + training, after the model is
loaded; the fastest run counts), the per-repeat ratios, the CPU seconds of each (less
sensitive to other jobs), the peak resident memory of each process (``ru_maxrss``), and
the loss of step 0, which must agree.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "30M": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=8),
}


def build(kind: str, folder: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
                         **SIZES[kind])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def pairs(n: int):
    import random

    rng = random.Random(0)
    out = []
    for i in range(n):
        letters = rng.sample("abcdefghijklmnop", rng.randint(3, 7))
        good = " ".join(sorted(letters))
        bad = " ".join(letters) + " " + "".join(rng.choices("xyz", k=rng.randint(0, 12)))
        out.append((f"Sort the letters: {' '.join(letters)}", good, bad))
    return out


def run_ours(args, model_dir: str) -> dict:
    import torch

    import loop
    from loop.context import Context
    from loop.policy import Policy
    from plugins.updaters.dpo import DPOUpdater

    policy = Policy(model_dir, device="cpu", dtype="float32")
    policy.base, policy.tokenizer  # load before timing
    importlib.import_module("peft")  # imported before timing, as TRL's own imports are
    sel = []
    for i, (q, good, bad) in enumerate(pairs(args.pairs)):
        p = loop.Prompt(text=q, id=i)
        sel.append(loop.Pair(prompt=p, chosen=loop.Candidate(prompt=p, text=good), rejected=loop.Candidate(prompt=p, text=bad)))
    opts = DPOUpdater.Options(loss="sigmoid", beta=0.1, learning_rate=args.lr, max_steps=args.steps,
                              batch_size=args.batch_size, warmup_ratio=0.0, scheduler="constant",
                              lora_r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, max_length=256,
                              gradient_checkpointing=args.gradient_checkpointing)
    ctx = Context(config=types.SimpleNamespace(seed=0, source_dir=None), run_dir=Path("."), round=1,
                  phase="update", adapter=None, policy_label="base", store=None,
                  _policy_factory=lambda: policy)
    with tempfile.TemporaryDirectory() as out:
        start, cpu = time.perf_counter(), cpu_seconds()
        result = DPOUpdater(opts).update(ctx, loop.Selection(pairs=sel), out)
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return {"wall": wall, "cpu": cpu, "loss0": result.steps[0].loss, "loss_last": result.steps[-1].loss,
            "steps": len(result.steps), "threads": torch.get_num_threads()}


def run_trl(args, model_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": g}],
         "rejected": [{"role": "assistant", "content": b}]}
        for q, g, b in pairs(args.pairs)
    ])
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                           learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, beta=0.1,
                           loss_type=["sigmoid"], precompute_ref_log_probs=True, logging_steps=1,
                           save_strategy="no", report_to=[], use_cpu=True, bf16=False, max_length=256,
                           dataloader_num_workers=0, seed=0, disable_tqdm=True, max_grad_norm=1.0,
                           weight_decay=0.0, gradient_checkpointing=args.gradient_checkpointing)
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                          task_type="CAUSAL_LM")
        start, cpu = time.perf_counter(), cpu_seconds()
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=lora)
        trainer.train()
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"wall": wall, "cpu": cpu, "loss0": losses[0], "loss_last": losses[-1], "steps": len(losses),
            "threads": torch.get_num_threads()}


def cpu_seconds() -> float:
    """User + system CPU time of this process so far: less sensitive than wall time to
    other jobs on a shared box (threads waiting for a core do not count)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(args):
    import torch

    torch.set_num_threads(args.threads)
    fn = run_ours if args.child == "ours" else run_trl
    out = fn(args, args.model_dir)
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,30M")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the fastest counts")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="on for both (TRL's default)")
    ap.add_argument("--child", choices=["ours", "trl"])
    ap.add_argument("--model-dir")
    args = ap.parse_args()
    if args.child:
        return child(args)
    rows = []
    for kind in args.models.split(","):
        with tempfile.TemporaryDirectory() as folder:
            params = build(kind, Path(folder))
            runs = {"ours": [], "trl": []}
            for rep in range(args.repeats):
                # Alternate who goes first, so a burst of load on the shared box hits both.
                for who in ("ours", "trl") if rep % 2 == 0 else ("trl", "ours"):
                    runs[who].append(run_child(args, who, folder, kind))
            rows.append((kind, params, runs))
    print(f"{args.steps} steps, batch {args.batch_size} pairs, {args.pairs} pairs, lr {args.lr}, LoRA r=8 on "
          f"{len(TARGETS)} projections, sigmoid loss, beta 0.1, CPU, {args.threads} threads, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} for both, "
          f"{args.repeats} alternating runs each (wall and CPU: fastest run; speed-up: of the fastest "
          f"runs, and the range of the per-repeat ratios)")
    print("| model | params | ours s | TRL s | speed-up | per-repeat | CPU s ours | CPU s TRL | CPU ratio "
          "| ours peak RSS MB | TRL peak RSS MB | loss@0 ours | loss@0 TRL | last loss ours | last loss TRL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, params, runs in rows:
        o = min(runs["ours"], key=lambda r: r["wall"])
        t = min(runs["trl"], key=lambda r: r["wall"])
        ratios = [b["wall"] / a["wall"] for a, b in zip(runs["ours"], runs["trl"])]
        cpu_o = min(r["cpu"] for r in runs["ours"])
        cpu_t = min(r["cpu"] for r in runs["trl"])
        rss_o = max(r["maxrss_mb"] for r in runs["ours"])
        rss_t = max(r["maxrss_mb"] for r in runs["trl"])
        print(f"| {kind} | {params / 1e6:.1f}M | {o['wall']:.1f} | {t['wall']:.1f} | {t['wall'] / o['wall']:.2f}x | "
              f"{min(ratios):.2f}-{max(ratios):.2f}x | {cpu_o:.1f} | {cpu_t:.1f} | {cpu_t / cpu_o:.2f}x | "
              f"{rss_o:.0f} | {rss_t:.0f} | {o['loss0']:.6f} | {t['loss0']:.6f} | "
              f"{o['loss_last']:.4f} | {t['loss_last']:.4f} |")
        assert abs(o["loss0"] - t["loss0"]) < 1e-4, "step-0 losses disagree"


def run_child(args, who: str, folder: str, kind: str) -> dict:
    cmd = [sys.executable, __file__, "--child", who, "--model-dir", folder, "--steps", str(args.steps),
           "--pairs", str(args.pairs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
           "--threads", str(args.threads)] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"{who} on {kind} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[0][7:])


if __name__ == "__main__":
    main()
