"""A run's config: one TOML file, validated before anything is written.

The core validates the top level (this module); each component validates its own
section with its own ``Options`` model once the plugins are loaded (``resolve``). Any
error is a ``ConfigError``: one line naming the file, the field and what would fix it.

A minimal config::

    name = "my-run"
    rounds = 3

    [model]
    path = "Qwen/Qwen2.5-0.5B-Instruct"   # a local folder or a cached hub name

    [[prompts]]
    name = "dataset"
    path = "prompts.jsonl"

    [[judges]]
    name = "self_reward"

    [updater]
    name = "dpo"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from loop.checked import Checked
from loop.errors import ConfigError
from loop.guards import GuardsConfig

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# A run folder is <name>, built as .<name>.creating-<pid>: well under the 255-byte limit.
NAME_MAX = 200
# Seeds reach random, numpy (< 2**32), torch and an SQLite integer column.
SEED_MAX = 2**32 - 1


class Strict(Checked):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ComponentSpec(Checked):
    """``{name = "...", <the component's own options>}``."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    name: str = Field(min_length=1)

    def options(self) -> dict[str, Any]:
        core = set(type(self).model_fields)
        return {k: v for k, v in self.model_dump().items() if k not in core}


class JudgeSpec(ComponentSpec):
    weight: float = Field(1.0, gt=0)  # share of this judge in the combined score
    label: str | None = Field(None, pattern=NAME_RE)  # tells two judges of one kind apart

    @field_validator("label", mode="before")
    @classmethod
    def _renamed(cls, value):
        # Migration: reward_model's logit index used to be called `label`, which is this
        # field (the judge's name), so a number here is that old option.
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(
                f"`label` names the judge (text); the reward model's logit index, once called "
                f"`label`, is now `score_index`: write score_index = {value}"
            )
        return value


class EvaluatorSpec(ComponentSpec):
    label: str | None = Field(None, pattern=NAME_RE)  # names its metrics: eval/<label>/...


class ModelConfig(Strict):
    path: str | None = None  # a Hugging Face model folder or a hub name already in the cache
    build: ComponentSpec | None = None  # or a model builder plugin, e.g. {name = "tinyworld"}
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")  # auto: cuda if any
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU
    trust_remote_code: bool = False  # run code shipped with the model; off unless you trust it
    threads: int | None = Field(None, ge=1)  # torch CPU threads, fixed (None: SELFLOOP_THREADS, else the available cores, lowered while other processes use some)
    # A chat template for a model folder without one: a .jinja file (relative to this
    # config) or the template itself; saved in the run's config as the template text.
    chat_template: str | None = None
    # QLoRA: load the base quantised by bitsandbytes for training (CUDA only; pip install
    # 'selfloop[qlora]'); None: full precision. The vLLM generator serves the unquantised base.
    quantization: Literal["4bit", "8bit"] | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.build is None):
            raise ValueError("give exactly one of model.path (a folder) or model.build (a builder)")
        return self

    @model_validator(mode="after")
    def _quantization_needs_cuda(self):
        if self.quantization is None:
            return self
        from loop.policy import resolve_device

        device = resolve_device(self.device)
        if not device.startswith("cuda"):
            raise ValueError(
                f"model.quantization = {self.quantization!r} (QLoRA through bitsandbytes) needs a "
                f"CUDA GPU, and model.device is {device!r} here; remove model.quantization on CPU")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError(f"model.quantization = {self.quantization!r} needs bitsandbytes: "
                             "pip install 'selfloop[qlora]'") from None
        return self


class GenerateConfig(Strict):
    n: int = Field(4, ge=1, le=256)  # candidates per prompt (two or more to make pairs)
    temperature: float = Field(1.0, ge=0)  # 0 is greedy; pairs need diverse samples
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)


class JudgeQualityConfig(Strict):
    # The dashboard warns when a judge's score-length correlation passes this.
    length_bias_threshold: float = Field(0.5, ge=-1, le=1)
    # ... or when selected chosen answers are this many times longer than rejected ones.
    length_ratio_threshold: float = Field(1.5, gt=0)


class RunnerConfig(Strict):
    # A phase running longer than this fails with a message (None: no limit). It is a
    # SIGALRM timer in the main thread, disarmed before the phase's commit
    # (loop/interrupts.py); --set runner.phase_timeout_s=N changes it on resume.
    phase_timeout_s: float | None = Field(None, gt=0, allow_inf_nan=False)
class SelectionConfig(Strict):
    # How several judges' scores become one per candidate (see loop/combine.py): "mean"
    # (raw weighted mean), "zscore" (per judge over the round) or "rank" (per judge within
    # each prompt's candidates). In every method a candidate missing one of the judges
    # that scored its prompt is left out of the comparison.
    combine: Literal["mean", "zscore", "rank"] = "mean"


class StageSpec(Strict):
    """``[[stages]]``: consecutive rounds trained by their own updater (and selector), e.g.
    SL-CAI (``sft`` on revisions) then RL-CAI (``dpo`` on preferences) in one run. What a
    stage leaves out is the top-level ``[updater]`` / ``[selector]``."""

    rounds: int = Field(ge=1, le=10_000)  # consecutive rounds of this stage
    updater: ComponentSpec | None = None
    selector: ComponentSpec | None = None


class RunConfig(Strict):
    name: str = Field(pattern=NAME_RE, max_length=NAME_MAX)  # the run folder: <runs_dir>/<name>
    rounds: int = Field(ge=1, le=10_000)  # self-improvement rounds after round 0
    seed: int = Field(0, ge=0, le=SEED_MAX)  # every phase's seed derives from it
    runs_dir: str = "runs"  # relative to the working directory
    plugins: list[str] = []  # extra single-file plugins (paths, relative to this file)
    model: ModelConfig
    generator: ComponentSpec = ComponentSpec(name="hf")
    generate: GenerateConfig = GenerateConfig()
    prompts: list[ComponentSpec] = Field(min_length=1)  # prompt sources, all used each round
    optimisers: list[ComponentSpec] = []  # prompt optimisers, applied in order
    judges: list[JudgeSpec] = Field(min_length=1)
    selector: ComponentSpec = ComponentSpec(name="pairs")
    updater: ComponentSpec | None = None  # required unless every [[stages]] entry names one
    stages: list[StageSpec] = []  # per-round updater / selector choice (docs/methods.md)
    evaluators: list[EvaluatorSpec] = []
    observers: list[ComponentSpec] = []  # trackers and loggers on the lifecycle hooks
    judge_quality: JudgeQualityConfig = JudgeQualityConfig()  # length-bias warnings
    guards: GuardsConfig = GuardsConfig()  # fail a phase loudly instead of learning nothing
    runner: RunnerConfig = RunnerConfig()  # phase_timeout_s
    selection: SelectionConfig = SelectionConfig()  # how judges' scores are combined

    # Where the config came from (not part of the file).
    source_file: str | None = Field(None, exclude=True)
    source_dir: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _stages_cover_the_rounds(self):
        if self.updater is None and (not self.stages or any(s.updater is None for s in self.stages)):
            raise ValueError(
                "updater: required field is missing; add an [updater] section (or an updater "
                "in every [[stages]] entry)"
            )
        if self.stages and sum(s.rounds for s in self.stages) != self.rounds:
            raise ValueError(
                f"stages: their rounds add up to {sum(s.rounds for s in self.stages)} but the run "
                f"has rounds = {self.rounds}; make them equal"
            )
        return self

    @model_validator(mode="after")
    def _labels_unique(self):
        for field in ("judges", "evaluators"):
            seen: set[str] = set()
            for i, spec in enumerate(getattr(self, field)):
                label = spec.label or spec.name
                if label in seen:
                    raise ValueError(
                        f"{field}[{i}]: two {field} are labelled {label!r}; give each a "
                        "distinct `label`"
                    )
                seen.add(label)
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _hint(err: dict, fields: list[str] | None) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        known = f" (known fields: {', '.join(fields)})" if fields else ""
        return f"unknown field; remove it or fix its spelling{known}"
    if kind == "missing":
        return "required field is missing; add it"
    got = err.get("input")
    shown = json.dumps(got, default=str) if got is not None else "nothing"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{err['msg'][0].lower()}{err['msg'][1:]} (got {shown})"


def format_validation_error(e: ValidationError, model: type[BaseModel] | None = None) -> tuple[str, str]:
    """(field, message) for the first error of a pydantic ValidationError."""
    err = e.errors()[0]
    loc = tuple(p for p in err["loc"] if p not in ("function-after",))
    fields = None
    if err["type"] == "extra_forbidden" and model is not None:
        fields = _known_fields(model, loc[:-1])
    message = _hint(err, fields)
    if err["type"] == "value_error":
        message = str(err["msg"]).removeprefix("Value error, ")
    more = len(e.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return _loc(loc), message


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str] | None:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        target = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if target is None:
            return None
        current = target
    return sorted(getattr(current, "model_fields", {}))


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``"judges.0.samples=3"`` -> (["judges", 0, "samples"], 3); values are TOML."""
    if "=" not in text:
        raise ConfigError(
            f"--set {text!r}: expected SECTION.KEY=VALUE, for example --set generate.n=8"
        )
    key, _, raw = text.partition("=")
    path: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    if any(p == "" for p in path):  # (not `all(path)`: index 0 is falsy)
        raise ConfigError(f"--set {text!r}: empty key segment; write for example generate.n=8")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: take it as a string
    return path, value


def apply_override(data: dict, path: list[str | int], value: Any, text: str) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ConfigError(
                    f"--set {text}: {_loc(tuple(path[: i + 1]))} does not exist "
                    f"(the list has {len(node) if isinstance(node, list) else 0} entries)"
                )
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {_loc(tuple(path[:i]))} is not a section")
            if part not in node:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last > len(node):
            raise ConfigError(f"--set {text}: no list entry {last} to set")
        if last == len(node):
            node.append(value)
        else:
            node[last] = value
    else:
        if not isinstance(node, dict):
            raise ConfigError(f"--set {text}: {_loc(tuple(path[:-1]))} is not a section")
        node[last] = value


def read_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError("file not found; give the path of a run config (.toml)", file=str(path))
    if p.is_dir():
        raise ConfigError("is a folder; give the path of a run config (.toml)", file=str(path))
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text; save the config as UTF-8 TOML", file=str(path))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"TOML syntax error: {e}; fix the syntax", file=str(path)) from None


def load_config(path: str | Path | None, overrides: list[str] = (), data: dict | None = None) -> RunConfig:
    """Read, override and validate the core of a run config (components come later)."""
    label = str(path) if path is not None else "<config>"
    if data is None:
        data = read_toml(path)
    for text in overrides:
        try:
            keys, value = parse_override(text)
            apply_override(data, keys, value, text)
        except ConfigError as e:  # name the file the override applies to
            raise ConfigError(str(e), file=label) from None
    source_dir = Path(path).resolve().parent if path is not None else Path.cwd()
    return config_from_dict(data, source_dir=source_dir, label=label)


def config_from_dict(data: dict, source_dir: Path | None = None, label: str = "<config>") -> RunConfig:
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as e:
        field, message = format_validation_error(e, RunConfig)
        raise ConfigError(message, file=label, field=field) from None
    config.source_file = label
    config.source_dir = source_dir or Path.cwd()
    return config

