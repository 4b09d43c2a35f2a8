"""The component kinds a plugin can provide, and the records they pass around.

Each kind is a small base class with one method to implement and a pydantic
``Options`` model (unknown fields refused). A plugin registers the class; the
runner builds one instance per run from the config section that names it::

    class LengthJudge(loop.Judge):
        name = "length"

        class Options(loop.Judge.Options):
            target: int = 20

        def judge(self, ctx, candidates):
            return loop.JudgeResult(judgments=[
                loop.Judgment(candidate=c, score=-abs(len(c.text) - self.options.target), raw="")
                for c in candidates
            ])

Records (``Prompt``, ``Candidate``, ``Judgment``, ...) are plain dataclasses. Components
return them; the runner stores them, in one transaction per phase, and fills in ``id``.
A record made in the same phase can be referred to by object (a judgment of a revision
the same judge just wrote): the runner stores referenced records first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict

from loop.checked import Checked

if TYPE_CHECKING:  # pragma: no cover
    from loop.context import Context

# A chat is a list of {"role": "system" | "user" | "assistant", "content": str}.
Chat = list[dict[str, str]]


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class Prompt:
    """A prompt of one round. ``parent`` links a rewrite or a derived prompt to its source."""

    text: str
    source: str = ""
    system: str | None = None
    parent: Prompt | None = None
    kind: str = "original"  # "original" | "rewrite" | "derived"
    meta: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
    round: int | None = None
    # The reference answer, where the prompt has one (a dataset's `answer` field, a task's
    # solution): read by the `verify` judge and evaluator, never shown to the policy.
    answer: str | None = None

    def chat(self) -> Chat:
        """The prompt as a chat: an optional system message, then the user message."""
        messages: Chat = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": self.text})
        return messages


@dataclass
class Completion:
    """What a generator returns for one sample."""

    text: str
    num_tokens: int
    finish_reason: str  # "stop" (end of sequence) | "length" (max_new_tokens reached)
    logprob_sum: float | None = None  # sum of the sampled tokens' log-probs under the policy


@dataclass(eq=False)
class Candidate:
    """One answer to a prompt: sampled from a policy, or written by a judge (a revision)."""

    prompt: Prompt
    text: str
    policy: str = "base"  # "base" or "round-<r>": the adapter that wrote it
    sample_index: int = 0
    num_tokens: int | None = None
    finish_reason: str | None = None
    logprob_sum: float | None = None
    source: str = "policy"  # "policy" | "revision" | a plugin's own word
    parent: Candidate | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
    round: int | None = None


@dataclass(eq=False)
class Judgment:
    """One judge sample for one candidate.

    ``score`` is None when the judge's output could not be parsed: that is a recorded
    failure, never a coerced score. ``raw`` is the judge's own text, stored as is.
    """

    candidate: Candidate
    score: float | None
    raw: str = ""
    sample_index: int = 0
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    judge: str | None = None  # filled in by the runner: the judge's configured label
    id: int | None = None


@dataclass(eq=False)
class Pair:
    """A preference pair: ``chosen`` is preferred to ``rejected`` for ``prompt``."""

    prompt: Prompt
    chosen: Candidate
    rejected: Candidate
    chosen_score: float | None = None
    rejected_score: float | None = None
    source: str = "selector"  # "selector" | "revision" | a judge's name
    id: int | None = None

    @property
    def margin(self) -> float | None:
        if self.chosen_score is None or self.rejected_score is None:
            return None
        return self.chosen_score - self.rejected_score


@dataclass(eq=False)
class Selected:
    """A candidate chosen as training data on its own (top-k sets, ranked lists, labels)."""

    candidate: Candidate
    score: float | None = None
    rank: int = 0  # 0 = best within its group
    label: str = "top"  # "top" | "desirable" | "undesirable" | "ranked"
    group: int | None = None  # prompt id, or another grouping key
    id: int | None = None


@dataclass
class JudgeResult:
    """What a judge returns.

    ``outputs`` and ``truncated`` count the texts the judge had a model write (gradings,
    critiques, revisions) and how many of them stopped at ``max_new_tokens``
    (``finish_reason == "length"``); the runner stores ``judge/<label>/truncated_rate``
    and checks it against ``[guards] max_truncated_rate``. A judge that writes nothing
    (a verifier, a reward model, log-prob preferences) leaves both at 0. Count with
    ``result.count(completions)``.
    """

    judgments: list[Judgment] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)  # new ones (revisions)
    pairs: list[Pair] = field(default_factory=list)  # pairs the judge offers the selector
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: int = 0  # model-written texts behind this result
    truncated: int = 0  # ... of which cut at max_new_tokens
    truncated_sample: str | None = None  # the first cut-off text (shown by the guard)

    def count(self, completions: Sequence[Completion]) -> None:
        """Add generator outputs to ``outputs`` / ``truncated``."""
        for comp in completions:
            self.outputs += 1
            if comp.finish_reason == "length":
                self.truncated += 1
                if self.truncated_sample is None:
                    self.truncated_sample = comp.text


@dataclass
class Selection:
    pairs: list[Pair] = field(default_factory=list)
    selected: list[Selected] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs) + len(self.selected)


@dataclass
class Instruction:
    """A scored candidate system instruction (OPRO's history); stored in ``instructions``."""

    text: str
    score: float | None
    step: int = 0  # search step within the round (0: seed instructions)
    scored_on: int = 0  # how many judge scores ``score`` averages
    chosen: bool = False  # the round's system instruction
    meta: dict[str, Any] = field(default_factory=dict)
    optimiser: str | None = None  # filled in by the runner: the optimiser's label
    id: int | None = None
    round: int | None = None


@dataclass(eq=False)
class RewriteDecision:
    """A prompt optimiser's gate for one rewrite; stored in ``rewrite_decisions``."""

    prompt: Prompt  # the original
    rewrite: Prompt
    original_score: float | None
    rewrite_score: float | None
    kept: bool
    reason: str  # "better" | "not better" | "unscored" | "rewriter rejected"
    validation: bool = False  # in the sample that decided whether the rewriter is adopted
    optimiser: str | None = None  # filled in by the runner


@dataclass
class OptimiseResult:
    prompts: list[Prompt]  # the prompts generation should answer this round
    system: str | None = None  # a system instruction for the round (OPRO)
    # Also the deployed system prompt of the round's policy: evaluators answer with it.
    deploy: bool = True
    new_prompts: list[Prompt] = field(default_factory=list)  # rewrites to store
    metrics: dict[str, float] = field(default_factory=dict)
    instructions: list[Instruction] = field(default_factory=list)  # scored instructions to store
    decisions: list[RewriteDecision] = field(default_factory=list)  # rewrite gates to store


@dataclass
class TrainStep:
    step: int
    loss: float
    learning_rate: float | None = None
    grad_norm: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # "rewards/margin": ...


@dataclass
class UpdateResult:
    steps: list[TrainStep] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    # The policy the loss measured against ("base" | "round-<r>"); None: no reference.
    reference: str | None = None


@dataclass
class Sampling:
    """Sampling settings for one generate call."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0


# ---------------------------------------------------------------------------
# Component kinds
# ---------------------------------------------------------------------------


class Component:
    """Base of every component kind.

    ``name`` is what a config uses to choose the component. ``Options`` validates the
    config section (every key but ``name``); unknown keys are refused.
    """

    kind: ClassVar[str] = "component"
    name: ClassVar[str] = ""
    plugin: ClassVar[str | None] = None  # set by the plugin manager on registration

    class Options(Checked):
        # Unknown keys refused; numbers finite; TOML true/false never taken as a number.
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    def __init__(self, options: BaseModel | None = None, *, label: str | None = None):
        self.options = options if options is not None else self.Options()
        self.label = label or self.name

    def setup(self, ctx: Context) -> None:
        """Called once per process before the first phase that uses the component."""

    def close(self) -> None:
        """Called once when the run stops (normally or not)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label!r}>"


class Generator(Component):
    """Samples completions from the policy (base model + the given adapter)."""

    kind = "generator"
    # True for generators that load the model folder's weights and tokenizer (hf, vllm):
    # the model-folder checks at validation (loop/model_check.py) then apply.
    loads_model_folder: ClassVar[bool] = False

    def generate(
        self,
        ctx: Context,
        chats: Sequence[Chat],
        sampling: Sampling,
        *,
        adapter: str | None,
        progress: bool | Callable[[int, int], None] = True,
    ) -> list[list[Completion]]:
        """Return ``sampling.n`` completions per chat, in order.

        ``adapter`` is an adapter folder (``None``: the base model). ``progress``: True
        reports each finished chat (all its samples) through ``ctx.progress(done,
        len(chats))``; a callable gets ``(done, len(chats))`` instead (a judge counts its
        own units with it); False reports nothing. See ``progress_callback``.
        """
        raise NotImplementedError

    def logprobs(
        self, ctx: Context, chats: Sequence[Chat], responses: Sequence[str], *, adapter: str | None
    ) -> list[float]:
        """Sum of log-probs of each response's tokens given its chat (teacher forcing)."""
        raise NotImplementedError

    def label_logprobs(
        self, ctx: Context, chats: Sequence[Chat], labels: Sequence[str], *, adapter: str | None
    ) -> list[list[float]]:
        """Per chat, the log-prob of each of ``labels`` as the whole reply, in order: exactly
        what ``logprobs`` gives for the rows (chat, label), which is this default (one row
        per chat and label). A judge reading a choice ("A" or "B") calls this; generators
        override it to score every label of a chat from one pass over the chat (the labels'
        first tokens read from the same next-token distribution) and to batch across chats.
        """
        labels = list(labels)
        k = len(labels)
        flat = self.logprobs(ctx, [c for c in chats for _ in labels],
                             [lab for _ in chats for lab in labels], adapter=adapter)
        return [list(flat[i * k:(i + 1) * k]) for i in range(len(chats))]

    def check_model(self, model_path: str, device: str) -> None:
        """At validation, before the run folder exists: raise ``UserError`` if this
        generator cannot serve the model folder on ``device`` ("cpu", "cuda", ...)."""

    def release(self, ctx: Context) -> None:
        """The updater is about to need the accelerator: free what can be freed (vLLM sleeps)."""

    def reclaim(self, ctx: Context) -> None:
        """The updater is done: take the accelerator back (vLLM wakes)."""


def progress_callback(ctx: Context, progress: bool | Callable[[int, int], None]
                      ) -> Callable[[int, int], None] | None:
    """What a generator calls with ``(chats done, chats in the call)`` as chats finish."""
    if callable(progress):
        return progress
    if progress:
        return lambda done, total: ctx.progress(done, total)
    return None


def chats_done(ctx: Context, progress: bool | Callable[[int, int], None],
               total: int) -> Callable[[int], None] | None:
    """``finished(k)`` for a generator: k of its ``total`` chats are done. Reports the total
    at once, then each new count once (never backwards); None when progress is off."""
    report = progress_callback(ctx, progress)
    if report is None:
        return None
    done = [0]

    def finished(count: int) -> None:
        if count > done[0]:
            done[0] = count
            report(count, total)

    report(0, total)  # the total, before the first chat is done
    return finished


class PromptSource(Component):
    kind = "prompt_source"

    def propose(self, ctx: Context) -> list[Prompt]:
        """Return this round's new prompts."""
        raise NotImplementedError

    def split_heldout(self, k: int, seed: int) -> list[Prompt]:
        """Set ``k`` prompts aside for an evaluator and never propose them.

        Called once per process, before the first ``propose``, with the same ``(k, seed)``
        on every resume: the answer must be the same each time. Sources that cannot split
        keep this default (an evaluator then needs its own ``path``).
        """
        raise NotImplementedError


class PromptOptimiser(Component):
    kind = "prompt_optimiser"

    def optimise(self, ctx: Context, prompts: list[Prompt]) -> OptimiseResult:
        """Rewrite prompts and/or choose a system instruction for this round."""
        raise NotImplementedError


class Judge(Component):
    kind = "judge"

    def judge_adapter(self, ctx: Context) -> str | None:
        """The adapter a model-calling judge grades with: the policy's (``ctx.adapter``),
        or the starting weights (None) when its options say ``adapter = "base"``."""
        return None if getattr(self.options, "adapter", "policy") == "base" else ctx.adapter

    def judge(self, ctx: Context, candidates: list[Candidate]) -> JudgeResult:
        """Score candidates. Unparseable output is a Judgment with ``score=None``."""
        raise NotImplementedError


class ModelJudgeOptions(Judge.Options):
    """Options every judge that runs the policy's model shares (self_reward, constitutional)."""

    # "policy": grade with the current round's adapter (Self-Rewarding); "base": with the
    # starting weights every round (a frozen judge, not the policy being trained).
    adapter: Literal["policy", "base"] = "policy"


class Selector(Component):
    kind = "selector"

    def select(
        self,
        ctx: Context,
        candidates: list[Candidate],
        scores: dict[int, float],
        offered: list[Pair],
    ) -> Selection:
        """Turn scores into training data.

        ``scores`` maps a candidate's id to its combined score (``[selection] combine``,
        loop/combine.py): each judge's mean over its valid samples, normalised per judge,
        then the weighted mean over the prompt's panel of judges. Candidates missing a
        judge that scored another candidate of their prompt, or without any valid score,
        are absent, so any two present candidates of a prompt were scored by the same
        judges. ``offered``
        holds pairs judges proposed (a revision preferred over its original).
        """
        raise NotImplementedError


class Updater(Component):
    kind = "updater"

    def update(self, ctx: Context, selection: Selection, output_dir: str) -> UpdateResult:
        """Train the next adapter from ``ctx.adapter`` (None: start a new one).

        Write a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) into
        ``output_dir``; the runner renames it into place once it is complete.
        """
        raise NotImplementedError

    def lora_rank(self) -> int | None:
        """The LoRA rank this updater trains with (generators size their LoRA slots by it)."""
        return None


class Evaluator(Component):
    kind = "evaluator"

    # Held-out prompts the runner gives the evaluator before round 0 (``heldout_request``).
    heldout: list[Prompt] = []

    def heldout_request(self):
        """A ``loop.heldout.HeldoutRequest`` (``k`` prompts split off a prompt source, or
        the evaluator's own prompts from a file), or None: no held-out prompts. Before
        round 0 the runner puts them in ``self.heldout``, records them in the ``heldout``
        table and refuses to let any of them reach generation."""
        return None

    def evaluate(self, ctx: Context) -> dict[str, float]:
        """Metrics (``group/name`` keys) for the policy ``ctx.adapter`` after this round."""
        raise NotImplementedError


class Observer(Component):
    """Follows a run through the lifecycle hooks: an experiment tracker, a logger.

    Chosen in the config with ``[[observers]] name = "..."`` (several allowed). Implement
    any of the methods below; each gets what the lifecycle hook of the same name in
    loop/hookspecs.py gets. The runner calls them through a guard (loop/observers.py): an
    observer that raises is switched off for the rest of the run, the failure is stored as
    a warning event naming it, and the run goes on. ``close`` is called when the run stops.
    """

    kind = "observer"

    def run_start(self, run) -> None:
        """The run starts or resumes (``run.resumed``)."""

    def round_start(self, run, round: int) -> None:
        """A round starts."""

    def phase_start(self, run, round: int, phase: str) -> None:
        """A phase starts."""

    def progress(self, run, round: int, phase: str, done: int, total: int | None,
                 metrics: dict[str, float]) -> None:
        """Progress inside a phase (called often: keep it cheap)."""

    def phase_end(self, run, round: int, phase: str, status: str, seconds: float) -> None:
        """A phase ends (its results are committed when ``status`` is "done")."""

    def round_end(self, run, round: int, metrics: dict[str, float]) -> None:
        """A round is done; ``metrics`` are its stored ``group/name`` values."""

    def event(self, run, round, phase, level: str, message: str, data: dict) -> None:
        """An event was stored."""

    def run_end(self, run, status: str) -> None:
        """The run stops: "completed", "interrupted" or "failed"."""


class ModelBuilder(Component):
    """Builds a model folder on demand (tiny in-process models, synthetic seeds)."""

    kind = "model_builder"

    def build(self, cache_dir: str, progress: Callable[..., None] | None = None) -> str:
        """Return the path of a Hugging Face model folder, building it if needed.

        A build that takes a while reports ``progress(done, total, **metrics)`` (training
        steps, say) when given a callback; the dashboard shows it before the run starts.
        Builders written without the ``progress`` parameter are called without it.
        """
        raise NotImplementedError


KINDS: dict[str, type[Component]] = {
    cls.kind: cls
    for cls in (
        Generator,
        PromptSource,
        PromptOptimiser,
        Judge,
        Selector,
        Updater,
        Evaluator,
        ModelBuilder,
        Observer,
    )
}
