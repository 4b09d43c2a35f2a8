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
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    **_,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", sampled IPO, Algorithm 1): ``(Δ - 1/(2τ))²`` with τ = β.

    Given response token counts (the updater passes them) each log-ratio is averaged
    per token first, the form the paper's experiments used (as TRL's DPOTrainer does);
    without them Δ is over summed sequence log-probs.
    """
    chosen, rejected = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if chosen_tokens is not None:
        chosen_ratio = chosen_ratio / chosen_tokens.clamp(min=1)
        rejected_ratio = rejected_ratio / rejected_tokens.clamp(min=1)
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
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


# ---------------------------------------------------------------------------
# Beyond pairs against a reference: ranked lists (RRHF, PRO), no reference (ORPO),
# unpaired labels (KTO), plain supervised fine-tuning (RAFT). Inputs are per-sequence
# summed log-probs ``logps`` and response token counts ``tokens``.
# ---------------------------------------------------------------------------


def sft(logps: Tensor, tokens: Tensor, **_) -> Tensor:
    """Supervised fine-tuning on kept samples, RAFT (Dong et al., 2023, "RAFT: Reward
    rAnked FineTuning", Algorithm 1, step 3: fine-tune on the best-of-k set): the
    negative log-likelihood of each response, averaged over its tokens. Returns [B]."""
    return -logps / tokens.clamp(min=1)


def rrhf(logps: Tensor, tokens: Tensor, scores: Tensor, *, sft_weight: float = 1.0, **_) -> Tensor:
    """RRHF (Yuan et al., 2023, "RRHF: Rank Responses to Align Language Models with Human
    Feedback", arXiv 2304.05302, eqs. 1-4: numbering checked against a secondary
    transcription of the method, not the PDF) for one prompt's n responses:

    ``p_i = logps_i / tokens_i`` (eq. 1, length-normalised log-prob);
    ``L_rank = Σ_{r_i < r_j} max(0, p_i - p_j)`` (eq. 2);
    ``L_ft = -Σ_t log P(y_{i',t})`` with ``i' = argmax_i r_i`` (eq. 3, summed over tokens);
    ``L = L_rank + sft_weight · L_ft`` (eq. 4, weight 1). Equal scores give no ranking
    term. Returns a scalar.
    """
    p = logps / tokens.clamp(min=1)
    worse = scores.unsqueeze(1) < scores.unsqueeze(0)  # worse[i, j]: r_i < r_j
    rank = (torch.relu(p.unsqueeze(1) - p.unsqueeze(0)) * worse).sum()
    best = int(torch.argmax(scores))
    return rank + sft_weight * (-logps[best])


def pro(logps: Tensor, tokens: Tensor, scores: Tensor, *, sft_weight: float = 1.0, **_) -> Tensor:
    """PRO (Song et al., 2024, "Preference Ranking Optimization for Human Alignment",
    AAAI; arXiv 2306.17492; see the paper's method section: the Plackett-Luce listwise
    loss, equation number not verified here) for one prompt's n responses, best first
    by ``scores`` (stable order):

    ``π_i = logps_i / tokens_i`` (length-normalised log-prob);
    ``L_PRO = -Σ_{k=1}^{n-1} log( exp(π_k) / Σ_{i=k}^{n} exp(π_i) )``;
    ``L = L_PRO + sft_weight · L_SFT``, ``L_SFT = -π_1`` (mean token NLL of the best).
    The paper's reward-scaled temperatures are not used (all T = 1). Returns a scalar.
    """
    order = torch.argsort(-scores, stable=True)
    pi = (logps / tokens.clamp(min=1))[order]
    # log of Σ_{i>=k} exp(π_i) for every k: a reversed cumulative logsumexp
    tails = torch.logcumsumexp(pi.flip(0), dim=0).flip(0)
    listwise = -(pi[:-1] - tails[:-1]).sum()
    return listwise + sft_weight * (-pi[0])


def orpo(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    *,
    lam: float,
    **_,
) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO (Hong et al., 2024, "ORPO: Monolithic Preference Optimization without
    Reference Model", eqs. 4-7), no reference model:

    ``log P(y|x) = logps / tokens`` (length-normalised, eq. 4 with the mean);
    ``log odds(y) = log P - log(1 - P)`` (eq. 5);
    ``L_OR = -log σ(log odds(y_w) - log odds(y_l))`` (eq. 7);
    ``L = L_SFT + λ L_OR`` with ``L_SFT = -log P(y_w|x)`` (eq. 6, the chosen NLL).
    Returns the [B] losses and the rewards ``λ log P`` of chosen and rejected (detached).
    """
    pc = chosen_logps / chosen_tokens.clamp(min=1)
    pr = rejected_logps / rejected_tokens.clamp(min=1)
    # log(1 - exp(p)) for p < 0, stable: log(-expm1(p))
    log_odds = (pc - torch.log(-torch.expm1(pc))) - (pr - torch.log(-torch.expm1(pr)))
    losses = -pc - lam * F.logsigmoid(log_odds)
    return losses, (lam * pc).detach(), (lam * pr).detach()


def kto(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    **_,
) -> tuple[Tensor, Tensor]:
    """KTO (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization", eq. 8), unpaired examples with a reference point:

    ``r = log π(y|x) - log π_ref(y|x)``, ``z0 = kl`` (the KL reference point, detached);
    desirable:   ``λ_D (1 - σ(β (r - z0)))``;
    undesirable: ``λ_U (1 - σ(β (z0 - r)))``.
    Returns the [B] losses and the implicit rewards ``β r`` (detached).
    """
    ratio = logps - ref_logps
    z0 = kl.detach()
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio)))
    return torch.where(desirable, good, bad), (beta * ratio).detach()


# Every loss by name: the pair losses above (DPO family, keyed by ``loss``) and one per
# updater for the other data shapes.
LIST_LOSSES = {"rrhf": rrhf, "pro": pro}
ALL_LOSSES = {**LOSSES, **LIST_LOSSES, "sft": sft, "orpo": orpo, "kto": kto}


# ---------------------------------------------------------------------------
# Online RL (GRPO, RLOO, Dr. GRPO, PPO) and reward models. Inputs are per-token
# tensors [B, T] with a 0/1 float ``mask`` of the response tokens, or per-sequence
# rewards [n] of one prompt's group.
# ---------------------------------------------------------------------------


def grpo_advantages(rewards: Tensor, *, eps: float = 1e-4) -> Tensor:
    """GRPO (Shao et al., 2024, "DeepSeekMath", sec. 4.1.2, outcome supervision):
    ``Â_i = (r_i - mean(r)) / std(r)`` over one prompt's group of n rewards; std with
    Bessel's correction and ``eps`` added, as TRL's GRPOTrainer. Returns [n]."""
    if rewards.numel() < 2:
        return torch.zeros_like(rewards)
    return (rewards - rewards.mean()) / (rewards.std() + eps)


def dr_grpo_advantages(rewards: Tensor, **_) -> Tensor:
    """Dr. GRPO (Liu et al., 2025, "Understanding R1-Zero-Like Training: A Critical
    Perspective", sec. 3.2, eq. 3): ``Â_i = r_i - mean(r)``, no division by the group's
    std (which favours groups of near-equal rewards). Returns [n]."""
    return rewards - rewards.mean()


def rloo_advantages(rewards: Tensor, **_) -> Tensor:
    """RLOO (Ahmadian et al., 2024, "Back to Basics: Revisiting REINFORCE Style
    Optimization for Learning from Human Feedback in LLMs", sec. 3.3; Kool et al., 2019):
    the leave-one-out baseline ``Â_i = r_i - 1/(n-1) Σ_{j≠i} r_j``. Returns [n]."""
    n = rewards.numel()
    if n < 2:
        return torch.zeros_like(rewards)
    return rewards - (rewards.sum() - rewards) / (n - 1)


ADVANTAGES = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}


def clipped_surrogate(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, *, clip_eps: float,
    clip_eps_high: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The token-level clipped surrogate of PPO (Schulman et al., 2017, eq. 7) as GRPO
    applies it to every token (Shao et al., 2024, eq. 3), with DAPO's decoupled upper
    bound (Yu et al., 2025, "DAPO", eq. 10, "clip-higher"):

    ``ρ_t = exp(log π(o_t) - log π_old(o_t))``;
    ``L_t = -min(ρ_t Â, clip(ρ_t, 1 - ε_low, 1 + ε_high) Â)``, ``ε_high = ε_low`` unless given.

    ``advantages`` is [B, 1] (one per sequence) or [B, T]. Returns the per-token loss
    [B, T] and where the clipped term was taken with a zero gradient (the "clipped"
    tokens, [B, T] bool).
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - clip_eps, 1 + high)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    clipped = ((ratio < 1 - clip_eps) & (advantages < 0)) | ((ratio > 1 + high) & (advantages > 0))
    return loss, clipped


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """The k3 estimator of KL(π || π_ref) per token (Schulman, 2020, "Approximating KL
    Divergence"; GRPO's eq. 4 in Shao et al., 2024): ``exp(q - p) - (q - p) - 1`` with
    ``p = log π(o_t)``, ``q = log π_ref(o_t)``: unbiased, always >= 0. Returns [B, T]."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def sequence_terms(per_token: Tensor, mask: Tensor, how: str, *, max_tokens: int | None = None) -> Tensor:
    """Each sequence's share of an aggregated loss, before the batch normaliser.

    ``token_mean`` (DAPO, Yu et al., 2025, eq. 12, token-level loss): ``Σ_t l_t`` (the
    batch divides by its total token count); ``sequence_mean`` (GRPO, Shao et al., 2024,
    eq. 3, the ``1/|o_i|`` mean per sequence): ``Σ_t l_t / |o_i|``; ``dr_grpo`` (Liu et
    al., 2025, eq. 3, a constant length): ``Σ_t l_t / max_tokens``. The last two divide by
    the batch's sequence count (``normaliser``). Returns [B].
    """
    sums = (per_token * mask).sum(-1)
    if how == "token_mean":
        return sums
    if how == "sequence_mean":
        return sums / mask.sum(-1).clamp(min=1.0)
    if how == "dr_grpo":
        if not max_tokens:
            raise ValueError("dr_grpo aggregation needs max_tokens")
        return sums / max_tokens
    raise ValueError(f"unknown aggregation {how!r}; choose one of {AGGREGATIONS}")


AGGREGATIONS = ("token_mean", "sequence_mean", "dr_grpo")


def normaliser(mask: Tensor, how: str) -> Tensor:
    """What a batch's summed ``sequence_terms`` are divided by: its response tokens
    (``token_mean``) or its sequences (the others)."""
    return mask.sum().clamp(min=1.0) if how == "token_mean" else torch.tensor(float(mask.shape[0]))


def aggregate(per_token: Tensor, mask: Tensor, how: str, *, max_tokens: int | None = None) -> Tensor:
    """A batch's loss: ``sequence_terms`` summed over the batch, over ``normaliser``."""
    return sequence_terms(per_token, mask, how, max_tokens=max_tokens).sum() / normaliser(mask, how)


def shaped_rewards(scores: Tensor, old_logps: Tensor, ref_logps: Tensor, mask: Tensor, *, kl_coef: float) -> Tensor:
    """InstructGPT's per-token rewards (Ouyang et al., 2022, eq. 2; Ziegler et al., 2019,
    sec. 2.2): ``r_t = -β (log π_old(o_t) - log π_ref(o_t))`` on every response token,
    plus the sequence score ``r_φ(x, y)`` on its last token. ``scores`` [B]. Returns [B, T]."""
    rewards = -kl_coef * (old_logps - ref_logps) * mask
    last = (mask.sum(-1) - 1).clamp(min=0).long()
    return rewards.index_put((torch.arange(len(scores)), last), rewards[torch.arange(len(scores)), last] + scores)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016, "High-Dimensional
    Continuous Control Using Generalized Advantage Estimation", eqs. 11-16):
    ``δ_t = r_t + γ V_{t+1} - V_t`` (``V`` past the last token is 0);
    ``Â_t = Σ_l (γλ)^l δ_{t+l}``; returns ``R_t = Â_t + V_t``. Returns (Â, R), [B, T]."""
    values = values * mask
    T = rewards.shape[-1]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    return adv, adv + values


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / std`` over the masked entries (PPO's advantage normalisation)."""
    n = mask.sum().clamp(min=1.0)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, *, clip: float) -> Tensor:
    """PPO's clipped value loss (OpenAI baselines' ppo2; Zheng et al., 2023, "Secrets of
    RLHF in Large Language Models Part I: PPO", sec. 5.3):
    ``½ max((V - R)², (clip(V, V_old - c, V_old + c) - R)²)`` per token. Returns [B, T]."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)


def bradley_terry(
    chosen: Tensor, rejected: Tensor, *, margin: Tensor | None = None, label_smoothing: float = 0.0
) -> Tensor:
    """The Bradley-Terry reward-model loss (Ouyang et al., 2022, eq. 1), with the
    preference margin of Llama 2 (Touvron et al., 2023, eq. 2) and label smoothing
    (Wang et al., 2024, "Secrets of RLHF in Large Language Models Part II: Reward
    Modeling", sec. 4):
    ``Δ = r(y_w) - r(y_l) - m``;
    ``L = -(1 - ε) log σ(Δ) - ε log σ(-Δ)``. Returns [B]."""
    delta = chosen - rejected
    if margin is not None:
        delta = delta - margin
    return -(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)


def ema_update(ema: dict[str, Tensor], params: dict[str, Tensor], *, decay: float) -> None:
    """Exponential moving average of the policy's weights (DeepSpeed-Chat, Yao et al.,
    2023, sec. 3, "EMA collection"): ``θ_ema ← d θ_ema + (1 - d) θ``, in place."""
    with torch.no_grad():
        for name, p in params.items():
            ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
