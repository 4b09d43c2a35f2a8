"""Components that write to the terminal every way third-party libraries do, for the
terminal tests (tests/test_terminal.py): a model builder that reports progress and warns,
and an evaluator that warns, logs, writes to file descriptor 2 and draws a tqdm bar.

Every message carries the word NOISY, so a test can look for it on the terminal (where it
must not be while the dashboard is live) and in the run's run.log (where it must be).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from pydantic import Field

import loop

# A handler made at import, holding the stderr of that moment (as libraries' handlers do).
_log = logging.getLogger("noisy")
_log.addHandler(logging.StreamHandler(sys.stderr))
_log.propagate = False


class NoisyBuilder(loop.ModelBuilder):
    """A "model" folder built in ``steps`` reported steps."""

    name = "noisy_build"

    class Options(loop.ModelBuilder.Options):
        steps: int = Field(5, ge=1, description="progress steps the build reports")
        sleep: float = Field(0.05, ge=0, description="seconds per step")

    def build(self, cache_dir, progress=None):
        folder = Path(cache_dir) / f"noisy-model-{self.options.steps}"
        if (folder / "config.json").is_file():
            return str(folder)
        warnings.warn("NOISY-BUILD-WARNING")
        for step in range(self.options.steps):
            time.sleep(self.options.sleep)
            if progress is not None:
                progress(step + 1, self.options.steps, loss=1.0 / (step + 1))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({}))
        # What model-folder checks look for (nothing loads them: the fakes need no model).
        (folder / "model.safetensors").write_bytes(b"")
        (folder / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
        return str(folder)


class NoisyEvaluator(loop.Evaluator):
    """Writes NOISY lines to stderr in every way, then measures nothing much."""

    name = "noisy"

    def evaluate(self, ctx):
        from tqdm import tqdm

        warnings.warn(f"NOISY-WARNING round {ctx.round}")
        _log.warning("NOISY-LOG round %s", ctx.round)
        logging.getLogger("noisy.root").warning("NOISY-ROOT-LOG")  # no handler: lastResort
        os.write(2, f"NOISY-FD2 round {ctx.round}\n".encode())
        print(f"NOISY-STDERR round {ctx.round}", file=sys.stderr)
        for _ in tqdm(range(3), desc="NOISY-BAR"):
            time.sleep(0.01)
        return {"noisy/round": float(ctx.round)}


@loop.hookimpl
def register_model_builders(register):
    register(NoisyBuilder)


@loop.hookimpl
def register_evaluators(register):
    register(NoisyEvaluator)
