"""Every hook in loop/hookspecs.py: a ``test_hook_<name>`` each (registering a plugin that
implements it, and checking it is called with the documented arguments or that its
registration takes effect), plus the meta-tests that keep the contract and its docs honest
(as datasette does), and a run of the complete plugin example in docs/plugins.md."""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import loop
from loop import hookspecs, plugins
from loop.runner import PHASES, RunInfo
from tests.core_helpers import FAKE_PLUGIN, ROOT, cli_inprocess, fake_config, rows, run_inprocess

DOCS = ROOT / "docs" / "plugins.md"
HOOKS = {name: f for name, f in vars(hookspecs).items() if hasattr(f, "selfloop_spec")}


def signature(name: str) -> str:
    return f"{name}({', '.join(inspect.signature(HOOKS[name]).parameters)})"


# -- meta-tests ---------------------------------------------------------------------------


def test_every_hook_has_a_test():
    tests = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_hook_"):
                tests.add(node.name.removeprefix("test_hook_"))
    assert len(HOOKS) >= 17
    missing = sorted(set(HOOKS) - tests)
    assert not missing, f"hooks without a test_hook_<name> test: {missing}"


def test_every_hook_signature_is_documented():
    text = DOCS.read_text()
    missing = [signature(name) for name in HOOKS if signature(name) not in text]
    assert not missing, f"signatures missing from docs/plugins.md: {missing}"
    # one section per hook
    sections = re.findall(r"^### (\w+)$", text, re.M)
    assert sorted(set(HOOKS) - set(sections)) == []


# -- helpers ------------------------------------------------------------------------------


def run_with(tmp_path: Path, plugin: object, name: str, *, edit=None, rounds: int = 1,
             extra: str = "") -> Path:
    """Register ``plugin`` (an object with hookimpls), run a fake config edited by ``edit``
    in this process, unregister; returns the run folder."""
    text = fake_config(tmp_path / "runs", rounds=rounds, per_round=3, n=2, extra=extra)
    for a, b in (edit or {}).items():
        assert a in text, a
        text = text.replace(a, b, 1)
    config = tmp_path / "c.toml"
    config.write_text(text)
    registered = plugins.register(plugin, name=name)
    try:
        return run_inprocess(config)
    finally:
        plugins.unregister(name=registered)


def plugin_of(hook: str, cls: type) -> object:
    """A plugin object whose ``hook`` registers ``cls``."""

    class P:
        pass

    def impl(register):
        register(cls)

    impl.__name__ = hook
    setattr(P, hook, staticmethod(loop.hookimpl(impl)))
    return P()


# -- registration hooks -------------------------------------------------------------------


def test_hook_register_generators(tmp_path):
    seen = []

    class HkGen(loop.Generator):
        name = "hk_gen"

        def generate(self, ctx, chats, sampling, *, adapter, progress=True):
            seen.append((len(chats), sampling.n, adapter, ctx.phase))
            return [[loop.Completion(text=f"hk {i}.{k}", num_tokens=2, finish_reason="length")
                     for k in range(sampling.n)] for i in range(len(chats))]

    run_dir = run_with(tmp_path, plugin_of("register_generators", HkGen), "hk-gen",
                       edit={'[generator]\nname = "fake"': '[generator]\nname = "hk_gen"'})
    assert HkGen.plugin == "hk-gen"
    assert seen == [(3, 2, None, "generate")]
    texts = [r["text"] for r in rows(run_dir / "run.db", "select text from candidates order by id")]
    assert texts == [f"hk {i}.{k}" for i in range(3) for k in range(2)]
    assert rows(run_dir / "run.db", "select value from metrics where name = 'generate/truncated_rate'")[0]["value"] == 1.0


def test_hook_register_prompt_sources(tmp_path):
    class HkPrompts(loop.PromptSource):
        name = "hk_prompts"

        class Options(loop.PromptSource.Options):
            texts: list[str] = ["alpha?", "beta?"]

        def propose(self, ctx):
            return [loop.Prompt(text=f"{t} r{ctx.round}", meta={"i": i}) for i, t in enumerate(self.options.texts)]

    run_dir = run_with(tmp_path, plugin_of("register_prompt_sources", HkPrompts), "hk-prompts",
                       rounds=2, edit={'[[prompts]]\nname = "fake"\nper_round = 3':
                                       '[[prompts]]\nname = "hk_prompts"\ntexts = ["gamma?"]'})
    got = rows(run_dir / "run.db", "select round, text, source, kind, meta from prompts order by id")
    assert got == [{"round": r, "text": f"gamma? r{r}", "source": "hk_prompts", "kind": "original",
                    "meta": '{"i": 0}'} for r in (1, 2)]


def test_hook_register_prompt_optimisers(tmp_path):
    class HkOpt(loop.PromptOptimiser):
        name = "hk_opt"

        def optimise(self, ctx, prompts):
            new = [loop.Prompt(text=p.text.upper(), parent=p, kind="rewrite", source="hk_opt")
                   for p in prompts]
            return loop.OptimiseResult(prompts=new, system="Be brief.", new_prompts=new,
                                       metrics={"optimise/rewrites": len(new)})

    run_dir = run_with(tmp_path, plugin_of("register_prompt_optimisers", HkOpt), "hk-opt",
                       extra='[[optimisers]]\nname = "hk_opt"\n')
    db = run_dir / "run.db"
    used = rows(db, "select p.text, p.kind, rp.system, o.text as original from round_prompts rp "
                    "join prompts p on p.id = rp.prompt_id join prompts o on o.id = p.parent_id "
                    "order by rp.position")
    assert len(used) == 3
    assert all(u["kind"] == "rewrite" and u["text"] == u["original"].upper() and u["system"] == "Be brief."
               for u in used)
    # generation answered the rewrites
    assert rows(db, "select count(*) n from candidates c join prompts p on p.id = c.prompt_id "
                    "where p.kind = 'rewrite'")[0]["n"] == 3 * 2
    assert rows(db, "select value from metrics where name = 'optimise/rewrites'")[0]["value"] == 3


def test_hook_register_judges(tmp_path):
    class HkJudge(loop.Judge):
        name = "hk_judge"

        class Options(loop.Judge.Options):
            bonus: float = 0.0

        def judge(self, ctx, candidates):
            return loop.JudgeResult(judgments=[
                loop.Judgment(candidate=c, score=len(c.text) + self.options.bonus, raw="n")
                for c in candidates])

    run_dir = run_with(tmp_path, plugin_of("register_judges", HkJudge), "hk-judge",
                       extra='[[judges]]\nname = "hk_judge"\nlabel = "hk"\nweight = 2.0\nbonus = 0.5\n')
    db = run_dir / "run.db"
    got = rows(db, "select j.score, c.text from judgments j join candidates c on c.id = j.candidate_id "
                   "where j.judge = 'hk'")
    assert len(got) == 6 and all(g["score"] == len(g["text"]) + 0.5 for g in got)
    saved = json.loads((run_dir / "config.json").read_text())["judges"][1]
    assert saved == {"name": "hk_judge", "label": "hk", "weight": 2.0, "bonus": 0.5}


def test_hook_register_selectors(tmp_path):
    class HkTop(loop.Selector):
        name = "hk_top"

        def select(self, ctx, candidates, scores, offered):
            best = {}
            for c in candidates:
                if c.id in scores and (c.prompt.id not in best or scores[c.id] > scores[best[c.prompt.id].id]):
                    best[c.prompt.id] = c
            return loop.Selection(selected=[loop.Selected(candidate=c, score=scores[c.id], group=pid)
                                            for pid, c in sorted(best.items())])

    run_dir = run_with(tmp_path, plugin_of("register_selectors", HkTop), "hk-top",
                       edit={'[selector]\nname = "fake_pairs"': '[selector]\nname = "hk_top"'})
    db = run_dir / "run.db"
    sel = rows(db, "select s.*, c.prompt_id from selected s join candidates c on c.id = s.candidate_id")
    assert len(sel) == 3 and all(s["group_key"] == s["prompt_id"] and s["label"] == "top" for s in sel)
    assert rows(db, "select count(*) n from pairs")[0]["n"] == 0


def test_hook_register_updaters(tmp_path):
    calls = []

    class HkUpd(loop.Updater):
        name = "hk_upd"

        def update(self, ctx, selection, output_dir):
            calls.append((ctx.round, ctx.adapter, len(selection.pairs)))
            out = Path(output_dir)
            out.mkdir(parents=True)
            (out / "adapter_config.json").write_text(json.dumps({"round": ctx.round, "weight": 1}))
            (out / "adapter_model.safetensors").write_bytes(b"w")
            return loop.UpdateResult(steps=[loop.TrainStep(step=s, loss=1.0 / (s + 1)) for s in range(4)],
                                     metrics={"rewards/margin": 0.25})

    run_dir = run_with(tmp_path, plugin_of("register_updaters", HkUpd), "hk-upd", rounds=2,
                       edit={'[updater]\nname = "fake"': '[updater]\nname = "hk_upd"'})
    assert [c[0] for c in calls] == [1, 2]
    assert calls[0][1] is None and calls[1][1] == str(run_dir / "adapters" / "round-1")
    assert json.loads((run_dir / "adapters" / "round-2" / "adapter_config.json").read_text()) == {"round": 2, "weight": 1}
    assert rows(run_dir / "run.db", "select count(*) n from train_steps")[0]["n"] == 8


def test_hook_register_evaluators(tmp_path):
    class HkEval(loop.Evaluator):
        name = "hk_eval"

        def evaluate(self, ctx):
            return {"hk/answer": 42.0, "hk/round": float(ctx.round)}

    run_dir = run_with(tmp_path, plugin_of("register_evaluators", HkEval), "hk-eval",
                       extra='[[evaluators]]\nname = "hk_eval"\n')
    got = rows(run_dir / "run.db", "select round, name, value, phase from metrics where name like 'hk/%' "
                                   "order by round, name")
    assert got == [{"round": r, "name": n, "value": v, "phase": "evaluate"}
                   for r in (0, 1) for n, v in (("hk/answer", 42.0), ("hk/round", float(r)))]


def test_hook_register_model_builders(tmp_path):
    built = []

    class HkBuilder(loop.ModelBuilder):
        name = "hk_builder"

        class Options(loop.ModelBuilder.Options):
            folder: str = "hk-model"

        def build(self, cache_dir):
            built.append(cache_dir)
            d = Path(cache_dir) / self.options.folder
            d.mkdir(parents=True, exist_ok=True)
            (d / "config.json").write_text("{}")
            return str(d)

    run_dir = run_with(tmp_path, plugin_of("register_model_builders", HkBuilder), "hk-builder",
                       edit={'build = { name = "fake" }': 'build = { name = "hk_builder", folder = "m1" }'})
    assert built == [str(tmp_path / "runs" / ".cache")]
    assert rows(run_dir / "run.db", "select model_path from runs")[0]["model_path"] == \
        str(tmp_path / "runs" / ".cache" / "m1")


def test_hook_register_commands():
    from loop import cli as cli_module

    class P:
        @loop.hookimpl
        def register_commands(self, cli):
            assert isinstance(cli, click.Group)

            @cli.command(name="hk-hello")
            @click.argument("who")
            def hello(who):
                """Say hello."""
                click.echo(f"hello {who}")

    name = plugins.register(P(), name="hk-commands")
    cli_module.Group._plugins_loaded = False  # commands load on the first unknown name
    try:
        result = CliRunner().invoke(cli_module.cli, ["hk-hello", "world"])
        assert result.exit_code == 0 and result.output == "hello world\n"
        assert "hk-hello" in CliRunner().invoke(cli_module.cli, ["--help"]).output
    finally:
        plugins.unregister(name=name)
        cli_module.cli.commands.pop("hk-hello", None)
        cli_module.Group._plugins_loaded = False


def test_registration_refuses_what_is_not_a_component():
    class P:
        @loop.hookimpl
        def register_judges(self, register):
            register(object)

    name = plugins.register(P(), name="hk-bad")
    try:
        with pytest.raises(loop.PluginError, match="plugin hk-bad: register\\(\\) for judges takes a subclass of loop.Judge"):
            plugins.registry()
    finally:
        plugins.unregister(name=name)
    plugins.registry()  # without the bad plugin the registry builds again


def test_a_misspelt_hook_is_refused():
    class P:
        @loop.hookimpl
        def register_judgez(self, register):
            pass

    with pytest.raises(loop.PluginError, match="register_judgez"):
        plugins.register(P(), name="hk-misspelt")
    assert plugins.get_manager().get_plugin("hk-misspelt") is None


# -- lifecycle hooks ----------------------------------------------------------------------


class Lifecycle:
    """Records every lifecycle call with its arguments; its evaluator emits an event."""

    def __init__(self):
        self.calls: list[tuple] = []

    class Eventful(loop.Evaluator):
        name = "hk_eventful"

        def evaluate(self, ctx):
            ctx.event("hk event", level="warning", answer=42)
            return {}

    @loop.hookimpl
    def register_evaluators(self, register):
        register(self.Eventful)

    @loop.hookimpl
    def run_start(self, run):
        self.calls.append(("run_start", run, run.store.run_row()["status"]))

    @loop.hookimpl
    def run_end(self, run, status):
        self.calls.append(("run_end", run, status, run.store.run_row()["status"]))

    @loop.hookimpl
    def round_start(self, run, round):
        self.calls.append(("round_start", round))

    @loop.hookimpl
    def round_end(self, run, round, metrics):
        self.calls.append(("round_end", round, metrics))

    @loop.hookimpl
    def phase_start(self, run, round, phase):
        self.calls.append(("phase_start", round, phase, run.store.phase_status(round, phase)))

    @loop.hookimpl
    def phase_end(self, run, round, phase, status, seconds):
        self.calls.append(("phase_end", round, phase, status, seconds, run.store.phase_status(round, phase)))

    @loop.hookimpl
    def progress(self, run, round, phase, done, total, metrics):
        self.calls.append(("progress", round, phase, done, total, metrics))

    @loop.hookimpl
    def event(self, run, round, phase, level, message, data):
        self.calls.append(("event", round, phase, level, message, data))

    def of(self, hook: str) -> list[tuple]:
        return [c[1:] for c in self.calls if c[0] == hook]


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifecycle")
    rec = Lifecycle()
    run_dir = run_with(tmp, rec, "hk-lifecycle", extra='[[evaluators]]\nname = "hk_eventful"\n')
    return rec, run_dir


def test_hook_run_start(lifecycle):
    rec, run_dir = lifecycle
    ((run, stored_status),) = rec.of("run_start")
    assert rec.calls[0][0] == "run_start"
    assert isinstance(run, RunInfo) and run.name == "fake" and run.rounds == 1
    assert run.resumed is False and run.run_dir == run_dir and stored_status == "running"
    assert run.config.generate.n == 2


def test_hook_run_end(lifecycle):
    rec, _ = lifecycle
    ((run, status, stored),) = rec.of("run_end")
    assert rec.calls[-1][0] == "run_end"
    assert status == "completed" and stored == "completed" and run.name == "fake"


def test_hook_round_start(lifecycle):
    rec, _ = lifecycle
    assert rec.of("round_start") == [(0,), (1,)]


def test_hook_round_end(lifecycle):
    rec, run_dir = lifecycle
    ends = rec.of("round_end")
    assert [r for r, _ in ends] == [0, 1]
    for r, metrics in ends:
        stored = {m["name"]: m["value"] for m in rows(run_dir / "run.db",
                                                      "select name, value from metrics where round = ?", [r])}
        assert metrics == stored
    assert "eval/accuracy" in ends[0][1] and ends[1][1]["train/steps"] == 3


def test_hook_phase_start(lifecycle):
    rec, _ = lifecycle
    starts = rec.of("phase_start")
    assert [(r, p) for r, p, _ in starts] == [(0, "evaluate")] + [(1, p) for p in PHASES]
    assert all(status == "running" for _, _, status in starts)  # marked running before the hook


def test_hook_phase_end(lifecycle):
    rec, _ = lifecycle
    ends = rec.of("phase_end")
    assert [(r, p, s) for r, p, s, _, _ in ends] == [(0, "evaluate", "done")] + [(1, p, "done") for p in PHASES]
    assert all(isinstance(sec, float) and sec >= 0 and stored == "done" for _, _, _, sec, stored in ends)


def test_hook_progress(lifecycle):
    rec, _ = lifecycle
    prog = rec.of("progress")
    gen = [(d, t, m) for r, p, d, t, m in prog if p == "generate"]
    assert gen == [(1, 3, {}), (2, 3, {}), (3, 3, {})]
    upd = [(d, t, m) for r, p, d, t, m in prog if p == "update"]
    assert [(d, t) for d, t, _ in upd] == [(1, 3), (2, 3), (3, 3)] and all("loss" in m for _, _, m in upd)
    judge = [d for r, p, d, t, m in prog if p == "judge"]
    assert judge == list(range(1, 7))


def test_hook_event(lifecycle):
    rec, run_dir = lifecycle
    events = [e for e in rec.of("event") if e[3] == "hk event"]
    assert events == [(0, "evaluate", "warning", "hk event", {"answer": 42}),
                      (1, "evaluate", "warning", "hk event", {"answer": 42})]
    stored = rows(run_dir / "run.db", "select round, phase, level, data from events where message = 'hk event'")
    assert [(e["round"], e["phase"], e["level"], json.loads(e["data"])) for e in stored] == \
        [(0, "evaluate", "warning", {"answer": 42}), (1, "evaluate", "warning", {"answer": 42})]


# -- the complete example in docs/plugins.md ----------------------------------------------


def test_docs_plugin_example_runs(tmp_path):
    text = DOCS.read_text()
    section = text.split("## A complete plugin", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    snippet = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    plugin = tmp_path / "length_plugin.py"
    plugin.write_text(code)
    config = tmp_path / "c.toml"
    config.write_text(fake_config(tmp_path / "runs", rounds=1, per_round=3, n=2, extra=snippet)
                      .replace(f'plugins = ["{FAKE_PLUGIN}"]', f'plugins = ["{FAKE_PLUGIN}", "length_plugin.py"]'))
    try:
        result = cli_inprocess("run", str(config), "--progress", "off")
    finally:
        plugins.unregister(name=f"file:{plugin.resolve()}")
    assert result.exit_code == 0, result.stderr
    run_dir = tmp_path / "runs" / "fake"
    db = run_dir / "run.db"
    judged = rows(db, "select j.score, c.text from judgments j join candidates c on c.id = j.candidate_id "
                      "where j.judge = 'length'")
    assert len(judged) == 6 and all(j["score"] == -abs(len(j["text"]) - 12) for j in judged)
    metrics = {m["name"]: m["value"] for m in rows(db, "select name, value from metrics where round = 1")}
    assert metrics["length/mean_chars"] > 0 and "length/mean_distance" in metrics
    assert "[length] round 1: mean chars" in result.stdout


def _hook_examples() -> dict[str, str]:
    """The python example of each hook's section in docs/plugins.md."""
    text = DOCS.read_text().split("## A complete plugin", 1)[0]
    out = {}
    for name, body in re.findall(r"^### (\w+)\n(.*?)(?=^### |\Z)", text, re.M | re.S):
        block = re.search(r"```python\n(.*?)```", body, re.S)
        if block:
            out[name] = block.group(1)
    return out


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_docs_hook_example_loads_as_a_plugin(tmp_path, hook):
    """Each hook's example is a working plugin file that implements that hook."""
    code = _hook_examples().get(hook)
    assert code, f"docs/plugins.md: the {hook} section has no python example"
    path = tmp_path / f"example_{hook}.py"
    path.write_text(code)
    name = plugins.load_plugin_file(path)
    try:
        pm = plugins.get_manager()
        implemented = {h.name for h in pm.get_hookcallers(pm.get_plugin(name))}
        assert hook in implemented
        reg = plugins.registry()
        if hook in plugins.REGISTRATION_HOOKS:
            kind = plugins.REGISTRATION_HOOKS[hook]
            assert [n for n, c in reg.components[kind].items() if c.plugin == name]
    finally:
        plugins.unregister(name=name)
