"""The README.md model card written into every round's adapter folder.

A Hugging Face model card (YAML front matter, then Markdown): the base model, the run and
round, the method (updater and its loss), the round's metrics recorded up to and including
the update, the previous round's evaluation (the policy that wrote this round's data), how
to load the adapter with PEFT and vLLM, and the run's resolved config. PEFT and vLLM ignore
the file when they load the folder.
"""

from __future__ import annotations

import json
from pathlib import Path


def model_card(*, run: str, round: int, base_model: str, updater: dict, init_from: str | None,
               metrics: dict[str, float], previous_eval: dict[str, float], config: dict,
               version: str) -> str:
    method = updater.get("name", "?")
    if updater.get("loss"):
        method += f" (loss {updater['loss']})"
    tags = ["selfloop", "lora", "peft", str(updater.get("name", "adapter"))]
    lines = [
        "---",
        f"base_model: {json.dumps(base_model)}",
        "library_name: peft",
        "tags:",
        *(f"- {t}" for t in tags),
        "---",
        "",
        f"# {run}: round {round} adapter",
        "",
        f"A LoRA adapter written by selfloop {version}: round {round} of run `{run}`, "
        f"trained with **{method}** starting from "
        + (f"`{init_from}`." if init_from else "the base model."),
        "",
        f"- base model: `{base_model}`",
        f"- round: {round}",
        f"- method: {method}",
        "",
        "## Load it",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_model!r}), ADAPTER_DIR)",
        "# vLLM: LLM(model=..., enable_lora=True).generate(..., lora_request=LoRARequest(",
        f"#     \"round-{round}\", {round}, ADAPTER_DIR))",
        "```",
        "",
        f"## Metrics of round {round}",
        "",
        "Recorded by the run up to and including this update (this adapter's own evaluation "
        "follows it: `selfloop report` on the run folder, or the `metrics` table of run.db).",
        "",
        *_table(metrics),
    ]
    if previous_eval:
        lines += ["", f"Evaluation of the policy that wrote round {round}'s data "
                      f"(round {round - 1}):", "", *_table(previous_eval)]
    lines += ["", "## The selfloop config", "", "```json", json.dumps(config, indent=2, default=str),
              "```", ""]
    return "\n".join(lines)


def _table(metrics: dict[str, float]) -> list[str]:
    if not metrics:
        return ["(none recorded)"]
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| `{k}` | {v:.6g} |" if isinstance(v, (int, float)) else f"| `{k}` | {v} |"
             for k, v in sorted(metrics.items())]
    return rows


def write_model_card(folder: Path, store, round: int, base_model: str, result,
                     init_from: str | None, updater: dict | None = None) -> None:
    """README.md in a new adapter folder, before the runner installs it: the round's metrics
    so far and the update's own, the previous round's evaluation, the resolved config.
    ``updater``: the round's updater and its options (a ``[[stages]]`` run changes it)."""
    from loop import __version__

    folder = Path(folder)
    if not folder.is_dir():
        return  # the updater wrote nothing; installing the folder will say so
    metrics = {**store.metrics(round), **result.metrics, "train/steps": len(result.steps)}
    config = json.loads(store.run_row()["config"])  # resolved: defaults filled in
    card = model_card(
        run=config.get("name", "?"), round=round, base_model=base_model,
        updater=updater or config.get("updater") or {}, version=__version__,
        init_from=f"adapters/{init_from}" if init_from else None,
        metrics={k: v for k, v in metrics.items() if not k.startswith("eval/")},
        previous_eval=store.metrics(round - 1), config=config,
    )
    (folder / "README.md").write_text(card, encoding="utf-8")
