"""Help that teaches: examples under every command's --help (each one parses against the
command's options), `plugins --options NAME` with types, defaults and explanations for
every built-in option, and `selfloop init` writing a starter config that validates."""

from __future__ import annotations

import json
import shlex

import pytest
from click.testing import CliRunner

from loop.cli import cli
from loop.examples import EXAMPLES
from tests.core_helpers import cli_inprocess


def _commands():
    ctx = cli.make_context("selfloop", ["--help"], resilient_parsing=True)
    return {name: cli.get_command(ctx, name) for name in cli.list_commands(ctx)}


def test_every_command_has_two_or_three_examples_that_parse():
    commands = _commands()
    for name in commands:
        assert 2 <= len(EXAMPLES.get(name, [])) <= 3, f"{name}: give 2-3 examples in loop/examples.py"
    for name, examples in EXAMPLES.items():
        for line, what in examples:
            assert what and line.startswith("selfloop "), line
            for part in line.split(" && "):
                words = shlex.split(part.split(" | ")[0].split(" 2>&1")[0])
                assert words[0] == "selfloop"
                if words[1] == "COMMAND":
                    continue
                command = commands[words[1]]
                # parses: options exist, values have their types, arguments are all there
                command.make_context(words[1], words[2:])
        help_text = CliRunner().invoke(cli, [name, "--help"] if name != "cli" else ["--help"]).output
        assert "Examples:" in help_text and examples[0][0] in help_text, help_text


def test_options_of_a_builtin_component():
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["plugins", "--options", "self_reward"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "judge 'self_reward'" in out
    for cell in ("samples", "int (>= 1)", "Judge samples per candidate", "max_new_tokens", "256",
                 "weight", "share of this judge in the combined score"):
        assert cell in out, (cell, out)
    data = json.loads(CliRunner().invoke(cli, ["plugins", "--options", "vllm", "--json"]).output)
    (vllm,) = data
    rows = {r["name"]: r for r in vllm["options"]}
    assert vllm["kind"] == "generator"
    assert rows["cpu_release"] == {"name": "cpu_release", "type": "'keep' | 'teardown'",
                                   "default": "keep", "description": rows["cpu_release"]["description"]}
    assert rows["cpu_release"]["description"].startswith("CPU (no sleep mode in vLLM)")
    assert rows["max_model_len"]["type"] == "int | None (>= 16)"
    # a name two kinds share lists both; KIND/NAME picks one; an unknown name is exit 2
    both = json.loads(CliRunner().invoke(cli, ["plugins", "--options", "tinyworld", "--json"]).output)
    assert {d["kind"] for d in both} == {"model_builder", "prompt_source", "evaluator", "judge"}
    one = json.loads(CliRunner().invoke(cli, ["plugins", "--options", "evaluator/tinyworld",
                                              "--json"]).output)
    assert [d["kind"] for d in one] == ["evaluator"]
    bad = cli_inprocess("plugins", "--options", "nope")
    assert bad.exit_code == 2 and "known:" in bad.stderr and "judge/self_reward" in bad.stderr


def test_every_builtin_option_is_explained():
    from loop import plugins
    from loop.options_doc import option_rows

    # Built-ins only: the test plugins other tests load into this process are not shipped.
    missing = [f"{kind}/{name}.{row['name']}"
               for kind, by_name in plugins.registry().components.items()
               for name, cls in by_name.items() if cls.plugin in plugins.BUILTINS
               for row in option_rows(kind, cls) if not row["description"]]
    assert not missing, f"add Field(description=...) to: {missing}"


def test_option_comments_are_read_from_the_source(tmp_path):
    from pydantic import Field

    import loop
    from loop.options_doc import option_rows

    class Judge(loop.Judge):
        name = "commented"

        class Options(loop.Judge.Options):
            # Above the field,
            # on two lines.
            a: int = 1
            b: float = Field(0.5, ge=0, description="from the Field")
            c: str = "x"  # at the end of the line

            d: bool = False

    rows = {r["name"]: r for r in option_rows("judge", Judge)}
    assert rows["a"]["description"] == "Above the field, on two lines."
    assert rows["b"]["description"] == "from the Field" and rows["b"]["type"] == "float (>= 0)"
    assert rows["c"]["description"] == "at the end of the line"
    assert rows["d"]["description"] == ""


@pytest.mark.parametrize("generator", ["hf", "vllm"])
def test_init_writes_a_config_that_validates(tmp_path, tiny_model_dir, monkeypatch, generator):
    from loop.runs import prepare

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Explain DPO in one line."}\n')
    (tmp_path / "configs").mkdir()
    result = cli_inprocess("init", tiny_model_dir, "--generator", generator, "--prompts",
                           "prompts.jsonl", "-o", "configs/run.toml")
    assert result.exit_code == 0, result.stderr
    assert "selfloop run configs/run.toml" in result.stderr
    text = (tmp_path / "configs" / "run.toml").read_text()
    assert text.count("#") > 30  # commented
    config, comps = prepare(str(tmp_path / "configs" / "run.toml"))
    assert comps.generator.name == generator and config.model.path == tiny_model_dir
    assert [j.name for j in comps.judges] == ["self_reward"] and comps.updater.name == "dpo"
    assert comps.prompt_sources[0].options.path == str(tmp_path / "prompts.jsonl")
    if generator == "vllm":
        assert comps.generator.options.max_model_len == 512  # the model's own limit
    # the file is not overwritten without --force; a folder without config.json is refused
    again = cli_inprocess("init", tiny_model_dir, "-o", "configs/run.toml")
    assert again.exit_code == 2 and "--force" in again.stderr
    bad = cli_inprocess("init", str(tmp_path), "-o", "x.toml")
    assert bad.exit_code == 2 and "no config.json" in bad.stderr and not (tmp_path / "x.toml").exists()


def test_init_for_a_hub_name_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    result = cli_inprocess("init", "someorg/some-model-1B", "-o", "-")
    assert result.exit_code == 0
    assert 'path = "someorg/some-model-1B"' in result.output
    assert "hf download someorg/some-model-1B" in result.output
