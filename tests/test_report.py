"""`selfloop report --html/--png` and `selfloop compare`, through the real CLI, rendered in
headless Chromium (tests/browser.py): the page of the session's finished demo run
(``demo_run`` in conftest.py) and of a fake-components run, their screenshots, console
errors, plots per metric group; the terminal tables; sparklines in `watch`.

The browser is Debian's ``chromium-headless-shell`` (.ci/run installs it); without one the
browser tests skip, saying so.
"""

from __future__ import annotations

import html
import io
import re
from pathlib import Path

import pytest
from PIL import Image

import loop
from loop import plugins
from tests.browser import find_browser, open_page
from tests.core_helpers import cli, fake_config, rows, run_inprocess

BROWSER = find_browser()
needs_browser = pytest.mark.skipif(
    BROWSER is None, reason="no headless Chromium: apt-get install chromium-headless-shell")


class Optimiser(loop.PromptOptimiser):
    """Writes a scored instruction history (as OPRO does) and rewrites (as BPO does)."""

    name = "report_opt"

    def optimise(self, ctx, prompts):
        new = [loop.Prompt(text=f"{p.text} (rewritten r{ctx.round})", parent=p, kind="rewrite",
                           source="report_opt") for p in prompts]
        history = [loop.Instruction(text=f"Answer briefly, round {ctx.round}", score=2.5, step=0,
                                    scored_on=4, chosen=True),
                   loop.Instruction(text="Think <first>", score=1.0, step=1, scored_on=4)]
        return loop.OptimiseResult(prompts=new, system=history[0].text, new_prompts=new,
                                   instructions=history)


class OptPlugin:
    @loop.hookimpl
    def register_prompt_optimisers(self, register):
        register(Optimiser)


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    """A 2-round fake-components run whose optimiser writes instructions and rewrites."""
    tmp = tmp_path_factory.mktemp("report-fake")
    config = tmp / "c.toml"
    config.write_text(fake_config(tmp / "runs", rounds=2, per_round=3, n=2,
                                  extra='[[optimisers]]\nname = "report_opt"\n'))
    name = plugins.register(OptPlugin(), name="report-opt")
    try:
        return run_inprocess(config)
    finally:
        plugins.unregister(name=name)


def not_blank(png: Path) -> None:
    """A real page: large, and far from one colour."""
    im = Image.open(png).convert("L")
    assert im.width >= 1000 and im.height >= 1500, im.size
    small = im.resize((200, max(1, im.height * 200 // im.width)))
    hist = small.histogram()
    assert max(hist) < 0.97 * sum(hist), "the screenshot is (nearly) one colour"
    assert sum(1 for h in hist if h) > 20, "too few shades for a page of plots"


def check_page(page: dict) -> None:
    assert page["errors"] == [], page["errors"]
    assert page["broken"] == [], f"images that did not decode: {page['broken']}"
    assert page["external"] == [], f"the page links out: {page['external']}"
    fetched = [u for u in page["requests"] if not u.startswith("data:")]
    assert len(fetched) == 1 and fetched[0].startswith("file://"), fetched


def metric_groups(db: Path) -> set[str]:
    return {r["name"].partition("/")[0] for r in rows(db, "select distinct name from metrics")}


@needs_browser
def test_report_html_of_the_demo_renders_in_chromium(demo_run, tmp_path):
    run_dir, _ = demo_run
    page_file, png_dir = tmp_path / "report.html", tmp_path / "plots"
    out = cli("report", str(run_dir), "--html", str(page_file), "--png", str(png_dir), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out" in out.stdout and f"wrote {page_file}" in out.stderr
    page = open_page(page_file, tmp_path / "shot.png", BROWSER)
    check_page(page)
    not_blank(tmp_path / "shot.png")
    db = run_dir / "run.db"
    # A plot per metric group, and the per-step, length, margin and timing plots.
    assert set(page["groups"]) == metric_groups(db) >= {"eval", "judge", "select", "train",
                                                        "rewards", "generate"}
    assert {"training", "lengths", "margins", "timings"} <= set(page["keys"])
    assert page["images"] == len(page["keys"])
    # --png: the same plots as files
    assert {p.stem for p in png_dir.glob("*.png")} == set(page["keys"])
    for p in png_dir.glob("*.png"):
        assert Image.open(p).size[0] > 200
    text = page_file.read_text()
    # Example pairs with the judge's raw text, and the config.
    pair = rows(db, "select ch.text as chosen, j.raw from pairs p join candidates ch on "
                    "ch.id = p.chosen_id join judgments j on j.candidate_id = ch.id "
                    "where p.selected = 1 order by p.id, j.id limit 1")[0]
    assert html.escape(pair["chosen"]) in text and html.escape(pair["raw"]) in text
    assert "&#34;target_modules&#34;" in text or '"target_modules"' in html.unescape(text)
    for metric in ("eval/accuracy", "judge/verifier_agreement", "select/pairs", "rewards/margin"):
        assert metric in text


@needs_browser
def test_compare_two_runs_in_the_terminal_and_in_chromium(demo_run, fake_run, tmp_path):
    run_dir, _ = demo_run
    page_file = tmp_path / "compare.html"
    out = cli("compare", str(run_dir), str(fake_run), "--html", str(page_file), timeout=300,
              COLUMNS="160")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "A: demo" in text and "B: fake" in text
    for title in ("held-out accuracy", "pairs", "seconds", "B-A", "config differences"):
        assert title in text, text
    assert re.search(r"updater\.name\s+│\s+dpo\s+│\s+fake", text), text
    page = open_page(page_file, tmp_path / "shot.png", BROWSER)
    check_page(page)
    not_blank(tmp_path / "shot.png")
    assert set(page["groups"]) == metric_groups(run_dir / "run.db") | metric_groups(fake_run / "run.db")
    assert {"training", "timings"} <= set(page["keys"])
    body = page_file.read_text()
    assert "updater.name" in body and "A: demo" in body and "B: fake" in body


def test_report_shows_instruction_history_and_rewrites(fake_run, tmp_path):
    page_file = tmp_path / "r.html"
    out = cli("report", str(fake_run), "--html", str(page_file), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    body = page_file.read_text()
    assert "OPRO instruction history" in body and "Answer briefly, round 2" in body
    assert "Think &lt;first&gt;" in body  # stored text, escaped
    assert "Prompt rewrites (BPO)" in body and "(rewritten r1)" in body
    assert "6 of 6 rewrites were answered" in body


def test_report_and_compare_refuse_bad_input(fake_run, tmp_path):
    page_file = tmp_path / "r.html"
    out = cli("report", str(tmp_path / "nope"), "--html", str(page_file))
    assert out.returncode == 2 and "no run.db here" in out.stderr and not page_file.exists()
    out = cli("compare", str(fake_run))
    assert out.returncode == 2 and "two or more run folders" in out.stderr
    out = cli("compare", str(fake_run), str(tmp_path / "nope"), "--html", str(page_file))
    assert out.returncode == 2 and "no run.db here" in out.stderr and not page_file.exists()


def test_sparklines_in_watch_and_the_dashboard(fake_run):
    from rich.console import Console

    from loop.monitor import Snapshot, render
    from loop.sparklines import sparkline

    assert sparkline([0.4, 0.8, 0.98, 0.97]) == "▁▆██"
    assert sparkline([None, 2.0, 2.0]) == " ▅▅" and sparkline([]) == ""
    assert sparkline([1.0, float("nan"), 3.0]) == "▁ █"
    out = cli("watch", "--once", str(fake_run), COLUMNS="100")
    assert out.returncode == 0
    acc = [r["value"] for r in rows(fake_run / "run.db",
                                    "select value from metrics where name = 'eval/accuracy' order by round")]
    assert f"accuracy {sparkline(acc)}" in out.stdout, out.stdout
    s = Snapshot(name="x", rounds=3, metrics={0: {"eval/accuracy": 0.1}, 1: {"eval/accuracy": 0.5,
                                                 "select/pairs": 10.0}, 2: {"eval/accuracy": 0.9}})
    c = Console(file=io.StringIO(), width=100)
    c.print(render(s, now=0.0))
    line = next(x for x in c.file.getvalue().splitlines() if "accuracy ▁▅█ 0.900" in x)
    assert "pairs" not in line  # one round of pairs is no trend yet
