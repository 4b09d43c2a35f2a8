"""Our GRPO loss equals TRL's GRPOTrainer loss on the same fixed per-token inputs.

Needs the ``bench`` extra (trl); skipped without it. TRL computes the loss inside its
trainer, so the test builds a GRPOTrainer on the tiny model, replaces its per-token
log-prob pass with fixed tensors (the policy's log-probs as TRL would compute them),
and calls its ``_compute_loss`` with fixed old-policy and reference log-probs and
advantages, for each aggregation (TRL's loss_type) with and without the KL term and
with DAPO's asymmetric clip. TRL 1.16 multiplies the KL by the ratio by default (DeepSeek-V3.2's
bias correction); the test turns that off: ours is GRPO's plain k3 term.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install -e .[bench]); TRL parity is checked only with it")

from plugins.updaters import losses as L  # noqa: E402

MAX_TOKENS = 6
# our aggregation -> TRL's loss_type
CASES = [("token_mean", "dapo", 0.0), ("token_mean", "bnpo", 0.04), ("sequence_mean", "grpo", 0.04),
         ("sequence_mean", "grpo", 0.0), ("dr_grpo", "dr_grpo", 0.1)]


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in ("Say hi.", "Count.")])
    config = trl.GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl-grpo")), per_device_train_batch_size=4,
        num_generations=2, max_completion_length=MAX_TOKENS, epsilon=0.2, epsilon_high=0.28,
        beta=0.04, use_bias_correction_kl=False, report_to=[], use_cpu=True, save_strategy="no", max_steps=1, disable_tqdm=True,
        bf16=False)
    t = trl.GRPOTrainer(model=model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                        args=config, train_dataset=data, processing_class=tok)
    t.model.eval()  # eval mode: no gradient-accumulation scaling of the loss
    return t


def fixed_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, MAX_TOKENS
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    old = -torch.rand(B, T, generator=g) * 3
    logps = old + (torch.rand(B, T, generator=g) - 0.5) * 0.8  # ratios around e^±0.4: some clipped
    ref = old + (torch.rand(B, T, generator=g) - 0.5) * 0.5
    adv = torch.tensor([1.2, -0.7, 0.4, -1.5])
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("aggregation,loss_type,beta", CASES)
def test_grpo_loss_matches_trl(trainer, aggregation, loss_type, beta):
    logps, old, ref, adv, mask = fixed_inputs(len(aggregation) + int(beta * 100))
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    B, T = logps.shape
    inputs = {
        "prompt_ids": torch.ones(B, 3, dtype=torch.long), "prompt_mask": torch.ones(B, 3, dtype=torch.long),
        "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, inputs).item()
    per_token, clipped = L.clipped_surrogate(logps, old, adv.unsqueeze(1), clip_eps=0.2, clip_eps_high=0.28)
    if beta:
        per_token = per_token + beta * L.k3_kl(logps, ref)
    ours = L.aggregate(per_token, mask, aggregation, max_tokens=MAX_TOKENS).item()
    assert (clipped.float() * mask).sum() > 0  # the inputs do exercise the clip
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
