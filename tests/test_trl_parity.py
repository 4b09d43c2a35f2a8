"""The DPO-family losses agree with TRL's DPOTrainer on the same per-sequence log-probs.

Needs the ``bench`` extra (trl); skipped without it. TRL computes the loss inside its
trainer, so the test builds a DPOTrainer on the tiny model with a nonzero random LoRA
(policy != reference, which is the base model: precomputed reference log-probs), runs
its ``compute_loss`` on one pair at a time for each loss type, and feeds the log-probs
TRL logged for that pair (and its precomputed reference log-probs) to our loss function.
It also checks our packed forward against TRL's precomputed reference log-probs.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install -e .[bench]); TRL parity is checked only with it")

from plugins.updaters.losses import LOSSES  # noqa: E402

PAIRS = [("What is 2+2?", "Four.", "I do not know, sorry"), ("Say hi.", "Hi there!", "Goodbye?"),
         ("Name a colour.", "Blue.", "no"), ("Count to three.", "1, 2, 3.", "three two")]

CASES = [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)]


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
         "rejected": [{"role": "assistant", "content": bad}]}
        for q, good, bad in PAIRS
    ])
    config = trl.DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=1,
                           precompute_ref_log_probs=True, beta=0.5, report_to=[], use_cpu=True, save_strategy="no",
                           max_steps=1, disable_tqdm=True, bf16=False)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")  # random B: policy != base
    t = trl.DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=lora)
    t.model.eval()
    return t


@pytest.mark.parametrize("loss,smoothing", CASES)
def test_dpo_losses_match_trl(trainer, loss, smoothing):
    trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = [loss], [1.0], smoothing
    checked = 0
    for inputs in trainer.get_train_dataloader():
        trainer._metrics["eval"].clear()
        with torch.no_grad():
            theirs = trainer.compute_loss(trainer.model, inputs).item()
        m = trainer._metrics["eval"]  # the model is in eval mode: no dropout
        pc, pr = torch.tensor([m["logps/chosen"][-1]]), torch.tensor([m["logps/rejected"][-1]])
        rc, rr = inputs["ref_chosen_logps"].float().cpu(), inputs["ref_rejected_logps"].float().cpu()
        nc, nr = inputs["completion_mask"].sum(dim=1).float().cpu().chunk(2)
        kwargs = {"label_smoothing": smoothing} if smoothing else {}
        ours, _, _ = LOSSES[loss](pc, pr, rc, rr, beta=0.5, chosen_tokens=nc, rejected_tokens=nr, **kwargs)
        assert abs(pc.item() - rc.item()) > 1e-3, "policy should differ from the reference"
        assert ours.item() == pytest.approx(theirs, abs=1e-6), (loss, ours.item(), theirs)
        checked += 1
    assert checked == 4


def test_packed_logps_match_trl_reference(trainer, tiny_model_dir):
    """Our packed forward (the prompt once, chosen and rejected beside it) gives the
    reference log-probs TRL precomputed with its padded, concatenated forward, on TRL's
    own token ids."""
    from transformers import AutoModelForCausalLM

    from plugins.sequences import encode_prompt, encode_response, sequence_logps

    tok = trainer.processing_class
    ours_encoded = {
        (tuple(encode_prompt(tok, [{"role": "user", "content": q}])),
         tuple(encode_response(tok, good)), tuple(encode_response(tok, bad)))
        for q, good, bad in PAIRS
    }
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    checked = 0
    for inputs in trainer.get_train_dataloader():
        prompts, responses = [], []
        for ids, mask, completion in zip(inputs["input_ids"], inputs["attention_mask"],
                                         inputs["completion_mask"]):
            prompts.append(ids[(mask == 1) & (completion == 0)].tolist())
            responses.append(ids[completion == 1].tolist())
        assert prompts[0] == prompts[1]
        assert (tuple(prompts[0]), tuple(responses[0]), tuple(responses[1])) in ours_encoded
        with torch.no_grad():
            ours = sequence_logps(base, prompts, responses, 0, "cpu")
        theirs = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float().cpu()
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-6)
        checked += 1
    assert checked == 4
