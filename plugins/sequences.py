"""Token-level helpers shared by the transformers generator and the PEFT updaters.

One convention everywhere (generation, teacher-forced log-probs, DPO training):

- a prompt is its chat rendered by the tokenizer's chat template with the generation
  prompt added (``add_generation_prompt=True``), then tokenized without adding special
  tokens again (templates write their own BOS);
- a response is its text tokenized on its own, followed by one end-of-sequence token;
  the response tokens (EOS included) are the ones whose log-probs count.
"""

from __future__ import annotations

from typing import Sequence

import torch

IGNORE = -100  # label of a position whose log-prob does not count (prompt, padding)


def encode_prompt(tokenizer, chat) -> list[int]:
    text = tokenizer.apply_chat_template(list(chat), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_response(tokenizer, response: str) -> list[int]:
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    return ids + [tokenizer.eos_token_id]


def stop_token_ids(tokenizer, model) -> list[int]:
    """End-of-sequence ids: the tokenizer's EOS plus any in the model's generation config.

    Chat models often end a turn with a token other than the tokenizer's EOS (Llama 3's
    ``<|eot_id|>``); their ``generation_config.json`` lists all of them.
    """
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` (decoder-only generation)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def training_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, device
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response rows; ``labels`` are IGNORE on prompt and padding."""
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(list(p) + list(r), dtype=torch.long)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(list(r), dtype=torch.long)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(label_t | tokens before t); IGNORE labels count zero.

    ``logits`` [B, T, V] are the model's outputs for the same rows as ``labels`` [B, T]
    (position t predicts token t+1, so they are shifted here). The log-softmax runs
    row by row in float32, so a bf16 model's [B, T, V] tensor is never copied whole.
    """
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    safe = targets.masked_fill(~keep, 0)
    sums = []
    for row_logits, row_targets, row_keep in zip(logits, safe, keep):
        lp = torch.log_softmax(row_logits.float(), dim=-1)
        token_lp = lp.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
        sums.append((token_lp * row_keep).sum())
    return torch.stack(sums)


def truncate(
    prompt: list[int], response: list[int], max_length: int | None
) -> tuple[list[int], list[int]]:
    """Fit prompt+response into ``max_length`` tokens.

    The prompt loses its oldest tokens only as far as needed for the whole response to
    fit, and never below half of ``max_length``; the response is then cut at its end.
    """
    if max_length is None or len(prompt) + len(response) <= max_length:
        return prompt, response
    keep = max(max_length - len(response), max_length // 2)
    if len(prompt) > keep:
        prompt = prompt[-keep:]
    return prompt, response[: max_length - len(prompt)]


class seeded:
    """Seed torch's RNG for one block and restore the previous state afterwards."""

    def __init__(self, seed: int, device) -> None:
        self.seed = seed
        dev = torch.device(device)
        self.devices = [dev.index or 0] if dev.type == "cuda" else []

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)
