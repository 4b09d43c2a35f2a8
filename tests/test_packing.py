"""Packed sequences (plugins/sequences.py: packed_batch, sequence_logps) give the same
log-probs and gradients as each sequence run alone, with sdpa and eager attention."""

from __future__ import annotations

import random

import pytest
import torch

import plugins.sequences as seqs


def sequences(seed: int = 0):
    """Prompt groups of 1-3 responses, one with an empty prompt, token ids of the tiny vocab."""
    rng = random.Random(seed)
    prompts, responses = [], []
    for g in range(6):
        prompt = [rng.randrange(6, 60) for _ in range(0 if g == 5 else rng.randint(3, 12))]
        for _ in range(rng.randint(1, 3)):
            prompts.append(prompt)
            responses.append([rng.randrange(6, 60) for _ in range(rng.randint(1, 9))])
    order = list(range(len(prompts)))
    rng.shuffle(order)  # siblings need not be adjacent
    return [prompts[i] for i in order], [responses[i] for i in order]


def alone(model, prompt, response):
    """log p(response | prompt) from a forward pass over this one sequence."""
    ids = torch.tensor([prompt + response])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    token = logps.gather(-1, ids[0, 1:, None])[:, 0]
    return token[max(len(prompt) - 1, 0) :].sum()


@pytest.fixture(params=["sdpa", "eager"])
def model(request, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=request.param)


@pytest.mark.parametrize("row_tokens", [1024, 16])
def test_packed_logps_equal_one_at_a_time(model, row_tokens, monkeypatch):
    monkeypatch.setattr(seqs, "ROW_TOKENS", row_tokens)  # 16: several rows
    prompts, responses = sequences()
    model.eval()
    with torch.no_grad():
        got = seqs.sequence_logps(model, prompts, responses, 0, "cpu")
        want = torch.stack([alone(model, p, r) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)


def test_packed_gradients_equal_one_at_a_time(model):
    prompts, responses = sequences(1)
    weights = torch.linspace(0.5, 1.5, len(prompts))
    model.train()
    (seqs.sequence_logps(model, prompts, responses, 0, "cpu") * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    sum(w * alone(model, p, r) for w, p, r in zip(weights, prompts, responses)).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(got[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_layout_shares_each_prompt_and_hides_siblings():
    prompt, first, second = [7, 8, 9], [10, 11], [12]
    batch = seqs.packed_batch([prompt, [20], prompt], [first, [21, 22], second], 0, "cpu")
    ids = batch["input_ids"][0].tolist()
    assert ids.count(7) == 1 and len(ids) == 3 + 2 + 1 + 1 + 2  # the shared prompt once
    mask = batch["attention_mask"][0, 0]
    at_first, at_second = ids.index(10), ids.index(12)
    assert not mask[at_second, at_first] and not mask[at_second, at_first + 1]
    assert mask[at_second, : at_first].all()  # the prompt, and nothing of the sibling
    assert batch["position_ids"][0, at_second] == len(prompt)
    # every scored token is predicted at the position just before it in its own sequence
    assert sorted(batch["target"].tolist()) == sorted(first + second + [21, 22])


@pytest.fixture
def sdpa_model(tiny_model_dir):
    """The head comes after attention: one attention implementation is enough."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")


def test_chunked_head_equals_full_logits_with_gradients(sdpa_model, monkeypatch):
    """The output head in chunks of 3 positions (``HEAD_CHUNK_ELEMENTS``) gives the same
    sequence log-probs and the same gradients (head weight included) as full-vocabulary
    logits of each sequence alone, and keeps no [tokens, vocab] tensor for the backward."""
    vocab = sdpa_model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(seqs, "HEAD_CHUNK_ELEMENTS", 3 * vocab)
    prompts, responses = sequences(2)
    weights = torch.linspace(1.5, 0.5, len(prompts))
    sdpa_model.train()
    token, batch = seqs.scored_token_logps(sdpa_model, prompts, responses, 0, "cpu")
    assert type(token.grad_fn).__name__ == "_HeadLogpsBackward"
    hidden, weight, _bias, *rest = token.grad_fn.saved_tensors  # no [tokens, vocab] logits
    assert hidden.shape == (token.shape[0], weight.shape[1]) and all(t.dim() == 1 for t in rest)
    got_logps = torch.zeros(len(prompts)).index_add(0, batch["seq"], token)
    (got_logps * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in sdpa_model.named_parameters()}
    sdpa_model.zero_grad(set_to_none=True)
    want_logps = torch.stack([alone(sdpa_model, p, r) for p, r in zip(prompts, responses)])
    (want_logps * weights).sum().backward()
    torch.testing.assert_close(got_logps, want_logps.detach(), atol=1e-5, rtol=1e-6)
    assert got["lm_head.weight"].abs().sum() > 0
    for name, param in sdpa_model.named_parameters():
        torch.testing.assert_close(got[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_transformed_logits_take_the_models_own_forward(sdpa_model, monkeypatch):
    """A config that rescales the head's output (Cohere's logit_scale, Gemma's soft-cap)
    keeps the model's own logits; a plain Llama head takes the chunked one."""
    prompts, responses = sequences()
    assert seqs._plain_head(sdpa_model) is not None
    with torch.no_grad():
        chunked, _ = seqs.scored_token_logps(sdpa_model, prompts, responses, 0, "cpu")
    monkeypatch.setattr(sdpa_model.config, "final_logit_softcapping", 30.0, raising=False)
    assert seqs._plain_head(sdpa_model) is None  # (Llama ignores the field: same numbers)
    with torch.no_grad():
        own, _ = seqs.scored_token_logps(sdpa_model, prompts, responses, 0, "cpu")
    torch.testing.assert_close(own, chunked, atol=1e-5, rtol=1e-6)
