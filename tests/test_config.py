"""Bad configs through the real command line: exit code 2, one line on stderr naming the
file and the field, and nothing written under runs_dir. Good overrides, the saved resolved
config, plugin loading (duplicates, the SELFLOOP_LOAD_PLUGINS allow-list, tracing)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.core_helpers import FAKE_PLUGIN, cli, cli_inprocess, env, fake_config, rows, run_inprocess


def replace(a: str, b: str):
    def mutate(text: str) -> str:
        assert a in text, a
        return text.replace(a, b, 1)
    return mutate


GEN = '[generator]\nname = "fake"'
JUDGE = '[[judges]]\nname = "fake"'
BUILD = 'build = { name = "fake" }'

# id -> (how to make the case, substrings stderr must hold, run in a subprocess?)
# A case is a function (tmp_path, runs_dir) -> (config argument, extra CLI arguments).


def text_case(mutate=None, **kw):
    def make(tmp: Path, runs: Path):
        text = fake_config(runs, **kw)
        if mutate is not None:
            text = mutate(text)
        path = tmp / "bad.toml"
        path.write_text(text, encoding="utf-8")
        return str(path), []
    return make


def set_case(*sets):
    def make(tmp: Path, runs: Path):
        path = tmp / "bad.toml"
        path.write_text(fake_config(runs), encoding="utf-8")
        return str(path), [x for s in sets for x in ("--set", s)]
    return make


def plugin_case(source: str | None):
    def make(tmp: Path, runs: Path):
        plugin = tmp / "myplugin.py"
        if source is not None:
            plugin.write_text(textwrap.dedent(source))
        path = tmp / "bad.toml"
        text = fake_config(runs).replace("plugins = [", 'plugins = ["myplugin.py", ', 1)
        path.write_text(text, encoding="utf-8")
        return str(path), []
    return make


def raw_case(data: bytes):
    def make(tmp: Path, runs: Path):
        path = tmp / "bad.toml"
        path.write_bytes(data)
        return str(path), []
    return make


def missing_file(tmp: Path, runs: Path):
    return str(tmp / "nope.toml"), []


def folder(tmp: Path, runs: Path):
    (tmp / "adir").mkdir()
    return str(tmp / "adir"), []


def existing_run(tmp: Path, runs: Path):
    (runs / "fake").mkdir(parents=True)
    path = tmp / "bad.toml"
    path.write_text(fake_config(runs), encoding="utf-8")
    return str(path), []


def model_folder_without_config(tmp: Path, runs: Path):
    (tmp / "model").mkdir()
    return text_case(replace(BUILD, f'path = "{tmp / "model"}"'))(tmp, runs)


def runs_dir_is_a_file(tmp: Path, runs: Path):
    (tmp / "afile").write_text("not a folder")
    path = tmp / "bad.toml"
    path.write_text(fake_config(tmp / "afile"), encoding="utf-8")
    return str(path), []


def template_with_wrong_variables(tmp: Path, runs: Path):
    (tmp / "rubric.j2").write_text("Rate {{ answer }}\n")
    return text_case(replace(JUDGE, '[[judges]]\nname = "self_reward"\ntemplate = "rubric.j2"'))(tmp, runs)


SELECTOR = '[selector]\nname = "fake_pairs"'
UPDATER = '[updater]\nname = "fake"'
PROMPTS = '[[prompts]]\nname = "fake"\nper_round = 5'
EVALUATOR = '[[evaluators]]\nname = "fake"'

BAD = {
    "toml-syntax": (text_case(replace("seed = 7", "seed = ")), ["TOML syntax error"], True),
    "unknown-top-level-field": (text_case(top={"bogus": 1}), ["bogus: unknown field", "known fields:"], False),
    "unknown-component-field": (text_case(judge={"bogus": 1}), ["judges[0].bogus: unknown field", "samples"], False),
    "unknown-generate-field": (text_case(replace("n = 4", "n = 4\nbeams = 2")), ["generate.beams: unknown field"], False),
    "wrong-type": (text_case(rounds='"three"'), ["rounds: input should be a valid integer"], False),
    "wrong-option-type": (text_case(judge={"samples": "two"}), ["judges[0].samples: input should be a valid integer"], False),
    "rounds-zero": (text_case(rounds=0), ["rounds: input should be greater than or equal to 1"], False),
    "n-zero": (text_case(n=0), ["generate.n: input should be greater than or equal to 1"], False),
    "temperature-negative": (text_case(replace("n = 4", "n = 4\ntemperature = -0.5")), ["generate.temperature:"], False),
    "judge-weight-zero": (text_case(judge={"weight": 0}), ["judges[0].weight:"], False),
    "no-updater": (text_case(replace('[updater]\nname = "fake"', "")), ["updater: required field is missing"], False),
    "no-name": (text_case(replace('name = "fake"\nrounds', "rounds")), ["name: required field is missing"], False),
    "no-judges": (text_case(replace(JUDGE, "")), ["judges: required field is missing"], False),
    "unknown-judge": (text_case(replace(JUDGE, '[[judges]]\nname = "nope"')), ["judges[0].name: unknown judge 'nope'", "installed:"], False),
    "unknown-generator": (text_case(replace(GEN, '[generator]\nname = "nope"')), ["generator.name: unknown generator 'nope'"], False),
    "missing-config-file": (missing_file, ["nope.toml", "file not found"], True),
    "config-is-a-folder": (folder, ["adir", "is a folder"], True),
    "missing-model-path": (text_case(replace(BUILD, 'path = "/nonexistent/model-dir"')), ["model.path:", "/nonexistent/model-dir"], False),
    "model-folder-without-config": (model_folder_without_config, ["model.path:", "no config.json"], False),
    "model-path-and-build": (text_case(replace(BUILD, BUILD + '\npath = "/tmp"')), ["model: give exactly one of model.path"], False),
    "plugin-file-missing": (plugin_case(None), ["plugins:", "myplugin.py", "not found"], True),
    "plugin-syntax-error": (plugin_case("def broken(:\n"), ["plugins:", "myplugin.py", "SyntaxError"], True),
    "plugin-unknown-hook": (plugin_case("""
        import loop

        @loop.hookimpl
        def register_judgez(register):
            pass
        """), ["plugins:", "register_judgez", "hookspecs"], True),
    "duplicate-judge-labels": (text_case(extra=JUDGE + "\n"), ["judges[1]: two judges are labelled 'fake'", "label"], False),
    "bad-run-name": (text_case(name="bad/name"), ["name: string should match pattern"], False),
    "set-without-equals": (set_case("generate.n"), ["--set 'generate.n'", "SECTION.KEY=VALUE"], False),
    "set-empty-key-segment": (set_case("generate..n=1"), ["empty key segment"], False),
    "set-missing-list-index": (set_case("judges.3.samples=2"), ["judges[3] does not exist"], False),
    "set-wrong-type": (set_case("rounds=abc"), ["rounds: input should be a valid integer"], False),
    "set-unknown-field": (set_case("generate.beams=2"), ["generate.beams: unknown field"], False),
    "not-utf8": (raw_case('name = "caf\u00e9"\n'.encode("latin-1")), ["bad.toml", "not UTF-8"], True),
    "run-dir-exists": (existing_run, ["already exists", "selfloop resume"], True),
    # Issue 13 item 6: non-finite floats, zero counts, true as a number, seeds, runs_dir,
    # templates checked at validation; item 12: a run name too long for a folder.
    "judge-weight-inf": (text_case(judge={"weight": float("inf")}), ["judges[0].weight: input should be a finite number"], False),
    "judge-sleep-nan": (text_case(judge={"sleep": float("nan")}), ["judges[0].sleep: input should be a finite number"], False),
    "temperature-inf": (text_case(replace("n = 4", "n = 4\ntemperature = inf")), ["generate.temperature: input should be a finite number"], False),
    "top-p-true": (text_case(replace("n = 4", "n = 4\ntop_p = true")), ["generate.top_p: true is not a number"], False),
    "rounds-true": (text_case(replace("rounds = 3", "rounds = true")), ["rounds: true is not a number"], False),
    "n-true": (text_case(replace("n = 4", "n = true")), ["generate.n: true is not a number"], False),
    "judge-samples-true": (text_case(judge={"samples": True}), ["judges[0].samples: true is not a number"], False),
    "updater-steps-false": (text_case(updater={"steps": False}), ["updater.steps: false is not a number"], True),
    "set-true-as-number": (set_case("generate.max_new_tokens=true"), ["generate.max_new_tokens: true is not a number"], False),
    "seed-2-pow-70": (text_case(replace("seed = 7", f"seed = {2**70}")), ["seed: input should be less than or equal to 4294967295"], True),
    "seed-negative": (text_case(replace("seed = 7", "seed = -1")), ["seed: input should be greater than or equal to 0"], False),
    "runs-dir-is-a-file": (runs_dir_is_a_file, ["runs_dir:", "afile", "is a file"], True),
    "name-252-chars": (text_case(name="a" * 252), ["name: string should have at most 200 characters"], True),
    "learning-rate-inf": (text_case(replace(UPDATER, '[updater]\nname = "dpo"\nlearning_rate = inf')), ["updater.learning_rate: input should be a finite number"], False),
    "learning-rate-zero": (text_case(replace(UPDATER, '[updater]\nname = "dpo"\nlearning_rate = 0')), ["updater.learning_rate: input should be greater than 0"], False),
    "min-margin-inf": (text_case(replace(SELECTOR, '[selector]\nname = "pairs"\nmin_margin = inf')), ["selector.min_margin: input should be a finite number"], False),
    "heldout-zero": (text_case(replace(EVALUATOR, '[[evaluators]]\nname = "tinyworld"\nheldout = 0')), ["evaluators[0].heldout: input should be greater than or equal to 1"], False),
    "per-round-zero": (text_case(replace(PROMPTS, '[[prompts]]\nname = "tinyworld"\nper_round = 0')), ["prompts[0].per_round: input should be greater than or equal to 1"], False),
    "missing-template": (text_case(replace(JUDGE, '[[judges]]\nname = "self_reward"\ntemplate = "nope"')), ["judges[0].template: template 'nope' not found"], True),
    "template-wrong-variables": (template_with_wrong_variables, ["judges[0].template:", "rubric.j2", "template never uses ['prompt', 'response']"], False),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config(tmp_path, case):
    make, expected, subprocess = BAD[case]
    runs = tmp_path / "runs"
    config_arg, extra = make(tmp_path, runs)
    before = sorted(p.name for p in runs.iterdir()) if runs.exists() else []
    if subprocess:
        proc = cli("run", config_arg, *extra, "--progress", "off")
        code, stderr = proc.returncode, proc.stderr
    else:
        result = cli_inprocess("run", config_arg, *extra, "--progress", "off")
        code, stderr = result.exit_code, result.stderr
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("Error: ")
    if case != "run-dir-exists":  # that one names the run folder instead of the config
        assert Path(config_arg).name in line or str(tmp_path / "myplugin.py") in line, line
    for part in expected:
        assert part in line, (part, line)
    after = sorted(p.name for p in runs.iterdir()) if runs.exists() else []
    assert after == before, "a failed start left something under runs_dir"


def test_at_least_twenty_bad_configs_some_in_subprocesses():
    assert len(BAD) >= 20 and sum(sub for _, _, sub in BAD.values()) >= 5


def _numeric_fields(model, prefix=""):
    """(dotted name, model, field, is_float) for every int/float field, nested sections too."""
    from pydantic import BaseModel

    from loop.checked import _is_number_field

    for name, f in model.model_fields.items():
        if _is_number_field(f.annotation):
            yield prefix + name, model, name, float in (f.annotation, *getattr(f.annotation, "__args__", ()))
        elif isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            yield from _numeric_fields(f.annotation, prefix + name + ".")


def test_every_numeric_field_refuses_true_and_non_finite():
    """Every number in the core config and in every built-in component's Options: TOML
    true/false is refused (not read as 1/0), inf/nan refused in floats, naming the field."""
    from pydantic import ValidationError

    from loop import plugins
    from loop.config import RunConfig

    plugins.load_plugin_file(str(FAKE_PLUGIN))
    models = [RunConfig] + [cls.Options for kind in plugins.registry().components.values()
                            for cls in kind.values()]
    checked = 0
    for model in models:
        for dotted, owner, field, is_float in _numeric_fields(model):
            bad = [True, False] + ([float("inf"), float("-inf"), float("nan")] if is_float else [])
            for value in bad:
                with pytest.raises(ValidationError) as e:
                    owner.model_validate({field: value})
                locs = [err["loc"] for err in e.value.errors()]
                assert (field,) in locs, (model.__name__, dotted, value, locs)
            checked += 1
    assert checked >= 60, checked


# -- good overrides and the resolved config ---------------------------------------------


def test_set_overrides_and_saved_resolved_config(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(fake_config(tmp_path / "runs", rounds=1, per_round=2, n=4))
    run_dir = run_inprocess(config, "--set", "generate.n=8", "--set", "judges.0.samples=3",
                            "--set", "name=renamed")
    assert run_dir == tmp_path / "runs" / "renamed"
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["generate"]["n"] == 8 and saved["name"] == "renamed"
    # component defaults are filled in
    assert saved["judges"] == [{"name": "fake", "weight": 1.0, "label": None, "samples": 3,
                                "sleep": 0.0, "fail_every": 7}]
    assert saved["generator"] == {"name": "fake", "sleep": 0.0, "fail": False}
    assert saved["updater"] == {"name": "fake", "steps": 3, "sleep": 0.0, "nan_at": -1}
    assert saved["generate"] == {"n": 8, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 256}
    db = run_dir / "run.db"
    assert json.loads(rows(db, "select config from runs")[0]["config"]) == saved
    per_prompt = rows(db, "select count(*) n from candidates group by prompt_id")
    assert [p["n"] for p in per_prompt] == [8, 8]
    per_cand = rows(db, "select count(*) n from judgments group by candidate_id")
    assert {p["n"] for p in per_cand} == {3} and len(per_cand) == 16


# -- plugins ------------------------------------------------------------------------------


def test_two_plugins_registering_one_name_is_refused_naming_both(tmp_path):
    dup = tmp_path / "dup.py"
    dup.write_text(textwrap.dedent("""
        import loop

        class Other(loop.Generator):
            name = "fake"

        @loop.hookimpl
        def register_generators(register):
            register(Other)
        """))
    config = tmp_path / "c.toml"
    config.write_text(fake_config(tmp_path / "runs"))
    proc = cli("run", str(config), "--plugin", str(dup), "--progress", "off")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "two plugins register a generator named 'fake'" in line
    assert f"file:{FAKE_PLUGIN}" in line and f"file:{dup.resolve()}" in line
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def installed(tmp_path) -> Path:
    """A site folder holding an 'installed' plugin: a module and its dist-info entry point."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "myplug.py").write_text(textwrap.dedent("""
        import loop

        class Judge(loop.Judge):
            name = "installed_judge"

        @loop.hookimpl
        def register_judges(register):
            register(Judge)
        """))
    info = site / "myplug_dist-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug-dist\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[selfloop]\nmyjudge = myplug\n")
    return site


def _plugins(site: Path, **env) -> tuple[dict, str]:
    proc = cli("plugins", "--json", PYTHONPATH=str(site), **env)
    assert proc.returncode == 0, proc.stderr
    return {p["name"]: p for p in json.loads(proc.stdout)}, proc.stderr


@pytest.mark.parametrize("allow,loaded", [
    (None, True), ("", False), ("myjudge", True), ("myplug-dist", True), ("other, thing", False),
])
def test_selfloop_load_plugins_allow_list(installed, allow, loaded):
    env = {} if allow is None else {"SELFLOOP_LOAD_PLUGINS": allow}
    data, _ = _plugins(installed, **env)
    assert ("myjudge" in data) is loaded
    if loaded:
        assert data["myjudge"]["components"] == {"judge": ["installed_judge"]}
        assert data["myjudge"]["hooks"] == ["register_judges"] and not data["myjudge"]["builtin"]


def test_trace_plugins_prints_hook_calls(installed):
    _, stderr = _plugins(installed, SELFLOOP_TRACE_PLUGINS="1")
    assert "[selfloop plugin trace] register_commands(cli=" in stderr
    assert "[selfloop plugin trace] register_judges -> [myjudge]" in stderr
    _, quiet = _plugins(installed)
    assert "plugin trace" not in quiet


def test_help_lists_an_installed_plugins_command_without_importing_torch(tmp_path):
    """`selfloop --help` loads installed plugins for their commands but no built-in
    component (they import torch): a help that takes a quarter of a second, not five."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "cmdplug.py").write_text(textwrap.dedent("""
        import click
        import loop

        @loop.hookimpl
        def register_commands(cli):
            @cli.command(name="cmd-hello")
            def hello():
                \"\"\"Say hello from an installed plugin.\"\"\"
                click.echo("hello")
        """))
    info = site / "cmdplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cmdplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[selfloop]\ncmdplug = cmdplug\n")
    probe = ("import sys\nfrom loop.cli import cli\ntry:\n    cli(['--help'])\nexcept SystemExit as e:\n"
             "    print('exit', e.code, 'torch' in sys.modules, 'plugins.generators.hf' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env=env(PYTHONPATH=str(site)))
    assert proc.returncode == 0, proc.stderr
    assert "cmd-hello" in proc.stdout and "Say hello from an installed plugin." in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "exit 0 False False"
    ran = cli("cmd-hello", PYTHONPATH=str(site))
    assert (ran.returncode, ran.stdout) == (0, "hello\n"), ran.stderr


def test_the_builtins_that_add_commands_are_listed():
    """The light manager of `--help` loads only COMMAND_BUILTINS: a built-in that adds a
    command must be listed there, or its command would be missing from the help."""
    from loop import plugins

    pm = plugins.get_manager()
    adding = {impl.plugin_name for impl in pm.hook.register_commands.get_hookimpls()}
    assert adding & set(plugins.BUILTINS) == set(plugins.COMMAND_BUILTINS)


def test_plugins_json_lists_plugins_hooks_components():
    proc = cli("plugins", "--json", "--plugin", str(FAKE_PLUGIN), SELFLOOP_LOAD_PLUGINS="")
    assert proc.returncode == 0, proc.stderr
    data = {p["name"]: p for p in json.loads(proc.stdout)}
    fake = data[f"file:{FAKE_PLUGIN}"]
    assert fake["components"] == {
        "generator": ["fake"], "prompt_source": ["fake"], "judge": ["fake"],
        "selector": ["fake_pairs"], "updater": ["fake"], "evaluator": ["fake"],
        "model_builder": ["fake"],
    }
    assert "run_start" in fake["hooks"] and "register_judges" in fake["hooks"]
    table = cli("plugins", "--plugin", str(FAKE_PLUGIN), SELFLOOP_LOAD_PLUGINS="")
    assert table.returncode == 0 and "fake_pairs" in table.stdout
