"""Preference losses as small pure functions over per-sequence log-probs.

Every loss takes the summed response log-probs of the policy and of the reference for a
batch of pairs (tensors of shape [B]) and keyword hyper-parameters, and returns three [B]
tensors: the loss per pair, and the implicit rewards of chosen and rejected
(``beta * (log pi - log pi_ref)``, detached; logged as ``rewards/*``).

Notation: ``Δ = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))``,
the policy's log-ratio margin of chosen (w) over rejected (l).

To add a loss: write a function with the same signature (extra keyword arguments are
allowed with defaults; ignore the ones you do not use through ``**_``) and add it to
``LOSSES``. Losses that need other inputs (token counts, no reference) extend the call in
``plugins/updaters/dpo.py`` with further keyword arguments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return chosen, rejected


def dpo_sigmoid(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    **_,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al., 2023, eq. 7): ``-log σ(β Δ)``.

    With ``label_smoothing`` ε > 0 it is conservative DPO (Mitchell, 2023, "A note on DPO
    with noisy preferences"): ``-(1-ε) log σ(β Δ) - ε log σ(-β Δ)``, i.e. the labels are
    assumed flipped with probability ε.
    """
    chosen, rejected = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    logits = chosen - rejected  # β Δ
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, chosen.detach(), rejected.detach()


def dpo_robust(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    **_,
) -> tuple[Tensor, Tensor, Tensor]:
    """Robust DPO, rDPO (Chowdhury et al., 2024, "Provably Robust DPO", the rDPO loss):
    ``[-(1-ε) log σ(β Δ) + ε log σ(-β Δ)] / (1 - 2ε)``, an unbiased estimate of the DPO
    loss when labels are flipped with known rate ε < 1/2. ε = 0 is plain DPO.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    chosen, rejected = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    logits = chosen - rejected
    losses = (
        -(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)
    ) / (1 - 2 * label_smoothing)
    return losses, chosen.detach(), rejected.detach()


def ipo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    **_,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", sampled IPO, Algorithm 1): ``(Δ - 1/(2τ))²`` with τ = β.

    Δ here is the un-scaled log-ratio margin over summed sequence log-probs, as in the
    paper (some implementations average per token instead).
    """
    chosen, rejected = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    delta = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = (delta - 1 / (2 * beta)) ** 2
    return losses, chosen.detach(), rejected.detach()


def hinge(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    **_,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hinge loss on the DPO margin, after SLiC-HF's calibration loss (Zhao et al., 2023,
    "SLiC-HF", eq. 1, ``max(0, δ - log P(y_w) + log P(y_l))``) with reference log-ratios in
    place of raw log-probs and δ = 1/β: ``max(0, 1 - β Δ)``.
    """
    chosen, rejected = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    losses = torch.relu(1 - (chosen - rejected))
    return losses, chosen.detach(), rejected.detach()


LOSSES = {
    "sigmoid": dpo_sigmoid,
    "robust": dpo_robust,
    "ipo": ipo,
    "hinge": hinge,
}

# Losses that read ``label_smoothing`` (the updater refuses it for the others).
USES_LABEL_SMOOTHING = {"sigmoid", "robust"}
