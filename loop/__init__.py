"""selfloop: a plugin-based self-improvement loop for language models.

Plugins import from here::

    import loop

    @loop.hookimpl
    def register_judges(register):
        register(MyJudge)
"""

from loop.hookspecs import hookimpl
from loop.components import (
    Candidate,
    Chat,
    Completion,
    Component,
    Evaluator,
    Generator,
    Instruction,
    Judge,
    JudgeResult,
    ModelJudgeOptions,
    Judgment,
    ModelBuilder,
    Observer,
    OptimiseResult,
    Pair,
    Prompt,
    PromptOptimiser,
    PromptSource,
    RewriteDecision,
    Sampling,
    Selected,
    Selection,
    Selector,
    TrainStep,
    Updater,
    UpdateResult,
    chats_done,
    progress_callback,
)
from loop.errors import ConfigError, PluginError, SelfloopError, UserError

__version__ = "0.1.0"

__all__ = [
    "hookimpl",
    "Candidate",
    "Chat",
    "Completion",
    "Component",
    "ConfigError",
    "Evaluator",
    "Generator",
    "Instruction",
    "Judge",
    "JudgeResult",
    "ModelJudgeOptions",
    "Judgment",
    "ModelBuilder",
    "Observer",
    "OptimiseResult",
    "Pair",
    "PluginError",
    "Prompt",
    "PromptOptimiser",
    "PromptSource",
    "RewriteDecision",
    "Sampling",
    "Selected",
    "Selection",
    "Selector",
    "SelfloopError",
    "TrainStep",
    "Updater",
    "UpdateResult",
    "UserError",
    "chats_done",
    "progress_callback",
]
