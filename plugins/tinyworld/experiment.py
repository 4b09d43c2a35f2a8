"""Self-rewarding rounds on tinyworld, in miniature, without the loop.

    PYTHONPATH=. python -m plugins.tinyworld.experiment [--seeds 0 1 2] [--rounds 3]

The proof that the embedded default world works: it builds the seed model, then runs the
Self-Rewarding recipe (Yuan et al. 2024, section 2) with plain torch + PEFT:

1. Evaluate: greedy answers to a fixed held-out set, checked by the verifier.
2. For each round: sample ``n`` answers per train prompt at temperature 1;
3. the same model judges every answer (the tinyworld judge template; the last
   ``Score:`` line of each sampled judgment, averaged over judge samples);
4. pair the best and the worst answer of each prompt (ties dropped);
5. train the LoRA adapter with the sigmoid DPO loss (Rafailov et al. 2023, eq. 7),
   the reference being the previous round's policy;
6. evaluate again. A table shows accuracy, judge agreement with the verifier, pairs and
   seconds per round.

Measured with the defaults (seed Recipe(), 96 prompts x 4 answers, 2 judge samples at
temperature 0.8, LoRA r=8 on all projections, DPO beta 0.1, lr 3e-4, 30 steps of 16
pairs), 2 threads: held-out accuracy by round (0 -> 3) was 0.435 -> 0.925 (seed 0),
0.270 -> 0.935 (seed 1) and 0.000 -> 0.915 (seed 2); seed builds 62 s, rounds 5-9 s.
Judge agreement with the verifier falls from ~0.85 to 0.4-0.75 by round 3 (the judge
shares the LoRA the policy trains), so longer runs may want a fresh look at the judge.

On a CPU shared with other busy processes, ``--threads 1`` can be much faster than 2.
"""

from __future__ import annotations

import argparse
import random
import re
import tempfile
import time

import torch
import torch.nn.functional as F

from plugins.tinyworld import task
from plugins.tinyworld.model import Recipe, build, collate, encode_chat, judge_prompt

SCORE_RE = re.compile(r"^Score:\s*([0-9]+(?:\.[0-9]+)?)\s*$")


def parse_score(text: str) -> float | None:
    """The loop's judge rule: the last line starting with ``Score:``, a number in 0..5."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("Score:")]
    if not lines:
        return None
    m = SCORE_RE.match(lines[-1])
    if m is None:
        return None
    value = float(m.group(1))
    return value if 0 <= value <= 5 else None


@torch.no_grad()
def generate(model, tok, users: list[str], *, n: int, temperature: float, max_new: int,
             batch: int = 256) -> list[list[str]]:
    """``n`` continuations per user message (greedy when ``temperature`` is 0)."""
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template([{"role": "user", "content": u}], add_generation_prompt=True,
                                tokenize=False)
        for u in users
    ]
    out: list[list[str]] = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        kwargs = dict(do_sample=True, temperature=temperature, top_p=1.0) if temperature > 0 \
            else dict(do_sample=False)
        seqs = model.generate(**enc, max_new_tokens=max_new, num_return_sequences=n,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                              **kwargs)
        new = seqs[:, enc["input_ids"].shape[1]:]
        decoded = tok.batch_decode(new, skip_special_tokens=True)
        out.extend(decoded[j : j + n] for j in range(0, len(decoded), n))
    return out


def evaluate(model, tok, heldout) -> float:
    answers = generate(model, tok, [p for p, _ in heldout], n=1, temperature=0.0, max_new=12)
    return sum(task.verify(p, a[0]) for (p, _), a in zip(heldout, answers)) / len(heldout)


def judge(model, tok, prompts, answers, *, samples: int, temperature: float):
    """Mean parsed score per answer (None if no sample parsed), and the raw judgments."""
    flat = [(p, a) for p, group in zip(prompts, answers) for a in group]
    judged = generate(model, tok, [judge_prompt(p, a) for p, a in flat], n=samples,
                      temperature=temperature, max_new=40)
    scores = []
    for outs in judged:
        parsed = [s for s in map(parse_score, outs) if s is not None]
        scores.append(sum(parsed) / len(parsed) if parsed else None)
    return flat, scores, judged


def seq_logps(model, tok, batch) -> torch.Tensor:
    """Sum of the answer tokens' log-probs, per sequence."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    mask = labels != -100
    tok_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok_logp * mask).sum(-1)


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float) -> torch.Tensor:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7): -log sigma(beta * (log-ratio margin))."""
    return -F.logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).mean()


def train_dpo(model, tok, pairs, *, steps: int, batch: int, lr: float, beta: float, seed: int):
    """DPO on (prompt, chosen, rejected) triples; the reference is the model as it is now."""
    enc = [(encode_chat(tok, p, c), encode_chat(tok, p, r)) for p, c, r in pairs]
    with torch.no_grad():
        ref = [(seq_logps(model, tok, collate(tok, [c])).item(),
                seq_logps(model, tok, collate(tok, [r])).item()) for c, r in enc]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            fresh = list(range(len(enc)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch], order[batch:]
        both = collate(tok, [enc[i][0] for i in idx] + [enc[i][1] for i in idx])
        lp = seq_logps(model, tok, both)
        k = len(idx)
        ref_c = torch.tensor([ref[i][0] for i in idx])
        ref_r = torch.tensor([ref[i][1] for i in idx])
        loss = dpo_loss(lp[:k], lp[k:], ref_c, ref_r, beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def best_vs_worst(prompts, answers, scores, n: int) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): the best and worst scored answer per prompt, ties dropped."""
    pairs = []
    for i, p in enumerate(prompts):
        group = [(scores[i * n + j], answers[i][j]) for j in range(n)
                 if scores[i * n + j] is not None]
        if len(group) < 2:
            continue
        best, worst = max(group), min(group)
        if best[0] > worst[0]:
            pairs.append((p, best[1], worst[1]))
    return pairs


def print_confusion(rnd: int, flat, scores, threshold: float) -> None:
    """Judge (score >= threshold) against the verifier, and a few disagreements."""
    conf: dict = {}
    for (p, a), sc in zip(flat, scores):
        key = (task.verify(p, a), None if sc is None else sc >= threshold)
        conf[key] = conf.get(key, 0) + 1
    print(f"round {rnd} (verified, judged right): {sorted(conf.items(), key=str)}")
    wrong = [(p, a, sc) for (p, a), sc in zip(flat, scores)
             if sc is not None and (sc >= threshold) != task.verify(p, a)]
    for p, a, sc in wrong[:6]:
        print(f"   {p!r} -> {a!r} judged {sc} rubric {task.rubric_score(p, a)}")


def run(seed: int, args, recipe: Recipe, cache_dir: str) -> list[dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    path = build(cache_dir, recipe.model_copy(update={"seed": seed}), log=None)
    build_s = time.time() - t0
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(seed)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                      "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    model.eval()
    heldout = task.heldout_set(args.heldout)
    rows = [{"round": 0, "accuracy": evaluate(model, tok, heldout), "agreement": None,
             "pairs": 0, "sampled": None, "pair_ok": None, "seconds": build_s}]
    for rnd in range(1, args.rounds + 1):
        t = time.time()
        rng = random.Random(f"{seed}-{rnd}")
        torch.manual_seed(seed * 1000 + rnd)
        prompts = [task.make_prompt(rng, "train")[0] for _ in range(args.prompts)]
        answers = generate(model, tok, prompts, n=args.n, temperature=1.0, max_new=12)
        flat, scores, _ = judge(model, tok, prompts, answers, samples=args.judge_samples,
                                temperature=args.judge_temperature)
        agree = [(s >= args.threshold) == task.verify(p, a)
                 for (p, a), s in zip(flat, scores) if s is not None]
        if args.verbose:
            print_confusion(rnd, flat, scores, args.threshold)
        pairs = best_vs_worst(prompts, answers, scores, args.n)
        if pairs:
            train_dpo(model, tok, pairs, steps=args.steps, batch=args.batch, lr=args.lr,
                      beta=args.beta, seed=seed * 1000 + rnd)
        rows.append({"round": rnd, "accuracy": evaluate(model, tok, heldout),
                     "agreement": sum(agree) / max(1, len(agree)), "pairs": len(pairs),
                     "sampled": sum(task.verify(p, a) for p, a in flat) / len(flat),
                     "pair_ok": sum(task.verify(p, c) and not task.verify(p, r)
                                    for p, c, r in pairs) / max(1, len(pairs)),
                     "seconds": time.time() - t})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=96, help="train prompts per round")
    ap.add_argument("--n", type=int, default=4, help="answers sampled per prompt")
    ap.add_argument("--judge-samples", type=int, default=2)
    ap.add_argument("--judge-temperature", type=float, default=0.8)
    ap.add_argument("--threshold", type=float, default=4.5, help="judge score counted as 'right'")
    ap.add_argument("--steps", type=int, default=30, help="DPO steps per round")
    ap.add_argument("--batch", type=int, default=16, help="pairs per DPO step")
    ap.add_argument("--lr", type=float, default=3e-4, help="DPO learning rate")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--cache-dir", default=None, help="where seed models are cached")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verbose", action="store_true", help="print judge confusion per round")
    ap.add_argument("--recipe", default="{}", help="JSON overrides of the seed Recipe")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe.model_validate_json(args.recipe)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="tinyworld-exp-")
    print(f"recipe: {recipe.model_dump()}  cache: {cache_dir}")
    for seed in args.seeds:
        rows = run(seed, args, recipe, cache_dir)
        print(f"\nseed {seed}")
        print(f"{'round':>5} {'accuracy':>9} {'agreement':>10} {'sampled':>8} {'pairs':>6} "
              f"{'pair_ok':>8} {'seconds':>8}")
        for r in rows:
            cols = [("-" if r[k] is None else f"{r[k]:.3f}") for k in ("agreement", "sampled")]
            ok = "-" if r["pair_ok"] is None else f"{r['pair_ok']:.3f}"
            print(f"{r['round']:>5} {r['accuracy']:>9.3f} {cols[0]:>10} {cols[1]:>8} "
                  f"{r['pairs']:>6} {ok:>8} {r['seconds']:>8.1f}")
        gain = rows[-1]["accuracy"] - rows[0]["accuracy"]
        print(f"gain: {100 * gain:+.1f} points (round 0 row's seconds = seed build)")


if __name__ == "__main__":
    main()
