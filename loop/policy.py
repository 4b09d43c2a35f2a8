"""The policy: one base model plus the LoRA adapter of the current round.

One ``Policy`` per run process. The transformers generator and the PEFT updaters share
its model object (no copy): the generator activates a round's adapter to sample, the
updater makes the adapter trainable, trains it in place and saves it.

Security defaults: ``trust_remote_code`` comes from the config (off by default) and
weights load from safetensors only.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from loop.errors import UserError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def resolve_device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class Policy:
    """Lazily loaded base model + tokenizer, with one LoRA slot ("default")."""

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        threads: int | None = None,
        chat_template: str | None = None,
        quantization: str | None = None,
    ):
        self.model_path = str(model_path)
        self.quantization = quantization  # "4bit" | "8bit": QLoRA through bitsandbytes (CUDA)
        self.device = resolve_device(device)
        self.dtype_name = dtype
        self.trust_remote_code = trust_remote_code
        self.threads = threads
        self.chat_template = chat_template  # replaces the tokenizer's own, if given
        self._tokenizer = None
        self._base = None  # the transformers model (LoRA layers injected once a PeftModel exists)
        self._peft = None  # peft.PeftModel wrapping _base, once an adapter is used
        self.active: str | None = None  # adapter folder whose weights are in the slot

    # -- loading -----------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(
                    self.model_path, trust_remote_code=self.trust_remote_code
                )
            except (OSError, ValueError) as e:
                raise UserError(
                    f"model.path: cannot load a tokenizer from {self.model_path!r} ({e}); "
                    "give a Hugging Face model folder or a cached hub name"
                ) from e
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            if self.chat_template:
                tok.chat_template = self.chat_template
            if not getattr(tok, "chat_template", None):
                raise UserError(
                    f"model.path: the tokenizer of {self.model_path!r} has no chat template; "
                    "use an instruction-tuned model or add chat_template to tokenizer_config.json"
                )
            self._tokenizer = tok
        return self._tokenizer

    @property
    def base(self):
        if self._base is None:
            from transformers import AutoModelForCausalLM

            from loop import malloc
            from loop.threads import apply as apply_threads

            # [model] threads, else SELFLOOP_THREADS, else the cores we may run on
            apply_threads(self.threads)
            malloc.tune()  # freed tensor memory kept for reuse (loop/malloc.py); once
            if "TRANSFORMERS_VERBOSITY" not in os.environ:
                # Generation warnings would scroll the dashboard away; opt back in with
                # TRANSFORMERS_VERBOSITY=warning.
                from transformers.utils import logging as hf_logging

                hf_logging.set_verbosity_error()
            dtype = resolve_dtype(self.dtype_name, self.device)
            extra = quantized_loading(self.quantization, dtype, self.device)
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    self.model_path,
                    dtype=dtype,
                    trust_remote_code=self.trust_remote_code,
                    use_safetensors=True,
                    **extra,
                )
            except (OSError, ValueError) as e:
                raise UserError(
                    f"model.path: cannot load {self.model_path!r} as a causal LM from "
                    f"safetensors ({e}); give a Hugging Face model folder with model.safetensors"
                ) from e
            if not self.quantization:  # bitsandbytes placed it (device_map); .to() refuses
                model.to(self.device)
            model.eval()
            from loop.threads import govern

            # the automatic thread count follows the cores other processes leave free
            govern(model, self.threads)
            self._base = model
        return self._base

    @property
    def model(self):
        """The model to run: the PeftModel once an adapter exists, else the base model."""
        return self._peft if self._peft is not None else self.base

    # -- adapters ----------------------------------------------------------------

    def activate(self, adapter: str | None) -> None:
        """Put ``adapter``'s weights in the slot (None: the base model, LoRA disabled)."""
        if adapter is None:
            self.active = None
            return
        adapter = str(adapter)
        if self.active == adapter:
            return
        self._load_adapter(adapter, trainable=False)
        self.active = adapter

    @contextmanager
    def using(self, adapter: str | None) -> Iterator[object]:
        """``with policy.using(path) as model:`` runs ``model`` as base + that adapter."""
        self.activate(adapter)
        model = self.model
        if adapter is None and self._peft is not None:
            with self._peft.disable_adapter():
                yield model
        else:
            yield model

    def trainable(self, lora_config, *, init_from: str | None, seed: int):
        """Make the slot trainable and return the PeftModel.

        ``init_from`` is the previous round's adapter folder (its weights and config are
        continued); None starts a fresh adapter from ``lora_config`` with ``seed``.
        """
        import torch

        if init_from is not None:
            if self.quantization and self._peft is None:
                from peft import prepare_model_for_kbit_training

                prepare_model_for_kbit_training(self.base, use_gradient_checkpointing=False)
            self._load_adapter(str(init_from), trainable=True)
        else:
            from peft import get_peft_model

            torch.manual_seed(seed)
            if self._peft is None:
                base = self.base
                if self.quantization:  # QLoRA: PEFT's k-bit preparation, once, before LoRA
                    from peft import prepare_model_for_kbit_training

                    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
                self._peft = get_peft_model(base, lora_config)
            else:
                self._peft.delete_adapter("default")
                self._peft.add_adapter("default", lora_config)
                self._peft.set_adapter("default")
        self._to_device()
        for name, p in self._peft.named_parameters():
            p.requires_grad = "lora_" in name
        self.active = None  # weights are about to change; no folder holds them yet
        return self._peft

    def _load_adapter(self, path: str, *, trainable: bool) -> None:
        from peft import LoraConfig, PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(path)
        if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
            raise UserError(
                f"{folder}: not a PEFT adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
            )
        # A damaged folder is one line naming the file and the way out, not PEFT's traceback.
        try:
            config = LoraConfig.from_pretrained(str(folder))
        except Exception as e:
            raise damaged_adapter(folder / ADAPTER_CONFIG, e) from None
        try:
            state = load_file(str(folder / ADAPTER_WEIGHTS), device="cpu")
        except Exception as e:
            raise damaged_adapter(folder / ADAPTER_WEIGHTS, e) from None
        config.inference_mode = not trainable
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(
                self.base, str(folder), is_trainable=trainable, config=config
            )
        else:
            current = self._peft.peft_config["default"]
            if _lora_shape(current) != _lora_shape(config):
                self._peft.delete_adapter("default")
                self._peft.add_adapter("default", config)
                self._peft.set_adapter("default")
            state = {k: v.to(self.device) for k, v in state.items()}
            result = set_peft_model_state_dict(self._peft, state, adapter_name="default")
            # Every LoRA weight of the slot must come from the folder: a missing one would
            # silently keep the previous round's value.
            missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
            unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if missing or unexpected:
                raise UserError(
                    f"{folder}: adapter weights do not fit the model "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
        self._to_device()
        self._peft.eval()

    def _to_device(self) -> None:
        if self.quantization:  # LoRA layers are made on the quantised layers' device
            return
        self._peft.to(self.device)

    def save_adapter(self, output_dir: str) -> None:
        """Write the slot as a standard PEFT folder (adapter_config.json + safetensors)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        if self._peft is None:
            raise RuntimeError("no adapter to save")
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(self._peft, adapter_name="default")
        # FSDP2-sharded weights (a launched update) are gathered: a collective every rank runs.
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().to("cpu").contiguous()
                 for k, v in state.items()}
        save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = self._peft.peft_config["default"]
        config.save_pretrained(str(out))
        # PEFT writes base_model_name_or_path from the loaded model; keep it pointing at
        # the folder we loaded so `PeftModel.from_pretrained(base, adapter)` just works.
        cfg_path = out / ADAPTER_CONFIG
        data = json.loads(cfg_path.read_text())
        data["base_model_name_or_path"] = self.model_path
        data["inference_mode"] = True
        # PEFT writes target_modules from a set, in hash order: sort for identical files
        if isinstance(data.get("target_modules"), list):
            data["target_modules"] = sorted(data["target_modules"])
        cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True))
        _fsync_dir(out)


def quantized_loading(quantization: str | None, dtype, device: str) -> dict:
    """``from_pretrained`` keywords for a QLoRA base (bitsandbytes 4-bit NF4 with double
    quantisation and ``dtype`` compute, or 8-bit), placed whole on ``device``; {} without."""
    if not quantization:
        return {}
    if not str(device).startswith("cuda"):
        raise UserError(f"model.quantization = {quantization!r} needs a CUDA device "
                        f"(bitsandbytes); model.device is {device!r}")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise UserError(f"model.quantization = {quantization!r} needs bitsandbytes "
                        f"({e}); pip install 'selfloop[qlora]'") from None
    if quantization == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": device}}


def damaged_adapter(file: Path, error: Exception) -> UserError:
    """The message for an adapter file that cannot be read, with the way to re-make it."""
    import re

    folder = file.parent
    m = re.fullmatch(r"round-(\d+)", folder.name)
    if m and folder.parent.name == "adapters":
        from loop.integrity import redo_hint

        fix = redo_hint(folder.parent.parent, int(m.group(1)))
    else:
        fix = "replace the folder with one saved by PEFT's save_pretrained"
    return UserError(f"{file}: cannot be read as part of a PEFT adapter "
                     f"({type(error).__name__}: {str(error)[:200]}); {fix}")


def _lora_shape(config) -> tuple:
    return (
        config.r,
        tuple(sorted(config.target_modules)) if config.target_modules else None,
        config.lora_alpha,
    )


def _fsync_dir(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def install_adapter(tmp_dir: str, final_dir: str) -> None:
    """Atomically move a finished adapter folder into place (replacing a stale one).

    Its files get the mode any other file would (0644 under the usual umask): safetensors
    writes 0600, which keeps other users and a separate vLLM server account out."""
    for f in Path(tmp_dir).rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o666 & ~_umask())
    final = Path(final_dir)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp_dir, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
