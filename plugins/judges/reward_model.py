"""A local reward model as a judge: an ``AutoModelForSequenceClassification`` folder scores
each (prompt, response), formatted with the reward model's own chat template.

Config::

    [[judges]]
    name = "reward_model"
    path = "/models/Skywork-Reward-V2-Llama-3.2-1B"   # a local folder (config.json + safetensors)
    batch_size = 16
    weight = 0.5

The score is the model's logit number ``score_index`` (default 0) for the chat
``[user: prompt, assistant: response]``: one judgment per candidate, deterministic, so
it never fails to parse. Weights load from safetensors only; ``trust_remote_code`` is off
unless this section turns it on. Long chats are cut from the left (the answer's end is
what the head reads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, model_validator

import loop


def check_model_folder(path: str, base: Path | None) -> Path:
    """The folder of a sequence-classification model; ValueError naming what is missing."""
    p = Path(path).expanduser()
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    if not p.is_dir():
        raise ValueError(
            f"reward model folder {p} not found; give `path` = a local Hugging Face "
            "AutoModelForSequenceClassification folder (runs never download)"
        )
    if not (p / "config.json").is_file():
        raise ValueError(f"reward model folder {p} has no config.json; give a Hugging Face model folder")
    if not any(p.glob("*.safetensors")):
        raise ValueError(
            f"reward model folder {p} has no .safetensors weights; only safetensors are loaded "
            "(convert .bin weights with save_pretrained(safe_serialization=True))"
        )
    return p.resolve()


class RewardModelJudge(loop.Judge):
    """Scores candidates with a sequence-classification reward model, in batches."""

    name = "reward_model"

    class Options(loop.Judge.Options):
        # A local AutoModelForSequenceClassification folder (relative to the config file).
        path: str
        # Which output logit is the reward (0 for the usual one-label reward head). It was
        # `label` before 0.2, which is the judge's own name: loop/config.py says so.
        score_index: int = Field(0, ge=0)
        # Chats per forward pass.
        batch_size: int = Field(16, ge=1)
        # Tokens kept per chat (cut from the left).
        max_length: int = Field(2048, ge=8)
        device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")  # auto: cuda if any
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU
        # Run code shipped with the reward model; off unless you trust it.
        trust_remote_code: bool = False

        @model_validator(mode="after")
        def _folder(self, info: ValidationInfo):
            # stored absolute, so a resumed run (config read from the run folder) finds it
            self.path = str(check_model_folder(self.path, (info.context or {}).get("source_dir")))
            return self

    def setup(self, ctx) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        o = self.options
        folder = check_model_folder(o.path, ctx.config.source_dir)
        device = o.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "auto": torch.bfloat16 if device.startswith("cuda") else torch.float32}[o.dtype]
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=o.trust_remote_code)
        if not tok.chat_template:
            raise loop.UserError(
                f"reward model folder {folder}: its tokenizer has no chat template; use a "
                "reward model saved with one (tokenizer_config.json `chat_template`)"
            )
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
        tok.truncation_side = "left"
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), dtype=dtype, use_safetensors=True, trust_remote_code=o.trust_remote_code)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        if o.score_index >= model.config.num_labels:
            raise loop.UserError(
                f"reward model folder {folder} has {model.config.num_labels} output(s); "
                f"`score_index` must be below that (got {o.score_index})"
            )
        self._tok, self._model = tok, model.to(device).eval()

    def close(self) -> None:
        self._model = self._tok = None

    def texts(self, candidates: list[loop.Candidate]) -> list[str]:
        """Each (prompt, response) as the reward model's chat template writes it."""
        return [
            self._tok.apply_chat_template(
                [*c.prompt.chat(), {"role": "assistant", "content": c.text}], tokenize=False)
            for c in candidates
        ]

    def score_texts(self, texts: list[str]) -> list[float]:
        import torch

        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.options.batch_size):
                batch = self._tok(texts[start:start + self.options.batch_size], padding=True,
                                  truncation=True, max_length=self.options.max_length,
                                  add_special_tokens=False, return_tensors="pt")
                batch = {k: v.to(self._model.device) for k, v in batch.items()}
                logits = self._model(**batch).logits
                out.extend(logits[:, self.options.score_index].float().tolist())
        return out

    def judge(self, ctx, candidates: list[loop.Candidate]) -> loop.JudgeResult:
        judgments = []
        size = self.options.batch_size
        for start in range(0, len(candidates), size):
            chunk = candidates[start:start + size]
            for c, score in zip(chunk, self.score_texts(self.texts(chunk))):
                judgments.append(loop.Judgment(candidate=c, score=score, raw=f"{score:.6g}"))
            ctx.progress(start + len(chunk), len(candidates))
        return loop.JudgeResult(judgments=judgments)


@loop.hookimpl
def register_judges(register):
    register(RewardModelJudge)
