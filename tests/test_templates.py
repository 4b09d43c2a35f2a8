"""Templates are rendered in jinja2's sandbox: a downloaded ``.j2`` file cannot reach
``os.system`` through ``__class__.__mro__``. Refused when loaded (a literal private
attribute) or while rendering (a computed one), always with the template's file named."""

from __future__ import annotations

import pytest
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from loop.errors import UserError
from loop.templates import load_template, resolve_template_path
from tests.core_helpers import cli, write_config

ESCAPE = ("{{ prompt.__class__.__mro__[1].__subclasses__() }}{{ response }}")
COMPUTED = ("{% set a = '__cla' ~ 'ss__' %}{{ prompt|attr(a) }}{{ response }}")


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("source", [
    ESCAPE,
    "{{ prompt['__class__'] }}{{ response }}",
    "{{ prompt|attr('__class__') }}{{ response }}",
    "{{ response }}{{ prompt._private }}",
])
def test_a_literal_private_attribute_is_refused_when_loaded(tmp_path, source):
    path = _write(tmp_path, "evil.j2", source)
    with pytest.raises(UserError) as e:
        load_template(str(path), {"prompt", "response"})
    msg = str(e.value)
    assert msg.startswith(f"{path.resolve()}:1: template reaches for the Python internal '_")
    assert "sandbox" in msg and "\n" not in msg


def test_a_computed_escape_is_stopped_by_the_sandbox_while_rendering(tmp_path):
    path = _write(tmp_path, "sneaky.j2", COMPUTED)
    template = load_template(str(path), {"prompt", "response"})  # nothing literal to see
    with pytest.raises(UserError) as e:
        template.render(prompt="p", response="r")
    msg = str(e.value)
    assert msg.startswith(f"{path.resolve()}: the template sandbox refused it: access to "
                          "attribute '__class__' of 'str' object is unsafe.")


def test_the_sandbox_renders_ordinary_templates_and_refuses_mutation(tmp_path):
    ok = _write(tmp_path, "ok.j2", "{% for x in items %}{{ loop.index }}. {{ x|upper }}\n{% endfor %}")
    assert load_template(str(ok), {"items"}).render(items=["a", "b"]) == "1. A\n2. B\n"
    mut = _write(tmp_path, "mut.j2", "{{ items.append('x') }}{{ items }}")
    with pytest.raises(UserError, match="mut.j2: the template sandbox refused it"):
        load_template(str(mut), {"items"}).render(items=["a"])
    for name in ("self_reward", "tinyworld_judge", "cai_critique", "cai_revision",
                 "cai_preference", "opro", "self_instruct", "bpo_improve", "bpo_rewriter"):
        # every built-in template loads in the sandbox
        source = resolve_template_path(name).read_text(encoding="utf-8")
        used = meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(source))
        assert load_template(name, used).variables == used


def test_a_run_with_an_escaping_template_exits_2_naming_the_file(tmp_path):
    """A real run whose remote judge names the hostile template: one line, exit 2, and
    the command the template tried to run never ran."""
    marker = tmp_path / "pwned"
    evil = _write(tmp_path, "evil.j2",
                  "{{ response }}{{ prompt.__class__.__mro__[1].__subclasses__()[0]"
                  ".__init__.__globals__['os'].system('touch " + str(marker) + "') }}")
    extra = (f'[[judges]]\nname = "remote"\nurl = "http://127.0.0.1:9/v1"\nmodel = "m"\n'
             f'template = "{evil}"\n')
    config = write_config(tmp_path / "c.toml", tmp_path / "runs", rounds=1, per_round=2, n=2,
                          extra=extra)
    proc = cli("run", str(config), "--progress", "off")
    assert proc.returncode == 2, proc.stderr
    assert f"{evil.resolve()}:1: template reaches for the Python internal '__" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
