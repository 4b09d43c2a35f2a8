"""A judge that learns: a Bradley-Terry reward model trained each round on the run's own
preference data of earlier rounds, then scoring this round's candidates.

Config::

    [[judges]]
    name = "trained_rm"
    sources = []                 # stored pairs by source ("selector", a judge's label,
                                 # "revision", "spin"); empty: every stored pair
    from_judges = []             # also: best vs worst per prompt by these judges' scores
    margin = false               # Llama 2's margin term: the pair's stored score margin
    label_smoothing = 0.0        # Secrets of RLHF II's label smoothing
    heldout = 0.2                # share of pairs kept out of training, for rm/accuracy
    base = "policy"              # or a separate causal-LM folder for the reward model

This is the preference model of RLAIF's RL stage (Bai et al., 2022, "Constitutional AI",
sec. 4.1; Lee et al., 2023, "RLAIF"): the AI's preference labels (RL-CAI comparisons,
self-reward pairs, verifier pairs) train a reward model, which then scores the policy's
answers for the updater. Each round:

1. Pairs: the stored pairs of rounds before this one (``sources``), plus best-vs-worst
   pairs from ``from_judges``' stored scores; each pair is held out or trained on by a
   hash of its (chosen, rejected) ids, so the split is fixed across rounds.
2. Train a fresh LoRA on the base (or on ``base``'s model) plus a scalar head on the
   last token's hidden state with the Bradley-Terry loss (``losses.bradley_terry``),
   seeded from the run seed and the round (the shared loop, ``training.train``).
3. Held-out pair accuracy and loss are the round's ``rm/accuracy`` and ``rm/loss``.
4. The adapter and head are written to ``adapters/rm-round-<r>`` atomically (temp folder,
   then rename), like the policy's; a resumed judge phase trains the same one again.
5. Score every candidate: the head's value for (prompt, answer).

With fewer than ``min_pairs`` training pairs (round 1 has no earlier rounds) the judge
abstains for the round: an info event, ``rm/train_pairs`` = 0, no judgments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

import loop
from loop.policy import install_adapter
from plugins.sequences import hidden_pass
from plugins.updaters.losses import bradley_terry
from plugins.updaters.rl import load_head, save_head
from plugins.updaters.training import LoRAOptions, LoRAUpdater, encode, train

HEAD_FILE = "reward_head.safetensors"


class RMTrainOptions(LoRAOptions):
    """The reward model's training (LoRA fields as the updaters')."""

    learning_rate: float = Field(1e-3, ge=0.0)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    scheduler: Literal["linear", "cosine", "constant"] = "constant"
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16, gt=0.0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)


class TrainedRMJudge(loop.Judge):
    """Trains a Bradley-Terry reward model on earlier rounds' pairs; scores with it.

    Metrics (stored as is, not under the judge's label): ``rm/accuracy`` and ``rm/loss``
    on held-out pairs, ``rm/train_pairs``, ``rm/heldout_pairs``, ``rm/train_loss``.
    """

    name = "trained_rm"

    class Options(loop.Judge.Options):
        # Stored pairs to learn from, by their source; empty: every stored pair.
        sources: list[str] = Field(default_factory=list)
        # Judges (labels) whose stored scores also make best-vs-worst pairs per prompt.
        from_judges: list[str] = Field(default_factory=list)
        # Subtract the pair's stored score margin times margin_scale (Llama 2's margin).
        margin: bool = False
        margin_scale: float = Field(1.0, ge=0.0, description="weight of the stored score margin subtracted in the loss")
        # Label smoothing of the Bradley-Terry loss (assumed label-flip rate).
        label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
        # Share of pairs held out for rm/accuracy and rm/loss (0: no evaluation).
        heldout: float = Field(0.2, ge=0.0, lt=1.0)
        # Fewest training pairs worth a reward model; below it the judge abstains.
        min_pairs: int = Field(4, ge=1)
        # "policy": a LoRA on the run's base model; else a causal-LM folder of its own.
        base: str = "policy"
        # Candidates per scoring pass.
        score_batch_size: int = Field(32, ge=1)
        train: RMTrainOptions = Field(RMTrainOptions(), description="how the reward model is trained (LoRA, steps, learning rate)")

    def setup(self, ctx) -> None:
        self._policy = None
        if self.options.base != "policy":
            from loop.policy import Policy

            folder = Path(self.options.base).expanduser()
            if not folder.is_absolute() and getattr(ctx.config, "source_dir", None):
                folder = Path(ctx.config.source_dir) / folder
            if not (folder / "config.json").is_file():
                raise loop.UserError(f"judges: trained_rm.base: {folder} is not a model folder "
                                     "(no config.json); give a causal-LM folder or \"policy\"")
            m = ctx.config.model
            self._policy = Policy(str(folder), device=m.device, dtype=m.dtype,
                                  trust_remote_code=m.trust_remote_code)

    def _ctx(self, ctx):
        """The context with the reward model's own base, when it has one."""
        if self._policy is None:
            return ctx
        return dataclasses.replace(ctx, _policy_factory=lambda: self._policy)

    # -- data ----------------------------------------------------------------------

    def pairs(self, ctx) -> list[dict]:
        """Earlier rounds' preference pairs: prompt text/system, chosen, rejected, margin."""
        opts = self.options
        rows = []
        if not opts.from_judges or opts.sources:
            sql = ("select p.id, p.chosen_id, p.rejected_id, p.margin, p.source, pr.text as prompt, "
                   "pr.system as system, c.text as chosen, r.text as rejected from pairs p "
                   "join prompts pr on pr.id = p.prompt_id join candidates c on c.id = p.chosen_id "
                   "join candidates r on r.id = p.rejected_id where p.round < ? order by p.id")
            for row in ctx.store.rows(sql, [ctx.round]):
                if not opts.sources or row["source"] in opts.sources:
                    rows.append(dict(row))
        for label in opts.from_judges:
            rows += self._judge_pairs(ctx, label)
        seen, out = set(), []
        for row in rows:
            key = (row["chosen_id"], row["rejected_id"])
            if key not in seen and row["chosen"] != row["rejected"]:
                seen.add(key)
                out.append(row)
        return out

    def _judge_pairs(self, ctx, label: str) -> list[dict]:
        sql = ("select c.id, c.prompt_id, c.text, pr.text as prompt, pr.system as system, "
               "avg(j.score) as score from judgments j join candidates c on c.id = j.candidate_id "
               "join prompts pr on pr.id = c.prompt_id where j.round < ? and j.judge = ? "
               "and j.score is not null group by c.id order by c.id")
        by_prompt: dict[int, list[dict]] = {}
        for row in ctx.store.rows(sql, [ctx.round, label]):
            by_prompt.setdefault(row["prompt_id"], []).append(dict(row))
        out = []
        for group in by_prompt.values():
            ranked = sorted(group, key=lambda r: (-r["score"], len(r["text"]), r["id"]))
            best, worst = ranked[0], ranked[-1]
            if best["score"] > worst["score"]:
                out.append({"chosen_id": best["id"], "rejected_id": worst["id"], "prompt": best["prompt"],
                            "system": best["system"], "chosen": best["text"], "rejected": worst["text"],
                            "margin": best["score"] - worst["score"], "source": label})
        return out

    def _is_heldout(self, row) -> bool:
        if self.options.heldout <= 0:
            return False
        digest = hashlib.sha256(f"{row['chosen_id']}:{row['rejected_id']}".encode()).digest()
        return int.from_bytes(digest[:4], "little") / 2**32 < self.options.heldout

    # -- the judge -----------------------------------------------------------------

    def judge(self, ctx, candidates: list[loop.Candidate]) -> loop.JudgeResult:
        opts = self.options
        rows = self.pairs(ctx)
        held = [r for r in rows if self._is_heldout(r)]
        train_rows = [r for r in rows if not self._is_heldout(r)]
        ctx.metric("rm/train_pairs", len(train_rows))
        ctx.metric("rm/heldout_pairs", len(held))
        if len(train_rows) < opts.min_pairs:
            ctx.event(f"{self.label}: {len(train_rows)} preference pairs from earlier rounds "
                      f"(min_pairs = {opts.min_pairs}); the reward model abstains this round")
            return loop.JudgeResult()
        rm_ctx = self._ctx(ctx)
        folder = self._train(rm_ctx, train_rows)
        head = load_head(Path(folder) / HEAD_FILE, rm_ctx.policy().device)
        if held:
            chosen = self._score(rm_ctx, folder, head, [(r["prompt"], r["system"], r["chosen"]) for r in held])
            rejected = self._score(rm_ctx, folder, head, [(r["prompt"], r["system"], r["rejected"]) for r in held])
            margin = self._margins(held, chosen.device)
            ctx.metric("rm/accuracy", (chosen > rejected).float().mean().item())
            ctx.metric("rm/loss", bradley_terry(chosen, rejected, margin=margin,
                                                label_smoothing=opts.label_smoothing).mean().item())
        scores = self._score(rm_ctx, folder, head, [(c.prompt, None, c.text) for c in candidates])
        return loop.JudgeResult(judgments=[
            loop.Judgment(candidate=c, score=float(s), raw="", meta={"rm_adapter": Path(folder).name})
            for c, s in zip(candidates, scores.tolist())
        ])

    def _margins(self, rows, device):
        if not self.options.margin:
            return None
        return torch.tensor([self.options.margin_scale * float(r["margin"] or 0.0) for r in rows],
                            device=device)

    def _encode(self, ctx, items):
        tok = ctx.policy().tokenizer
        out = []
        for prompt, system, text in items:
            p = prompt if isinstance(prompt, loop.Prompt) else loop.Prompt(text=prompt, system=system)
            out.append(encode(tok, p, text, ctx.system, self.options.train.max_length))
        return out

    def _train(self, ctx, rows) -> str:
        opts = self.options
        trainer = LoRAUpdater(opts.train)
        policy = ctx.policy()
        enc_c = self._encode(ctx, [(r["prompt"], r["system"], r["chosen"]) for r in rows])
        enc_r = self._encode(ctx, [(r["prompt"], r["system"], r["rejected"]) for r in rows])
        hidden = policy.base.config.hidden_size
        torch.manual_seed(ctx.derive_seed(self.label, "head"))
        head = torch.nn.Linear(hidden, 1).to(policy.device)
        torch.nn.init.normal_(head.weight, std=1.0 / (hidden + 1) ** 0.5)
        torch.nn.init.zeros_(head.bias)
        margins = self._margins(rows, "cpu")
        pad = policy.tokenizer.pad_token_id

        def micro(model, mb):
            flat = [enc_c[i] for i in mb] + [enc_r[i] for i in mb]
            out = hidden_pass(model, [p for p, _ in flat], [r for _, r in flat], pad, policy.device,
                              logps=False)
            reward = head(out["hidden_last"].float()).squeeze(-1)
            rc, rr = reward[: len(mb)], reward[len(mb):]
            m = margins[mb].to(rc.device) if margins is not None else None
            losses = bradley_terry(rc, rr, margin=m, label_smoothing=opts.label_smoothing)
            return losses, {"rm/train_accuracy": (rc > rr).float().sum().item()}

        adapters = Path(ctx.run_dir) / "adapters"
        adapters.mkdir(parents=True, exist_ok=True)
        final, tmp = adapters / f"rm-round-{ctx.round}", adapters / f".rm-round-{ctx.round}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a killed attempt
        gen = ctx.generator
        if gen is not None:
            gen.release(ctx)
        try:
            lengths = [len(a[0]) + len(a[1]) + len(b[1]) for a, b in zip(enc_c, enc_r)]
            steps = train(trainer, ctx, len(rows), micro, lengths=lengths, init_from=None,
                          extra_params=list(head.parameters()))
            policy.save_adapter(str(tmp))
            save_head(head, tmp / HEAD_FILE)
        finally:
            if gen is not None:
                gen.reclaim(ctx)
        ctx.metric("rm/train_loss", steps[-1].loss)
        install_adapter(str(tmp), str(final))
        return str(final)

    def _score(self, ctx, folder: str, head, items) -> torch.Tensor:
        policy = ctx.policy()
        enc = self._encode(ctx, items)
        pad = policy.tokenizer.pad_token_id
        out = []
        with policy.using(folder) as model, torch.no_grad():
            model.eval()
            for s in range(0, len(enc), self.options.score_batch_size):
                chunk = enc[s : s + self.options.score_batch_size]
                h = hidden_pass(model, [p for p, _ in chunk], [r for _, r in chunk], pad, policy.device,
                                logps=False)["hidden_last"]
                out.append(head(h.float()).squeeze(-1).cpu())
        return torch.cat(out) if out else torch.zeros(0)


@loop.hookimpl
def register_judges(register):
    register(TrainedRMJudge)
