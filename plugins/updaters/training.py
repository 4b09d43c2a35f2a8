"""What every PEFT LoRA updater shares: the options, the step plan, the training loop,
the forward pass that gives per-sequence log-probs, and the stored reference log-probs.

An updater supplies its data as a list of training units (a pair, a ranked group, one
labelled example) and a function ``micro(model, indices) -> (losses, sums)`` giving the
loss of each unit in a micro-batch (a [n] tensor with gradients) and metric sums;
``train`` does the rest (seeded order, length grouping, accumulation, clipping, AdamW,
schedule, progress, per-step records).
"""

from __future__ import annotations

import math
import os
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from pydantic import Field

import loop
from loop.context import derive_seed
from loop.launch import LaunchOptions, fsdp_requested, rank
from plugins.sequences import seeded, sequence_logps


class LoRAOptions(loop.Updater.Options):
    """Options shared by every LoRA updater (each updater's Options extends this)."""

    # LoRA tolerates far larger steps than full fine-tuning (which uses ~5e-7).
    learning_rate: float = Field(5e-5, gt=0.0)  # 0 would learn nothing
    # Passes over the round's data (the Self-Rewarding recipe trains one per round).
    epochs: int = Field(1, ge=1)
    # If set, stop after this many optimizer steps (overrides epochs, cycling the data).
    max_steps: int | None = Field(None, ge=1)
    # Training units (pairs, groups, examples) per forward pass.
    batch_size: int = Field(4, ge=1)
    # Micro-batches per optimizer step: a larger effective batch at the same memory.
    grad_accum: int = Field(1, ge=1)
    # Sort units by length inside chunks of 8 micro-batches, so a batch wastes little padding.
    group_by_length: bool = True
    # Share of steps spent warming the learning rate up from near zero.
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    # Decay after warm-up ("constant" keeps the peak rate).
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    # Gradient-norm clip: keeps one bad batch from wrecking the adapter.
    max_grad_norm: float = Field(1.0, gt=0.0)
    # AdamW decoupled weight decay on the LoRA weights.
    weight_decay: float = Field(0.0, ge=0.0)
    # Longest prompt+response in tokens; longer ones are truncated (see truncate()).
    max_length: int = Field(1024, ge=8)
    # Recompute activations in the backward pass: less memory, ~30% more time.
    gradient_checkpointing: bool = False
    # bf16 autocast for forward passes on CUDA (ignored on CPU, where it is slower).
    bf16_autocast: bool = False
    # LoRA rank: capacity of the update (generators size their LoRA slots by it).
    lora_r: int = Field(16, ge=1)
    # LoRA scale numerator (the update is scaled by alpha / r).
    lora_alpha: float = Field(32, gt=0.0)
    # Dropout on the LoRA input during training only.
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # Modules to adapt: "all-linear" (every linear layer but the output head) or names.
    target_modules: str | list[str] = "all-linear"
    # Run the update as an `accelerate launch` subprocess (loop/launch.py, docs/scale.md):
    # {num_processes = N, config_file = "configs/accelerate/ddp.yaml"}; None: in-process.
    launch: LaunchOptions | None = None


class ReferenceOptions(LoRAOptions):
    """Options of the updaters whose loss measures the policy against a reference."""

    # "previous": the previous round's policy (Self-Rewarding, iterative DPO); "base": the
    # starting model in every round (the fixed reference of RLHFlow's iterative DPO).
    reference: Literal["previous", "base"] = "previous"


def reference_adapter(updater, ctx) -> tuple[str | None, str]:
    """(adapter folder or None, policy label) of the reference this round."""
    if getattr(updater.options, "reference", "previous") == "base" or ctx.adapter is None:
        return None, "base"
    return ctx.adapter, ctx.policy_label


class LoRAUpdater(loop.Updater):
    """Base of the LoRA updaters: options, LoRA config and the shared train loop."""

    Options = LoRAOptions

    def lora_rank(self) -> int | None:
        return self.options.lora_r

    def lora_config(self):
        from peft import LoraConfig

        opts = self.options
        return LoraConfig(
            r=opts.lora_r,
            lora_alpha=opts.lora_alpha,
            lora_dropout=opts.lora_dropout,
            target_modules=opts.target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )

    def autocast(self, device: str):
        if self.options.bf16_autocast and str(device).startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()


def plan(
    count: int, opts, seed: int, lengths: Sequence[int] | None = None
) -> list[tuple[int, list[list[int]]]]:
    """The optimizer steps: (epoch, micro-batches of unit indices), in a seeded order.

    Each epoch is a fresh permutation; a step never spans two epochs. With ``lengths``
    (and ``group_by_length``) each chunk of 8 micro-batches of the permutation is sorted
    by length, longest first, before it is cut, so sequences of a batch have similar
    lengths (little padding) while the data order stays random at the chunk level.
    With ``max_steps`` epochs repeat until there are that many steps.
    """
    out: list[tuple[int, list[list[int]]]] = []
    epoch = 0
    size = opts.batch_size
    while True:
        order = list(range(count))
        random.Random(derive_seed(seed, "dpo-epoch", epoch)).shuffle(order)
        if lengths is not None and getattr(opts, "group_by_length", False):
            chunk = 8 * size
            order = [
                i
                for s in range(0, count, chunk)
                for i in sorted(order[s : s + chunk], key=lambda i: -lengths[i])
            ]
        micro = [order[i : i + size] for i in range(0, count, size)]
        for i in range(0, len(micro), opts.grad_accum):
            out.append((epoch, micro[i : i + opts.grad_accum]))
        epoch += 1
        if opts.max_steps is not None:
            if len(out) >= opts.max_steps:
                return out[: opts.max_steps]
        elif epoch >= opts.epochs:
            return out


def lr_lambda(opts, total: int):
    """Multiplier of the peak rate at step s (0-based): linear warm-up, then decay.

    Warm-up reaches the peak on its last step ((s + 1) / warmup) so the first step
    already moves; decay ends just above zero on the final step.
    """
    warmup = math.ceil(opts.warmup_ratio * total)

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if opts.scheduler == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        if opts.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


MicroFn = Callable[[object, list[int]], tuple[torch.Tensor, dict[str, float]]]


def train(
    updater: LoRAUpdater,
    ctx,
    count: int,
    micro: MicroFn,
    *,
    lengths: Sequence[int] | None = None,
    init_from: str | None | object = ...,
    normaliser: Callable[[list[list[int]]], float] | None = None,
    extra_params: Sequence[torch.nn.Parameter] = (),
    after_step: Callable[[object], None] | None = None,
    plan_options=None,
) -> list[loop.TrainStep]:
    """Train the policy's LoRA slot: the shared loop of every updater.

    1. Continue ``init_from`` (default: the previous adapter, ``ctx.adapter``), or start
       a fresh LoRA from ``ctx.seed``; only LoRA weights (and ``extra_params``: a value
       or reward head) train.
    2. Plan the steps (``plan``, with ``plan_options`` or the updater's options): seeded
       per-epoch order, length-grouped micro-batches.
    3. Per step: for each micro-batch, ``micro`` gives per-unit losses; their sum over
       the step's ``normaliser`` (default: its size, so the gradient is the mean over
       its units; a token count for token-level losses) is back-propagated.
    4. Clip the gradient norm, AdamW step, schedule step, ``after_step(model)``; record a
       ``TrainStep`` whose metrics are ``micro``'s sums divided by the step's size.

    In a launched update (``[updater] launch``, loop/launch.py) each of the ``world``
    ranks takes every ``world``-th unit of each micro-batch and divides its losses by the
    whole step's normaliser; the gradients are summed across ranks (all-reduce, or
    FSDP2's reduce-scatter when the model is sharded), so every rank takes the step the
    one-process loop takes, and the loss and metrics are the ranks' sums.
    """
    opts = updater.options
    policy = ctx.policy()
    device = policy.device
    steps_plan = plan(count, plan_options or opts, ctx.seed, lengths)
    total = len(steps_plan)
    steps: list[loop.TrainStep] = []
    me, world = rank()
    sharded = world > 1 and fsdp_requested()
    with seeded(ctx.seed, device):
        start = ctx.adapter if init_from is ... else init_from
        model = policy.trainable(updater.lora_config(), init_from=start, seed=ctx.seed)
        if opts.gradient_checkpointing:
            model.base_model.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            model.enable_input_require_grads()
        if sharded:
            blocks = shard(model, device)
            ctx.event(f"FSDP2: the model sharded over {world} ranks ({blocks} blocks + the root)")
        params = [p for p in model.parameters() if p.requires_grad] + list(extra_params)
        # The fused kernel updates every LoRA tensor in one call (CPU and CUDA have one;
        # not for FSDP2's sharded tensors).
        fused = torch.device(device).type in ("cpu", "cuda") and not sharded
        optimizer = torch.optim.AdamW(
            params, lr=opts.learning_rate, weight_decay=opts.weight_decay, fused=fused
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opts, total))
        model.train()
        try:
            for number, (epoch, micro_batches) in enumerate(steps_plan, start=1):
                size = sum(len(mb) for mb in micro_batches)
                norm = normaliser(micro_batches) if normaliser is not None else size
                optimizer.zero_grad(set_to_none=True)
                total_loss = 0.0
                sums: dict[str, float] = {}
                for mb in micro_batches:
                    share = mb[me::world]  # a launched update: this rank's part of the batch
                    weight = 1.0
                    if not share:
                        if not sharded:
                            continue
                        # FSDP2's passes are collective: every rank runs one, at weight 0.
                        share, weight = mb[:1], 0.0
                    with updater.autocast(device):
                        losses, mb_sums = micro(model, share)
                    loss = losses.float().sum() / norm
                    if sharded:  # FSDP2 averages gradients over the ranks: times world, a sum
                        loss = loss * (weight * world)
                    loss.backward()
                    if weight:
                        total_loss += losses.detach().float().sum().item()
                        for k, v in mb_sums.items():
                            sums[k] = sums.get(k, 0.0) + v
                if world > 1:
                    reduce = list(extra_params) if sharded else params  # FSDP2 reduced the rest
                    total_loss, sums = _sum_ranks(reduce, total_loss, sums)
                grad_norm = clip(params, opts.max_grad_norm)
                optimizer.step()
                if after_step is not None:
                    after_step(model)
                record = loop.TrainStep(
                    step=number,
                    loss=total_loss / norm,
                    learning_rate=schedule.get_last_lr()[0],
                    grad_norm=grad_norm,
                    metrics={k: v / size for k, v in sums.items()},
                )
                record.metrics["train/epoch"] = float(epoch)
                schedule.step()
                steps.append(record)
                if not math.isfinite(record.loss):
                    break  # the weights are garbage from here; the runner fails the update
                ctx.progress(number, total, loss=record.loss)
        finally:
            if opts.gradient_checkpointing:
                model.base_model.model.gradient_checkpointing_disable()
            model.eval()
    return steps


def shard(model, device: str) -> int:
    """FSDP2 (``fully_shard``) over the ranks of a launched update: each of the model's
    no-split blocks (its decoder layers), then the transformers model as the root; the
    frozen base and the LoRA weights are sharded alike. Forward and backward passes
    gather and reduce-scatter them. Returns the number of blocks sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    inner = model.base_model.model  # PeftModel -> LoraModel -> the transformers model
    mesh = init_device_mesh(torch.device(device).type, (rank()[1],))
    blocks = set(getattr(inner, "_no_split_modules", None) or ())
    count = 0
    for module in inner.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
            count += 1
    fully_shard(inner, mesh=mesh)
    return count


def clip(params, max_norm: float) -> float:
    """Clip the gradient norm over ``params`` (FSDP2's sharded ones and plain ones, such
    as a value head, together); the norm before clipping."""
    from torch.distributed.tensor import DTensor

    dt = [p for p in params if isinstance(p, DTensor)]
    if not dt or len(dt) == len(params):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    plain = [p for p in params if not isinstance(p, DTensor)]
    a = torch.nn.utils.clip_grad_norm_(dt, float("inf")).full_tensor().float()
    b = torch.nn.utils.clip_grad_norm_(plain, float("inf")).float().to(a.device)
    total = float(torch.sqrt(a * a + b * b))
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return total


def _sum_ranks(params, total_loss: float, sums: dict[str, float]):
    """Across the ranks of a launched update: the gradients summed (each rank divided its
    share's losses by the whole step's normaliser, so the sum is the one-process gradient),
    and the step's loss and metric sums added up. Every rank then takes the same step."""
    import torch.distributed as dist

    if params:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (total_loss, sums))
    total = 0.0
    merged: dict[str, float] = {}
    for loss, part in gathered:  # in rank order: the same sums on every rank
        total += loss
        for k, v in part.items():
            merged[k] = merged.get(k, 0.0) + v
    return total, merged


def summary(steps: list[loop.TrainStep], units: int, unit_name: str) -> dict[str, float]:
    """Round metrics: mean and last loss, steps, units; other step metrics averaged over
    the last epoch."""
    last_epoch = steps[-1].metrics["train/epoch"]
    last = [s for s in steps if s.metrics["train/epoch"] == last_epoch]
    metrics = {
        "train/loss": sum(s.loss for s in steps) / len(steps),
        "train/final_loss": steps[-1].loss,
        "train/steps": float(len(steps)),
        f"train/{unit_name}": float(units),
    }
    for key in steps[-1].metrics:
        if key != "train/epoch":
            metrics[key] = sum(s.metrics.get(key, 0.0) for s in last) / len(last)
    return metrics


def forward_logps(model, prompts, responses, pad_id, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs [N] and response token counts [N], in one forward pass
    over the packed sequences (``plugins.sequences.sequence_logps``)."""
    logps = sequence_logps(model, prompts, responses, pad_id, device)
    counts = torch.tensor([len(r) for r in responses], dtype=torch.float32, device=logps.device)
    return logps, counts


def reference_logps(
    updater: LoRAUpdater,
    ctx,
    keys: Sequence[int | None],
    sequences: Sequence[Sequence[tuple[list[int], list[int]]]],
    tag: str,
) -> tuple[torch.Tensor, bool]:
    """Reference log-probs [N, k] of each unit's k sequences under the reference policy
    (``reference_adapter``: ``ctx.adapter``, or the base model with ``reference = "base"``).

    Computed once per round without gradients and stored in
    ``<run_dir>/cache/ref-round-<r>-<tag>.safetensors`` keyed by the units' ids (written
    to a temporary file, then renamed), so a resumed update phase reads them back instead
    of recomputing. Units without ids (component tests) are never cached. Returns the
    tensor and whether it came from the cache.
    """
    opts = updater.options
    ids = torch.tensor([-1 if k is None else int(k) for k in keys], dtype=torch.int64)
    cacheable = all(k is not None for k in keys) and ctx.store is not None
    path = Path(ctx.run_dir) / "cache" / f"ref-round-{ctx.round}-{tag}.safetensors"
    adapter, _ = reference_adapter(updater, ctx)
    meta = {"adapter": str(adapter), "max_length": str(opts.max_length)}
    stored = read_cache(path, meta, ids) if cacheable else None
    if stored is not None:
        return stored["logps"], True
    policy = ctx.policy()
    tok = policy.tokenizer
    width = len(sequences[0]) if sequences else 0
    out = torch.empty(len(sequences), width)
    with policy.using(adapter) as ref_model, torch.no_grad():
        ref_model.eval()
        for start in range(0, len(sequences), opts.batch_size):
            chunk = sequences[start : start + opts.batch_size]
            flat = [seq for unit in chunk for seq in unit]
            with updater.autocast(policy.device):
                logps, _ = forward_logps(
                    ref_model, [p for p, _ in flat], [r for _, r in flat], tok.pad_token_id,
                    policy.device,
                )
            out[start : start + len(chunk)] = logps.cpu().view(len(chunk), width)
    if cacheable:
        write_cache(path, {"ids": ids, "logps": out}, meta)
    return out, False


def read_cache(path: Path, meta: dict[str, str], ids: torch.Tensor) -> dict | None:
    """The tensors of a per-round cache file (``<run_dir>/cache/...``) when it exists and
    was written for these ``ids`` with this ``meta`` (adapter, max_length); else None."""
    if not path.is_file():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        stored_meta = f.metadata() or {}
    stored = load_file(str(path))
    if stored_meta == meta and torch.equal(stored["ids"], ids):
        return stored
    return None


def write_cache(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write a cache file atomically: a temporary file, fsynced, then renamed (rank 0 of
    a launched update only: every rank computed the same tensors)."""
    from safetensors.torch import save_file

    if rank()[0] != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def reward_sums(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """A micro-batch's sums of the pair reward metrics (``train`` turns them into means)."""
    return {
        "rewards/chosen": chosen.sum().item(),
        "rewards/rejected": rejected.sum().item(),
        "rewards/margin": (chosen - rejected).sum().item(),
        "rewards/accuracy": (chosen > rejected).float().sum().item(),
    }


def pair_lengths(examples) -> list[int]:
    """Tokens per encoded pair (prompt + response, chosen and rejected): for length grouping."""
    return [len(c[0]) + len(c[1]) + len(r[0]) + len(r[1]) for c, r in examples]


def chat_of(prompt: loop.Prompt, system: str | None) -> loop.Chat:
    """The prompt as the generator saw it (the round's system instruction if it has none)."""
    chat = prompt.chat()
    if system and not prompt.system:
        chat.insert(0, {"role": "system", "content": system})
    return chat


def encode(tok, prompt: loop.Prompt, text: str, system: str | None, max_length: int):
    """(prompt ids, response ids + EOS) for one answer, truncated to ``max_length``."""
    from plugins.sequences import encode_prompt, encode_response, truncate

    return truncate(
        encode_prompt(tok, chat_of(prompt, system)), encode_response(tok, text), max_length
    )


def require_selected(name: str, selection: loop.Selection, labels: set[str], selector: str):
    """The selected candidates with one of ``labels``, or a clear error naming the selector."""
    rows = [s for s in selection.selected if s.label in labels]
    if not rows:
        raise loop.UserError(
            f"{name} updater: the selection has no candidates labelled {sorted(labels)} "
            f"({len(selection.pairs)} pairs, {len(selection.selected)} other selected); "
            f"use the selector it needs (name = \"{selector}\")"
        )
    return rows
