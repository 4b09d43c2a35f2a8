"""Our DPO updater against TRL's DPOTrainer, side by side, on the same model and pairs.

    python bench/dpo_vs_trl.py                      # both models, 3 runs each side
    python bench/dpo_vs_trl.py --models 30M --repeats 5 --gradient-checkpointing
    python bench/dpo_vs_trl.py --models 30M --contend    # beside one busy process

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

Thread policy: ours runs with selfloop's (``loop/threads.py``: a bounded ``GOMP_SPINCOUNT``
before torch loads, threads from the available cores, lowered while other processes
use some of them), TRL with its defaults (torch's thread count, libgomp's spinning);
``--same-policy`` gives TRL our spin, count and malloc settings (the governor only watches our policy
model), ``--threads N`` fixes both counts. ``--contend [N]`` starts N processes (default 1) that spin on one core
each (the last cores this process may use) for the whole bench: a fixed, reproducible
competing load. Beside each wall time: CPU seconds (the child's user + system, its own
children included) and the 1-minute load average at the run's end.

Throughput: the update's useful work is counted as the issue does, 4·N·tokens for the
LoRA pass (forward, and the backward to the activations) and 2·N·tokens for the
reference pass, N the model's parameters, tokens each pair's prompt once plus both
responses; divided by each side's wall time, against the float32 matmul peak measured
in the same run (the best of several 2048x2048 ``torch.mm``, same threads, same load).
Memory: peak RSS (``ru_maxrss``) of each process and its rise above the RSS after the
model loaded (what the update itself adds).
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

# The wait policy the bench was started with (tests/conftest.py, imported for the
# tokenizer, sets the test suite's in this process; no child may inherit that).
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # loop/threads.py's
STARTED_WAIT = {k: os.environ[k] for k in WAIT_VARIABLES if k in os.environ}
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


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_ours(args, model_dir: str) -> dict:
    import torch

    import loop
    from loop.context import Context
    from loop.policy import Policy
    from plugins.updaters.dpo import DPOUpdater

    if args.threads:  # a fixed count: the governor stays off, as with [model] threads
        os.environ["SELFLOOP_THREADS"] = str(args.threads)
    policy = Policy(model_dir, device="cpu", dtype="float32")
    policy.base, policy.tokenizer  # load before timing (applies the thread count)
    importlib.import_module("peft")  # imported before timing, as TRL's own imports are
    loaded_rss = rss_mb()
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
            "steps": len(result.steps), "threads": torch.get_num_threads(), "loaded_rss_mb": loaded_rss}


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
        if args.same_policy:
            from loop.threads import apply

            apply(None)
        if args.threads:
            torch.set_num_threads(args.threads)
        loaded_rss = rss_mb()
        start, cpu = time.perf_counter(), cpu_seconds()
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=lora)
        trainer.train()
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"wall": wall, "cpu": cpu, "loss0": losses[0], "loss_last": losses[-1], "steps": len(losses),
            "threads": torch.get_num_threads(), "loaded_rss_mb": loaded_rss}


def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children so far: less
    sensitive than wall time to other jobs on a shared box (threads waiting for a core do
    not count; threads spinning while they wait do)."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def run_peak(args) -> dict:
    """The float32 matmul peak here and now: best of 2048x2048 torch.mm, in GFLOP/s."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(8):
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return {"gflops": best, "threads": torch.get_num_threads()}


def child(args):
    if args.child == "ours" or args.same_policy:
        from loop import malloc
        from loop.threads import early_env

        early_env()  # what the selfloop CLI does before anything imports torch
        malloc.tune()  # and before its first tensors (loop/malloc.py)
    if args.child == "peak":
        out = run_peak(args)
    else:
        fn = run_ours if args.child == "ours" else run_trl
        out = fn(args, args.model_dir)
        out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load1"] = os.getloadavg()[0]
    out["wait_policy"] = " ".join(f"{k}={os.environ[k]}" for k in WAIT_VARIABLES
                                  if k in os.environ) or "libgomp's default"
    if args.child == "ours":
        from loop import malloc, threads

        state = malloc.describe()
        out["malloc"] = "tuned" if state["tuned"] else f"glibc's default ({state['why']})"
        gov = threads.describe()["governor"]
        out["governor"] = gov and f"lowest {gov['lowest']} of {gov['ceiling']}, {gov['changes']} changes"
    print("RESULT " + json.dumps(out), flush=True)


def pair_tokens(n: int) -> list[int]:
    """Tokens of each pair as our packing runs it: the prompt once, both responses."""
    from conftest import build_tokenizer
    from plugins.sequences import encode_prompt, encode_response

    tok = build_tokenizer()
    return [len(encode_prompt(tok, [{"role": "user", "content": q}])) + len(encode_response(tok, g))
            + len(encode_response(tok, b)) for q, g, b in pairs(n)]


def contenders(count: int) -> list[subprocess.Popen]:
    """``count`` processes spinning in pure Python, each pinned to one of the last cores
    this process may use: the fixed competing load of ``--contend``."""
    cores = sorted(os.sched_getaffinity(0))
    procs = []
    for i in range(count):
        core = cores[-1 - i % len(cores)]
        procs.append(subprocess.Popen(
            [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"]))
    return procs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,30M")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both (default: each side's own policy)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the fastest counts")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="on for both (TRL's default)")
    ap.add_argument("--contend", type=int, nargs="?", const=1, default=0,
                    help="start N processes (default 1) spinning on one core each for the whole bench")
    ap.add_argument("--same-policy", action="store_true",
                    help="give TRL selfloop's thread policy too (loop/threads.py)")
    ap.add_argument("--child", choices=["ours", "trl", "peak"])
    ap.add_argument("--model-dir")
    args = ap.parse_args()
    if args.child:
        return child(args)
    spinners = contenders(args.contend)
    try:
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
        peak = run_child(args, "peak", "", "peak")
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    tokens = sum(pair_tokens(args.pairs))
    o_policy = rows[0][2]["ours"][0]
    t_policy = rows[0][2]["trl"][0]
    print(f"{args.steps} steps, batch {args.batch_size} pairs, {args.pairs} pairs, lr {args.lr}, LoRA r=8 on "
          f"{len(TARGETS)} projections, sigmoid loss, beta 0.1, CPU, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} for both, "
          f"{args.repeats} alternating runs each (wall and CPU: fastest run; speed-up: of the fastest "
          f"runs, and the range of the per-repeat ratios)")
    print(f"threads: ours {o_policy['threads']} ({o_policy['wait_policy']}; thread governor: "
          f"{o_policy.get('governor') or 'off'}; malloc {o_policy.get('malloc')}), TRL "
          f"{t_policy['threads']} ({t_policy['wait_policy']}); competing spinners: "
          f"{args.contend}; cores available: {len(os.sched_getaffinity(0))}; load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"float32 matmul peak (2048x2048 torch.mm, {peak['threads']} threads, same load): "
          f"{peak['gflops']:.1f} GFLOP/s; CPU seconds of all children (spinners included): "
          f"{children.ru_utime + children.ru_stime:.1f}")
    print("| model | params | ours s | TRL s | speed-up | per-repeat | CPU s ours | CPU s TRL | CPU ratio "
          "| load1 ours | load1 TRL | GFLOP/s ours | GFLOP/s TRL | ours % peak "
          "| peak RSS MB ours | TRL | update's RSS rise MB ours | TRL "
          "| loss@0 ours | loss@0 TRL | last loss ours | last loss TRL |")
    print("|---" * 21 + "|")
    for kind, params, runs in rows:
        o = min(runs["ours"], key=lambda r: r["wall"])
        t = min(runs["trl"], key=lambda r: r["wall"])
        ratios = [b["wall"] / a["wall"] for a, b in zip(runs["ours"], runs["trl"])]
        cpu_o = min(r["cpu"] for r in runs["ours"])
        cpu_t = min(r["cpu"] for r in runs["trl"])
        rss_o = max(r["maxrss_mb"] for r in runs["ours"])
        rss_t = max(r["maxrss_mb"] for r in runs["trl"])
        rise_o = max(r["maxrss_mb"] - r["loaded_rss_mb"] for r in runs["ours"])
        rise_t = max(r["maxrss_mb"] - r["loaded_rss_mb"] for r in runs["trl"])
        # 4·N·tokens per pair trained (steps x batch pairs), 2·N·tokens for the reference
        trained = tokens * args.steps * args.batch_size / args.pairs
        flops = 4 * params * trained + 2 * params * tokens
        g_o, g_t = flops / o["wall"] / 1e9, flops / t["wall"] / 1e9
        print(f"| {kind} | {params / 1e6:.1f}M | {o['wall']:.1f} | {t['wall']:.1f} | {t['wall'] / o['wall']:.2f}x | "
              f"{min(ratios):.2f}-{max(ratios):.2f}x | {cpu_o:.1f} | {cpu_t:.1f} | {cpu_t / cpu_o:.2f}x | "
              f"{o['load1']:.2f} | {t['load1']:.2f} | {g_o:.1f} | {g_t:.1f} | {100 * g_o / peak['gflops']:.0f}% | "
              f"{rss_o:.0f} | {rss_t:.0f} | {rise_o:.0f} | {rise_t:.0f} | {o['loss0']:.6f} | {t['loss0']:.6f} | "
              f"{o['loss_last']:.4f} | {t['loss_last']:.4f} |")
        assert abs(o["loss0"] - t["loss0"]) < 1e-4, "step-0 losses disagree"


def run_child(args, who: str, folder: str, kind: str) -> dict:
    cmd = [sys.executable, __file__, "--child", who, "--model-dir", folder, "--steps", str(args.steps),
           "--pairs", str(args.pairs), "--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    cmd += ["--same-policy"] if args.same_policy else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    for key in WAIT_VARIABLES:
        env.pop(key, None)
    env.update(STARTED_WAIT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"{who} on {kind} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[0][7:])


if __name__ == "__main__":
    main()
