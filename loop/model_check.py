"""Checking the model folder at validation, before the run folder exists.

``check_model_folder`` looks at the files only (no weights loaded): config.json, safetensors
weights, a chat template (the tokenizer's, or ``[model] chat_template``), whether the
architecture needs code shipped with the model while ``trust_remote_code`` is off, and
the generator's own limits (``Generator.check_model``: vLLM's head sizes on CPU). Each
problem is one ``ConfigError`` naming ``model.path`` and the fix (exit 2, nothing written).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from loop.errors import ConfigError, UserError

# A hub id: "name" or "org/name", nothing that reads as a path.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def looks_like_hub_id(raw: str) -> bool:
    return bool(HUB_ID.match(raw)) and not raw.startswith((".", "~")) and not raw.endswith(".")


def resolve_chat_template(config) -> None:
    """``[model] chat_template``: a file's text, or the template itself (kept as text)."""
    value = config.model.chat_template
    if not value:
        return
    if "{%" in value or "{{" in value:
        return
    p = Path(value).expanduser()
    if not p.is_absolute() and config.source_dir is not None:
        p = Path(config.source_dir) / p
    if not p.is_file():
        raise ConfigError(
            f"{value!r} is neither a file nor a jinja chat template; give the path of a "
            ".jinja file (relative to the config) or the template text",
            file=config.source_file, field="model.chat_template",
        )
    config.model.chat_template = p.read_text(encoding="utf-8")


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        tok = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(tok.get("chat_template"))


def check_model_folder(folder: str, config, generator, device: str) -> None:
    """Every check of the module docstring; ``folder`` is a resolved local model folder."""
    p = Path(folder)
    where = dict(file=config.source_file, field="model.path")
    if not generator.loads_model_folder:
        generator.check_model(str(p), device)
        return
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{str(p)!r}: config.json cannot be read ({e}); give a Hugging Face "
                          "model folder", **where) from None
    weights = list(p.glob("*.safetensors")) or list(p.glob("*.safetensors.index.json"))
    if not weights:
        other = sorted(f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f" (found {', '.join(other[:3])})" if other else ""
        raise ConfigError(
            f"{str(p)!r} has no safetensors weights{found}; selfloop loads safetensors only "
            "(never pickle): convert the weights, e.g. `model.save_pretrained(folder, "
            "safe_serialization=True)`", **where)
    if not _has_chat_template(p) and not config.model.chat_template:
        raise ConfigError(
            f"{str(p)!r} has no chat template (tokenizer_config.json has no chat_template, no "
            "chat_template.jinja); use an instruction-tuned model, or give one with "
            "[model] chat_template = \"template.jinja\" (a file or the template text)", **where)
    model_type = cfg.get("model_type")
    known = _known_model_type(model_type)
    if not config.model.trust_remote_code and (known is False) and cfg.get("auto_map"):
        raise ConfigError(
            f"{str(p)!r} (model_type {model_type!r}) needs code shipped in the folder "
            "(config.json auto_map), and trust_remote_code is off; read that code, then set "
            "[model] trust_remote_code = true, or use a model transformers supports natively",
            **where)
    if known is False and not cfg.get("auto_map"):
        raise ConfigError(
            f"{str(p)!r}: transformers does not know model_type {model_type!r}; upgrade "
            "transformers or use a supported architecture", **where)
    try:
        generator.check_model(str(p), device)
    except ConfigError:
        raise
    except UserError as e:
        raise ConfigError(str(e).removeprefix("model.path: "), **where) from None


def _known_model_type(model_type) -> bool | None:
    if not model_type:
        return None
    try:
        from transformers import CONFIG_MAPPING
    except Exception:  # pragma: no cover
        return None
    return model_type in CONFIG_MAPPING
