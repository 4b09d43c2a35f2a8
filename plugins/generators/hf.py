"""The transformers generator: samples from the shared policy (base model + LoRA adapter).

Config::

    [generator]
    name = "hf"
    batch_size = 32

It runs on the same model object the PEFT updater trains (``ctx.policy()``), so on CPU
and on one GPU there is never a second copy of the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
from pydantic import Field
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.cache_utils import DynamicLayer

import loop
from loop.context import derive_seed
from plugins.sequences import (
    _attention_dtype,
    _plain_head,
    encode_prompts,
    head_logps,
    packed_batch,
    encode_response,
    left_pad,
    seeded,
    sequence_logps,
    stop_token_ids,
)


class _RawLogprobs(LogitsProcessor):
    """A logits processor that records each sampled token's log-prob under the raw logits.

    transformers runs custom processors after its own (we switch those off, see
    ``_generation_config``) and before the sampling warpers (temperature, top-p), so
    ``scores`` here are the model's logits. The token sampled at step t is only known at
    step t+1 (it is the last of ``input_ids``); the last step is gathered by ``finish``.
    Memory is one [rows, vocab] tensor, not one per step.
    """

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None
        self.taken: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.taken.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """[rows, steps] log-probs of ``generated`` (the new tokens, one column per step)."""
        if self.previous is not None and len(self.taken) < generated.shape[1]:
            self.taken.append(self.previous.gather(1, generated[:, -1:]).squeeze(1))
        self.previous = None
        if not self.taken:
            return torch.zeros(generated.shape, dtype=torch.float32, device=generated.device)
        return torch.stack(self.taken, dim=1)


class _FinishedChats(StoppingCriteria):
    """Counts a batch's chats as generation goes, so a slow batch moves step by step.

    It never stops anything (it answers False for every row). After each decoding step t
    (of at most ``max_new_tokens`` = T) it calls ``report(k)`` when k grew, where k counts
    the chats whose samples have all ended plus the others' share of the decoding done so
    far: ``finished + (chats - finished) * t / T``, rounded down. It reaches the batch's
    size when the last chat ends, and never runs ahead of the work: a chat still decoding
    at step t has had t of its at most T tokens.
    """

    def __init__(self, stops: list[int], copies: int, max_new_tokens: int,
                 report: Callable[[int], None]):
        self.stops = stops
        self.copies = copies
        self.max_new_tokens = max(1, max_new_tokens)
        self.report = report
        self.ended: torch.Tensor | None = None
        self.step = 0
        self.count = 0
        self._stops: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        last = input_ids[:, -1]
        if self._stops is None:
            self._stops = torch.tensor(self.stops, device=last.device)
        ended = torch.isin(last, self._stops)
        self.ended = ended if self.ended is None else self.ended | ended
        self.step += 1
        chats = last.shape[0] // self.copies
        finished = int(self.ended.view(-1, self.copies).all(dim=1).sum())
        share = min(self.step, self.max_new_tokens)
        count = finished + (chats - finished) * share // self.max_new_tokens
        if count > self.count:
            self.count = count
            self.report(count)
        return torch.zeros_like(last, dtype=torch.bool)


class HFGenerator(loop.Generator):
    """Batched, left-padded sampling with ``model.generate`` (transformers + PEFT).

    Per sample it returns a ``loop.Completion``:

    - ``text``: the continuation up to (not including) the first end-of-sequence token,
      decoded with special tokens skipped;
    - ``num_tokens``: generated tokens, counting the end-of-sequence token when there is
      one (it is a token the model chose, and the one DPO trains on after the text);
    - ``finish_reason``: "stop" when an end-of-sequence token was generated, else "length";
    - ``logprob_sum``: the sum over those same ``num_tokens`` tokens of their log-prob under
      the model's raw distribution (log-softmax of the logits, before temperature or top-p),
      i.e. what ``logprobs()`` gives for the text when it ends with EOS. With greedy
      decoding it is the log-prob of the argmax path.

    ``Sampling`` is the whole sampling specification: temperature 0 means greedy; top-k,
    repetition penalties and other defaults from the model's ``generation_config.json``
    are switched off. Each batch of prompts is seeded from ``sampling.seed`` and the batch
    index, so a call is reproducible given its seed, its chats and ``batch_size``; the
    global torch RNG is left as it was.
    """

    name = "hf"
    loads_model_folder = True  # the model-folder checks at validation apply
    # Run a batch's shared token prefix once (generate; the label path has its own) and
    # serve every row from its key/value cache; False: plain left-padded batches
    # (bench/per_row.py's "before").
    shared_prefix = True

    class Options(loop.Generator.Options):
        # Prompts per generate() call (each with n samples): bounds memory on long prompts.
        batch_size: int = Field(32, ge=1)

    def generate(
        self,
        ctx,
        chats: Sequence[loop.Chat],
        sampling: loop.Sampling,
        *,
        adapter: str | None,
        progress: bool | Callable[[int, int], None] = True,
    ) -> list[list[loop.Completion]]:
        if sampling.n < 1:
            raise ValueError(f"sampling.n must be at least 1, got {sampling.n}")
        policy = ctx.policy()
        tok = policy.tokenizer
        prompts = encode_prompts(tok, chats)
        size = self.options.batch_size
        finished = loop.chats_done(ctx, progress, len(prompts))  # chats done so far
        copies = 1 if sampling.temperature <= 0.0 else sampling.n
        results: list[list[loop.Completion]] = []
        with policy.using(adapter) as model:
            stops = stop_token_ids(tok, model)
            for index, start in enumerate(range(0, len(prompts), size)):
                batch = prompts[start : start + size]
                seed = derive_seed(sampling.seed, "batch", index)
                watch = None
                if finished is not None:
                    watch = _FinishedChats(stops, copies, sampling.max_new_tokens,
                                           lambda k, s=start: finished(s + k))
                results.extend(
                    self._generate_batch(model, tok, batch, sampling, stops, seed, watch))
                if finished is not None:
                    finished(start + len(batch))
        return results

    def _generate_batch(self, model, tok, prompts, sampling, stops, seed, watch=None):
        greedy = sampling.temperature <= 0.0
        copies = 1 if greedy else sampling.n  # greedy samples are all the same path
        device = model.device
        shared = 0
        # The cache reuse below lays rows out with padding between a shared prefix and
        # the rest; sdpa and eager attention take any mask (flash attention may not).
        lean = self.shared_prefix and getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
        if lean and len(prompts) > 1:
            shared = min(common_prefix(prompts), min(len(p) for p in prompts) - 1)
        if shared < MIN_SHARED_PREFIX:
            shared = 0
        # [shared prefix | left-padded rest]: every token keeps its position (HF counts
        # positions along the attention mask) and sees the same tokens as when left-padded.
        input_ids, attention_mask = left_pad([p[shared:] for p in prompts], tok.pad_token_id, device)
        rows = len(prompts)
        extra = {}
        cache = reserved_cache(model, sampling.max_new_tokens) if lean else None
        with torch.no_grad():
            if shared:
                head = torch.tensor([prompts[0][:shared]], dtype=torch.long, device=device)
                cache = model(input_ids=head, use_cache=True, past_key_values=cache).past_key_values
                input_ids = torch.cat([head.expand(rows, -1), input_ids], dim=1)
                attention_mask = torch.cat([torch.ones_like(head).expand(rows, -1),
                                            attention_mask], dim=1)
            if cache is not None and copies > 1:
                # Each prompt's tokens but its last run once, not once per sample; generate
                # runs the last one for every sample (its logits are the first step's).
                if shared:
                    cache.batch_repeat_interleave(rows)
                cache = _prefill(model, input_ids[:, shared:-1], attention_mask[:, :-1], cache)
                cache.batch_repeat_interleave(copies)
            elif shared:
                cache.batch_repeat_interleave(rows * copies)
        if cache is not None:
            extra["past_key_values"] = cache
        recorder = _RawLogprobs()
        with torch.no_grad(), seeded(seed, device):
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                **extra,
                generation_config=_generation_config(sampling, copies, stops, tok.pad_token_id),
                logits_processor=LogitsProcessorList([recorder]),
                stopping_criteria=StoppingCriteriaList([watch] if watch is not None else []),
            )
        generated = out[:, input_ids.shape[1] :]
        token_logprobs = recorder.finish(generated)
        stop_set = set(stops)
        completions: list[list[loop.Completion]] = []
        for p in range(len(prompts)):
            samples = []
            for c in range(copies):
                row = p * copies + c
                ids = generated[row].tolist()
                end = next((i for i, t in enumerate(ids) if t in stop_set), None)
                kept = ids if end is None else ids[: end + 1]
                text_ids = kept if end is None else kept[:-1]
                samples.append(
                    loop.Completion(
                        text=tok.decode(text_ids, skip_special_tokens=True),
                        num_tokens=len(kept),
                        finish_reason="length" if end is None else "stop",
                        logprob_sum=float(token_logprobs[row, : len(kept)].sum()),
                    )
                )
            if greedy:  # n separate records of the one greedy path
                samples = [dataclasses.replace(samples[0]) for _ in range(sampling.n)]
            completions.append(samples)
        return completions

    def logprobs(
        self,
        ctx,
        chats: Sequence[loop.Chat],
        responses: Sequence[str],
        *,
        adapter: str | None,
    ) -> list[float]:
        """Teacher-forced sum of log-probs of each response's tokens followed by EOS."""
        if len(chats) != len(responses):
            raise ValueError(f"{len(chats)} chats but {len(responses)} responses")
        policy = ctx.policy()
        tok = policy.tokenizer
        prompts = encode_prompts(tok, chats)
        answers = [encode_response(tok, r) for r in responses]
        size = self.options.batch_size
        sums: list[float] = []
        with policy.using(adapter) as model, torch.no_grad():
            for start in range(0, len(prompts), size):
                sums.extend(
                    sequence_logps(
                        model,
                        prompts[start : start + size],
                        answers[start : start + size],
                        tok.pad_token_id,
                        model.device,
                    ).tolist()
                )
        return sums

    def label_logprobs(
        self,
        ctx,
        chats: Sequence[loop.Chat],
        labels: Sequence[str],
        *,
        adapter: str | None,
    ) -> list[list[float]]:
        """Per chat, each label's teacher-forced log-prob (its tokens, then EOS), the same
        numbers ``logprobs`` gives for the rows (chat, label). Each chat is encoded once
        and ``batch_size`` chats go into one packed forward pass, one row per chat, in which
        the prompt is written once and every label follows it (``packed_batch`` with
        ``row_tokens=0``: a chat attends over its own row only): the labels' first tokens
        are read from the one logit row at the prompt's end."""
        labels = list(labels)
        policy = ctx.policy()
        tok = policy.tokenizer
        answers = [encode_response(tok, lab) for lab in labels]
        k = len(labels)
        size = self.options.batch_size
        out: list[list[float]] = []
        with policy.using(adapter) as model, torch.no_grad():
            for start in range(0, len(chats), size):
                heads = encode_prompts(tok, chats[start:start + size])
                sums = _label_sums(model, heads, answers, tok.pad_token_id)
                out.extend(sums[i * k:(i + 1) * k] for i in range(len(heads)))
        return out


# A batch's chats share their first tokens (the template's instructions) when at least
# this many: that prefix is run once and its keys and values serve every row.
MIN_SHARED_PREFIX = 16


class _ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views into buffers with room for the
    tokens still to come. ``DynamicLayer.update`` concatenates: every decoding step copies
    the whole cache, per layer, keys and values (half of a 48-row step at 180 tokens of
    context). Here a step writes its one position in place; the buffers are reallocated
    (``reserve`` positions of room again) only when they are full or when the inherited
    batch operations (``batch_repeat_interleave``, ``crop``...) replaced the views. The
    attention reads the same numbers either way."""

    def __init__(self, reserve: int) -> None:
        super().__init__()
        self.reserve = max(1, reserve)
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        have = self.get_seq_length()
        need = have + key_states.shape[-2]
        room = self._room
        if (room is None or need > room[0].shape[-2] or room[0].shape[0] != key_states.shape[0]
                or (have and self.keys.data_ptr() != room[0].data_ptr())):
            shape = (*key_states.shape[:2], need + self.reserve, key_states.shape[-1])
            room = (key_states.new_empty(shape), value_states.new_empty(shape))
            if have:
                room[0][:, :, :have] = self.keys
                room[1][:, :, :have] = self.values
            self._room = room
        room[0][:, :, have:need] = key_states
        room[1][:, :, have:need] = value_states
        self.keys, self.values = room[0][:, :, :need], room[1][:, :, :need]
        return self.keys, self.values


def _prefill(model, ids, mask, cache):
    """Run ``ids`` (the columns after those ``cache`` holds; ``mask`` covers both) into
    ``cache``, with the positions generate gives them (along the attention mask)."""
    if ids.shape[1]:
        position_ids = mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(mask == 0, 1)
        cache = model(input_ids=ids, attention_mask=mask, position_ids=position_ids[:, -ids.shape[1]:],
                      past_key_values=cache, use_cache=True).past_key_values
    return cache


def reserved_cache(model, reserve: int):
    """A ``DynamicCache`` for ``model`` whose full-attention layers write in place
    (``_ReservedLayer``), or None (transformers then makes its own) for a model whose
    cache has other kinds of layer (sliding windows, linear attention...)."""
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # an architecture whose config DynamicCache cannot read
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [_ReservedLayer(reserve) for _ in cache.layers]
    return cache


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all of ``seqs`` share."""
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


def _label_sums(model, heads, answers, pad_id) -> list[float]:
    """Summed log p(answer | head) for every (head, answer), heads-major, in one packed
    pass (``sequence_logps`` with ``row_tokens=0``). When the heads share a prefix of at
    least ``MIN_SHARED_PREFIX`` tokens (a judge template's instructions), the prefix runs
    once (batch 1) and its key/value cache, repeated per row, is attended by every row:
    each token sees the same tokens at the same positions as in the plain pass, so the
    numbers agree with it to float rounding (different matmul shapes), not bit for bit."""
    device = model.device
    prompts = [h for h in heads for _ in answers]
    responses = [a for _ in heads for a in answers]
    shared = min(common_prefix(heads), min(len(h) for h in heads) - 1) if len(heads) > 1 else 0
    plain = _plain_head(model)
    if shared < MIN_SHARED_PREFIX or plain is None or _attention_dtype(model) is not None:
        return sequence_logps(model, prompts, responses, pad_id, device, row_tokens=0).tolist()
    decoder, head = plain
    prefix = torch.tensor([heads[0][:shared]], dtype=torch.long, device=device)
    cache = decoder(input_ids=prefix, use_cache=True).past_key_values
    batch = packed_batch([p[shared:] for p in prompts], responses, pad_id, device, row_tokens=0)
    rows, width = batch["input_ids"].shape
    cache.batch_repeat_interleave(rows)
    mask = torch.cat([torch.ones(rows, 1, width, shared, dtype=torch.bool, device=device),
                      batch["attention_mask"]], dim=-1)
    # Additive, once: SDPA turns a boolean mask into this (0 / -inf) in every layer.
    dtype = hidden_dtype(decoder)
    mask = torch.where(mask, torch.zeros((), dtype=dtype, device=device),
                       torch.full((), float("-inf"), dtype=dtype, device=device))
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"] + shared,
                     attention_mask=mask, past_key_values=cache, use_cache=True).last_hidden_state
    picked = hidden[batch["row"], batch["keep"][batch["col"]]]
    token = head_logps(picked, head, batch["target"])
    sums = torch.zeros(len(prompts), dtype=torch.float32, device=token.device)
    return sums.index_add(0, batch["seq"], token).tolist()


def hidden_dtype(model) -> torch.dtype:
    """The dtype of ``model``'s hidden states (its input embeddings'; quantized linear
    weights are not it), which an additive attention mask must have."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = embed.weight.dtype if embed is not None else next(model.parameters()).dtype
    return dtype if dtype.is_floating_point else torch.float32


def _generation_config(sampling: loop.Sampling, copies: int, stops: list[int], pad_id: int):
    from transformers import GenerationConfig

    greedy = sampling.temperature <= 0.0
    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p,
        top_k=None if greedy else 0,  # 0 = off (transformers' own default is 50)
        num_return_sequences=copies,
        eos_token_id=stops,
        pad_token_id=pad_id,
        # Neutral values for processors a model's generation_config.json may switch on:
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )


@loop.hookimpl
def register_generators(register):
    register(HFGenerator)
