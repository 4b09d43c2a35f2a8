"""What the online-RL updaters (``grpo``, ``ppo``) share: the data path from a round's
scored candidates to per-token tensors, and the no-gradient passes of the update's
start (the old policy's per-token log-probs, the reference's, PPO's old values), stored
in the run folder so a resumed update reads them back.

The data path:

1. The ``ranked`` selector gives every scored candidate of a prompt, grouped by prompt
   (prompts whose answers all scored the same are dropped: they carry no group-relative
   signal, DAPO's "dynamic sampling", Yu et al., 2025, sec. 3.2).
2. Each candidate is encoded as chat-template(prompt) + answer + EOS (``encode``).
3. At the start of the update, one pass without gradients under the policy that
   generated the candidates (``ctx.adapter``) gives the old per-token log-probs
   (``token_pass``); the reference's come from a second pass unless they equal them.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Literal, Sequence

import torch
from pydantic import Field

import loop
from plugins.sequences import hidden_pass, per_sequence, scored_token_logps
from plugins.updaters.training import LoRAOptions, encode, read_cache, require_selected, write_cache


class RLOptions(LoRAOptions):
    """Options shared by ``grpo`` and ``ppo`` (each extends them)."""

    # Candidates per optimizer step (one "mini-batch" of the round's rollouts).
    mini_batch: int = Field(16, ge=1)
    # Candidates per forward pass (gradients accumulate up to ``mini_batch``).
    batch_size: int = Field(16, ge=1)
    # PPO's clip range of the probability ratio (the lower one when clip_eps_high is set).
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0)
    # DAPO's decoupled upper clip (e.g. 0.28); None: the same as clip_eps.
    clip_eps_high: float | None = Field(None, gt=0.0)
    # The KL reference: the base model (the SFT start) or the previous round's policy.
    reference: Literal["base", "previous"] = "base"

    def plan_options(self):
        """The step plan's view: ``batch_size`` per pass, ``mini_batch`` per step."""
        size = min(self.batch_size, self.mini_batch)
        accum = -(-self.mini_batch // size)
        return self.model_copy(update={"batch_size": size, "grad_accum": accum})


def scored_groups(name: str, selection: loop.Selection) -> list[list[loop.Selected]]:
    """The selection's scored candidates by prompt (``group``), in id order, groups of 2+."""
    rows = require_selected(name, selection, {"ranked"}, "ranked")
    groups: dict[object, list[loop.Selected]] = defaultdict(list)
    for s in rows:
        if s.score is None:
            continue
        groups[s.group if s.group is not None else id(s.candidate.prompt)].append(s)
    out = [sorted(g, key=lambda s: (s.candidate.id or 0, s.rank)) for g in groups.values() if len(g) >= 2]
    if not out:
        raise loop.UserError(
            f"{name} updater: no prompt has two or more scored answers; "
            "generate more samples per prompt (generate.n >= 2)"
        )
    return out


def encode_rows(ctx, rows: Sequence[loop.Selected], max_length: int):
    tok = ctx.policy().tokenizer
    return [encode(tok, s.candidate.prompt, s.candidate.text, ctx.system, max_length) for s in rows]


def reference_adapter(opts: RLOptions, ctx) -> str | None:
    return None if opts.reference == "base" else ctx.adapter


def token_pass(
    updater, ctx, keys: Sequence[int | None], encoded, adapter: str | None, tag: str,
    value_head: torch.nn.Module | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Per-token log-probs (and, with ``value_head``, values) of each encoded candidate
    under ``adapter``, without gradients: lists of [len(response)] tensors.

    Stored in ``<run_dir>/cache/<tag>-round-<r>.safetensors`` (flat tensors, the
    candidates' ids and lengths; temp file, then rename), so a resumed update phase reads
    them back; units without ids (component tests) are never stored.
    """
    opts = updater.options
    ids = torch.tensor([-1 if k is None else int(k) for k in keys], dtype=torch.int64)
    lengths = torch.tensor([len(r) for _, r in encoded], dtype=torch.int64)
    cacheable = all(k is not None for k in keys) and ctx.store is not None
    path = Path(ctx.run_dir) / "cache" / f"{tag}-round-{ctx.round}.safetensors"
    meta = {"adapter": str(adapter), "max_length": str(opts.max_length)}
    stored = read_cache(path, meta, ids) if cacheable else None
    if stored is not None:
        return {k: list(torch.split(v, lengths.tolist())) for k, v in stored.items()
                if k not in ("ids", "lengths")}
    policy = ctx.policy()
    pad = policy.tokenizer.pad_token_id
    flat: dict[str, list[torch.Tensor]] = {"logps": [], "values": []}
    with policy.using(adapter) as model, torch.no_grad():
        model.eval()
        for start in range(0, len(encoded), opts.batch_size):
            chunk = encoded[start : start + opts.batch_size]
            prompts, responses = [p for p, _ in chunk], [r for _, r in chunk]
            with updater.autocast(policy.device):
                if value_head is None:
                    token, batch = scored_token_logps(model, prompts, responses, pad, policy.device)
                else:
                    out = hidden_pass(model, prompts, responses, pad, policy.device)
                    token, batch = out["token_logps"], out
                    values = value_head(out["hidden_tokens"].float()).squeeze(-1)
            order = torch.argsort(batch["seq"], stable=True)
            flat["logps"].append(token[order].float().cpu())
            if value_head is not None:
                flat["values"].append(values[order].float().cpu())
    tensors = {k: torch.cat(v) for k, v in flat.items() if v}
    if cacheable:
        write_cache(path, {"ids": ids, "lengths": lengths, **tensors}, meta)
    return {k: list(torch.split(v, lengths.tolist())) for k, v in tensors.items()}


def padded(rows: Sequence[torch.Tensor], index: Sequence[int], device) -> torch.Tensor:
    """``rows[i]`` for ``i`` in ``index`` as one right-padded [len(index), T] tensor."""
    picked = [rows[i] for i in index]
    return torch.nn.utils.rnn.pad_sequence(picked, batch_first=True).to(device)


def policy_tokens(model, encoded, index, pad_id, device, value_head=None):
    """The trained policy's per-token log-probs [B, T] and mask [B, T] of ``index``'s
    candidates, in one packed pass; with ``value_head`` also its values [B, T] (None
    without)."""
    chunk = [encoded[i] for i in index]
    prompts, responses = [p for p, _ in chunk], [r for _, r in chunk]
    if value_head is None:
        token, batch = scored_token_logps(model, prompts, responses, pad_id, device)
        logps, mask = per_sequence(token, batch["seq"], len(index))
        return logps, mask, None
    out = hidden_pass(model, prompts, responses, pad_id, device)
    logps, mask = per_sequence(out["token_logps"], out["seq"], len(index))
    values = value_head(out["hidden_tokens"].float()).squeeze(-1)
    return logps, mask, per_sequence(values, out["seq"], len(index))[0]


def token_normaliser(encoded):
    """``train``'s normaliser for token-level aggregation: the step's response tokens."""
    return lambda micro_batches: float(sum(len(encoded[i][1]) for mb in micro_batches for i in mb))


def save_head(head: torch.nn.Linear, path: Path) -> None:
    """A scalar head (value or reward) as safetensors beside its adapter, fsynced."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(path))
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def load_head(path: Path, device="cpu") -> torch.nn.Linear:
    """A head written by ``save_head``."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    head = torch.nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict(state)
    return head.to(device)
