"""Token-level helpers shared by the transformers generator and the PEFT updaters.

One convention everywhere (generation, teacher-forced log-probs, DPO training):

- a prompt is its chat rendered by the tokenizer's chat template with the generation
  prompt added (``add_generation_prompt=True``), then tokenized without adding special
  tokens again (templates write their own BOS);
- a response is its text tokenized on its own, followed by one end-of-sequence token;
  the response tokens (EOS included) are the ones whose log-probs count;
- teacher-forced log-probs pack their sequences (``packed_batch``), each prompt once.
"""

from __future__ import annotations

from typing import Sequence

import torch


def encode_prompt(tokenizer, chat) -> list[int]:
    text = tokenizer.apply_chat_template(list(chat), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompts(tokenizer, chats) -> list[list[int]]:
    """``encode_prompt`` of each chat, the tokenizer called once on all of them (a fast
    tokenizer encodes a batch in parallel, in one call): the same ids."""
    chats = list(chats)
    if not chats:
        return []
    texts = [tokenizer.apply_chat_template(list(chat), add_generation_prompt=True, tokenize=False)
             for chat in chats]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


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


# A packed row holds whole prompt groups up to this many tokens (more only for a group
# that is longer on its own): short sequences share rows, long ones keep attention small.
ROW_TOKENS = 1024


def packed_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    device,
    *,
    additive_mask: torch.dtype | None = None,
    row_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """Sequences packed into few rows, each distinct prompt written once.

    Sequences with the same prompt ids form a group: the prompt, then each response.
    A response attends to its prompt and to its own earlier tokens, never to a sibling
    response, and its positions continue from its prompt's end, so every response sees
    exactly what it would see alone after its prompt (chosen and rejected of a pair
    share one prompt pass). Groups fill rows of ``ROW_TOKENS`` first-fit, longest
    first; the rest of a row is padding that attends only to itself.

    ``row_tokens``: the row size (None: ``ROW_TOKENS``; 0: each prompt group in a row of
    its own, for many short groups: attention over a shared row costs its whole width).

    Returns ``input_ids`` and ``position_ids`` [R, T], ``attention_mask`` [R, 1, T, T]
    (bool, True = may attend; or 0 / dtype-min floats when ``additive_mask`` is a
    dtype, for eager attention), ``keep`` [K] the columns whose logits are needed, and
    per scored token (every response token but one without a token before it):
    ``row`` and ``col`` (index into ``keep``) of the logit predicting it, its
    ``target`` id and ``seq``, the index of its sequence in the input order; per
    sequence, ``last_row`` and ``last_col``: where its last token sits (a reward or value
    head reads the hidden state there).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(i)
    sized = sorted(
        ((len(p) + sum(len(responses[i]) for i in members), p, members)
         for p, members in groups.items()),
        key=lambda g: -g[0],
    )
    capacity = max(ROW_TOKENS if row_tokens is None else row_tokens, sized[0][0])
    rows: list[list[tuple[tuple[int, ...], list[int]]]] = []
    room: list[int] = []
    for size, p, members in sized:
        r = next((r for r, free in enumerate(room) if free >= size), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append((p, members))
        room[r] -= size
    width = max(capacity - free for free in room)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    # Attention blocks: token i may attend to j <= i when j is in i's block or in the
    # block of i's prompt (``parent``); each padding token is a block of its own.
    block = torch.arange(width).repeat(len(rows), 1) + len(prompts) + len(groups)
    parent = torch.full((len(rows), width), -1, dtype=torch.long)
    row_of, col_of, target, seq = [], [], [], []
    last = [(0, 0)] * len(prompts)  # (row, column) of each sequence's last token
    blocks = iter(range(len(prompts) + len(groups)))
    for r, members_of_row in enumerate(rows):
        at = 0
        for p, members in members_of_row:
            n_p = len(p)
            prompt_block, prompt_end = next(blocks), at + n_p - 1
            ids[r, at : at + n_p] = torch.tensor(p, dtype=torch.long)
            pos[r, at : at + n_p] = torch.arange(n_p)
            block[r, at : at + n_p] = prompt_block
            at += n_p
            for i in members:
                resp = list(responses[i])
                n_r = len(resp)
                ids[r, at : at + n_r] = torch.tensor(resp, dtype=torch.long)
                pos[r, at : at + n_r] = torch.arange(n_p, n_p + n_r)
                block[r, at : at + n_r] = next(blocks)
                parent[r, at : at + n_r] = prompt_block
                # Token t of the response is predicted at the token before it: the
                # prompt's last token for t = 0, else the response's token t - 1.
                sources = [prompt_end] + list(range(at, at + n_r - 1))
                first = 0 if n_p else 1
                row_of += [r] * (n_r - first)
                col_of += sources[first:]
                target += resp[first:]
                seq += [i] * (n_r - first)
                last[i] = (r, at + n_r - 1)
                at += n_r
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = block[:, None, :] == block[:, :, None]
    in_prompt = block[:, None, :] == parent[:, :, None]
    mask = ((same | in_prompt) & causal)[:, None]
    if additive_mask is not None:
        mask = torch.zeros(mask.shape, dtype=additive_mask).masked_fill(
            ~mask, torch.finfo(additive_mask).min
        )
    cols = torch.tensor(col_of, dtype=torch.long)
    keep, col = torch.unique(cols, sorted=True, return_inverse=True)
    return {
        "input_ids": ids.to(device),
        "position_ids": pos.to(device),
        "attention_mask": mask.to(device),
        "keep": keep.to(device),
        "row": torch.tensor(row_of, dtype=torch.long, device=device),
        "col": col.to(device),
        "target": torch.tensor(target, dtype=torch.long, device=device),
        "seq": torch.tensor(seq, dtype=torch.long, device=device),
        "last_row": torch.tensor([r for r, _ in last], dtype=torch.long, device=device),
        "last_col": torch.tensor([col for _, col in last], dtype=torch.long, device=device),
    }


def _attention_dtype(model):
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):
        raise ValueError(
            f"sequence packing needs an explicit attention mask, which {impl!r} attention "
            "does not take; load the model with attn_implementation 'sdpa' or 'eager'"
        )
    return next(model.parameters()).dtype if impl == "eager" else None


def _picked_logps(logits: torch.Tensor, batch) -> torch.Tensor:
    picked = logits[batch["row"], batch["col"]].float()
    token = picked.gather(-1, batch["target"].unsqueeze(-1)).squeeze(-1)
    return token - torch.logsumexp(picked, dim=-1)


# Logits of at most this many (position, vocabulary) entries exist at once in the chunked
# output head (64 MiB of float32): a 152k vocabulary gets 110 positions per chunk, the
# tests' 80-token one a single chunk.
HEAD_CHUNK_ELEMENTS = 2**24

# Config fields of models whose forward transforms the head's output (soft-capping,
# scaling): their log-probs come from the model's own logits, never the chunked head.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logit_soft_cap")


def _chunk_rows(vocab: int) -> int:
    return max(1, HEAD_CHUNK_ELEMENTS // max(1, vocab))


class _HeadLogps(torch.autograd.Function):
    """log p(target) of each row of ``hidden`` [K, H] under the output head ``weight``
    [V, H] (+ ``bias``), chunk by chunk: ``h·W_t - logsumexp(h·W)`` in float32.

    The forward keeps only the per-row log-sum-exp [K]; the backward recomputes each
    chunk's logits and turns them into ``g · (onehot(target) - softmax)``, so no [K, V]
    tensor outlives one chunk (the scheme of fused linear + cross-entropy kernels).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, rows):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], rows):
            logits = torch.nn.functional.linear(hidden[s : s + rows], weight, bias).float()
            lse[s : s + rows] = torch.logsumexp(logits, dim=-1)
            out[s : s + rows] = logits.gather(-1, target[s : s + rows, None])[:, 0] - lse[s : s + rows]
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.rows = rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for s in range(0, hidden.shape[0], ctx.rows):
            h = hidden[s : s + ctx.rows]
            logits = torch.nn.functional.linear(h, weight, bias).float()
            # d/dlogits of (logit_t - lse) is onehot(t) - softmax; times the incoming grad
            g = torch.exp(logits - lse[s : s + ctx.rows, None]).mul_(-grad[s : s + ctx.rows, None])
            g.scatter_add_(-1, target[s : s + ctx.rows, None], grad[s : s + ctx.rows, None].float())
            if need_h:
                grad_h[s : s + ctx.rows] = g.to(weight.dtype) @ weight
            if need_w:
                grad_w.addmm_(g.t(), h.float())
            if need_b:
                grad_b += g.sum(0)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None


def _plain_head(model):
    """(decoder, head) when the log-probs may come from the chunked head: the output
    head is a plain ``nn.Linear`` and the config names no transform of its output;
    else None (the model's own forward computes the logits; also under FSDP2)."""
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(inner, "unshard") and hasattr(inner, "reshard"):
        # An FSDP2 unit gathers its own weights (embeddings, final norm, head) only in its
        # forward, so the head cannot be applied apart from it: the model's forward runs.
        return None
    try:
        decoder, head = _decoder(model)
    except AttributeError:
        return None
    if type(head) is not torch.nn.Linear or decoder is None:
        return None
    return decoder, head


def head_logps(hidden: torch.Tensor, head: torch.nn.Linear, target: torch.Tensor) -> torch.Tensor:
    """log p(target) [K] (float32) of hidden states [K, H] under the output head
    ``head``, computed in chunks (``HEAD_CHUNK_ELEMENTS``) with a backward that
    recomputes each chunk's logits instead of keeping them."""
    return _HeadLogps.apply(hidden, head.weight, head.bias, target, _chunk_rows(head.weight.shape[0]))


def scored_token_logps(
    model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, device,
    *, row_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Log p of every scored response token [K] (float32) and the packed batch, whose
    ``seq`` says which sequence each token belongs to (tokens of one sequence are
    consecutive and in order), in one packed forward pass.

    The decoder runs once over the packed rows; the output head then sees only the
    hidden states that predict a response token, a chunk of positions at a time
    (``head_logps``): each token's log-prob is its logit minus the log-sum-exp of its
    row, in float32, and no [K, vocab] logits tensor exists beyond one chunk, in the
    forward or the backward pass. Models whose head is not a plain linear layer (or
    whose forward rescales its logits) take their own forward with ``logits_to_keep``.
    """
    batch = packed_batch(prompts, responses, pad_id, device, additive_mask=_attention_dtype(model),
                         row_tokens=row_tokens)
    plain = _plain_head(model)
    if plain is None:
        logits = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=batch["keep"],
        ).logits
        return _picked_logps(logits, batch), batch
    decoder, head = plain
    hidden = decoder(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=batch["attention_mask"],
    ).last_hidden_state
    picked = hidden[batch["row"], batch["keep"][batch["col"]]]
    return head_logps(picked, head, batch["target"]), batch


def sequence_logps(
    model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, device,
    *, row_tokens: int | None = None,
) -> torch.Tensor:
    """Summed log p(response | prompt) of each sequence [N], float32, in one packed
    forward pass (``scored_token_logps``)."""
    token, batch = scored_token_logps(model, prompts, responses, pad_id, device,
                                      row_tokens=row_tokens)
    sums = torch.zeros(len(prompts), dtype=torch.float32, device=token.device)
    return sums.index_add(0, batch["seq"], token)


def _decoder(model):
    """The transformer body of a causal LM (PEFT-wrapped or not): it gives hidden states
    (LoRA layers are injected in place, so they apply) without the output head."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(inner, "unshard") and hasattr(inner, "reshard"):  # an FSDP2 unit
        import loop

        # Its own weights (embeddings, final norm, head) are gathered only in its forward.
        raise loop.UserError(
            "updater.launch: this updater runs the decoder and the head separately (a value "
            "head: ppo), which FSDP2 sharding does not support yet; use "
            "configs/accelerate/ddp.yaml for it")
    return inner.base_model, inner.get_output_embeddings()


def hidden_pass(
    model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
    device, *, logps: bool = True,
) -> dict[str, torch.Tensor]:
    """One packed pass through the decoder, for value and reward heads.

    Returns ``batch`` keys plus ``hidden_last`` [N, H] (the last layer's hidden state at
    each sequence's last token) and, with ``logps``, ``token_logps`` [K] as in
    ``scored_token_logps`` and ``hidden_tokens`` [K, H] (the hidden state at the position
    that predicts each scored token: the state a value head values).
    """
    batch = packed_batch(prompts, responses, pad_id, device, additive_mask=_attention_dtype(model))
    decoder, head = _decoder(model)
    hidden = decoder(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=batch["attention_mask"],
    ).last_hidden_state
    out = dict(batch)
    out["hidden_last"] = hidden[batch["last_row"], batch["last_col"]]
    if logps:
        picked = hidden[batch["row"], batch["keep"][batch["col"]]]
        if _plain_head(model) is not None:
            out["token_logps"] = head_logps(picked, head, batch["target"])
        else:
            out["token_logps"] = _picked_logps(head(hidden[:, batch["keep"]]), batch)
        out["hidden_tokens"] = picked
    return out


def per_sequence(values: torch.Tensor, seq: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-token values [K] (tokens of a sequence consecutive, in order) as a padded
    [count, T] tensor and its 0/1 float mask, in the input order of the sequences."""
    lengths = torch.bincount(seq, minlength=count)
    width = int(lengths.max().item()) if count else 0
    order = torch.argsort(seq, stable=True)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(len(seq), device=seq.device) - starts[seq[order]]
    out = torch.zeros(count, width, dtype=values.dtype, device=values.device)
    mask = torch.zeros(count, width, dtype=torch.float32, device=values.device)
    out = out.index_put((seq[order], pos), values[order])
    mask[seq[order], pos] = 1.0
    return out, mask


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
