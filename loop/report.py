"""``selfloop report``: one row per round, for any run on any model.

The columns follow what the run has: every evaluator that wrote ``eval/<label>/...``
metrics (win rates with their 95% interval, length-controlled win rates, accuracies;
an evaluator without those headline names shows all its metrics), the tiny world's
held-out accuracy and judge agreement only when its evaluator ran, then the judges'
parse-failure rate, training examples (pairs + selected), the reward margin, the mean
train loss, the mean answer length and the seconds. ``--json`` gives the same rows.
"""

from __future__ import annotations

from rich import box
from rich.table import Table

from loop.store import Store

# Per evaluator label, the metrics the table shows (in this order) when present.
HEADLINE = ("winrate", "lc_winrate", "accuracy")


def _evaluator_metrics(metrics: dict[int, dict[str, float]]) -> dict[str, list[str]]:
    """``{label: [names shown]}`` from every round's ``eval/<label>/<name>`` metrics."""
    names: dict[str, set[str]] = {}
    for m in metrics.values():
        for key in m:
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "eval":
                names.setdefault(parts[1], set()).add(parts[2])
    out = {}
    for label in sorted(names):
        shown = [n for n in HEADLINE if n in names[label]]
        out[label] = shown or sorted(names[label])
    return out


def report_data(store: Store) -> list[dict]:
    """One dict per round with a metric: ``evaluators`` holds ``{label: {name: value}}``
    (every ``eval/<label>/*`` metric); the other keys are the fixed columns."""
    metrics = store.metrics()
    rounds = {r["round"]: r for r in store.rounds()}
    losses = {r["round"]: r["loss"] for r in store.rows(
        "select round, avg(loss) as loss from train_steps group by round")}
    out = []
    for r in sorted(metrics):
        m = metrics[r]
        evaluators: dict[str, dict[str, float]] = {}
        for key, value in m.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "eval":
                evaluators.setdefault(parts[1], {})[parts[2]] = value
        judges = {key.split("/")[1]: value for key, value in m.items()
                  if key.startswith("judge/") and key.endswith("/parse_failure_rate") and key.count("/") == 2}
        examples = m.get("select/examples")
        if examples is None and ("select/pairs" in m or "select/selected" in m):
            examples = (m.get("select/pairs") or 0) + (m.get("select/selected") or 0)
        out.append({
            "round": r,
            "accuracy": m.get("eval/accuracy"),  # the tinyworld evaluator's
            "judge_agreement": m.get("judge/verifier_agreement"),
            "evaluators": evaluators,
            "parse_failure_rate": m.get("judge/parse_failure_rate"),
            "judge_parse_failure_rates": judges,
            "pairs": m.get("select/pairs"),
            "examples": examples,
            "reward_margin": m.get("rewards/margin"),
            "train_loss": losses.get(r),
            "mean_length": m.get("eval/mean_length", m.get("generate/mean_tokens")),
            "seconds": rounds.get(r, {}).get("seconds"),
        })
    return out


def _num(v) -> str:
    if v is None:
        return "-"
    if v != v:
        return "nan"
    if abs(v) >= 1000 or v == int(v):
        return f"{v:.0f}"
    return f"{v:.3f}"


def _pct(v) -> str:
    return f"{v * 100:.1f}%" if v is not None else "-"


def report_table(rows: list[dict]) -> Table:
    t = Table(title="selfloop report", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    tinyworld = any(row["accuracy"] is not None for row in rows)
    agreement = any(row["judge_agreement"] is not None for row in rows)
    per_round = {row["round"]: {f"eval/{label}/{name}": v
                                for label, ms in row["evaluators"].items() for name, v in ms.items()}
                 for row in rows}
    shown = _evaluator_metrics(per_round)
    t.add_column("round", justify="right")
    if tinyworld:
        t.add_column("held-out\naccuracy", justify="right")
    if agreement:
        t.add_column("judge\nagreement", justify="right")
    for label, names in shown.items():
        for name in names:
            if name == "winrate":
                t.add_column(f"{label}\nwin rate", justify="right")
                t.add_column(f"{label}\n95% CI", justify="right")
            else:
                t.add_column(f"{label}\n{ {'lc_winrate': 'LC win rate'}.get(name, name)}", justify="right")
    for col in ("parse\nfail", "pairs/\nexamples", "reward\nmargin", "train\nloss", "mean\nlength",
                "seconds"):
        t.add_column(col, justify="right")
    for row in rows:
        cells = [str(row["round"])]
        if tinyworld:
            cells.append(_pct(row["accuracy"]))
        if agreement:
            cells.append(_pct(row["judge_agreement"]))
        for label, names in shown.items():
            ms = row["evaluators"].get(label, {})
            for name in names:
                v = ms.get(name)
                if name == "winrate":
                    cells.append(_pct(v))
                    low, high = ms.get("winrate_low"), ms.get("winrate_high")
                    cells.append(f"{low * 100:.0f}-{high * 100:.0f}%" if low is not None and high is not None
                                 else "-")
                elif name in ("lc_winrate", "accuracy"):
                    cells.append(_pct(v))
                else:
                    cells.append(_num(v))
        cells += [_pct(row["parse_failure_rate"]), _num(row["examples"]), _num(row["reward_margin"]),
                  _num(row["train_loss"]), _num(row["mean_length"]), _num(row["seconds"])]
        t.add_row(*cells)
    return t
