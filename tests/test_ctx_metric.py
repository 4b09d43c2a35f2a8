"""``ctx.metric`` and ``ctx.lora_rank``, through a real run of the fake components: a
metric reported from inside a generator call is stored with its phase's results (and not
when the phase fails); the generator sees the updater's LoRA rank; release and reclaim
bracket the update phase."""

from __future__ import annotations

import pytest

import loop
from loop import plugins
from tests.core_helpers import cli_inprocess, fake_config, rows, run_inprocess

CALLS: list[tuple] = []


class MeteredGenerator(loop.Generator):
    name = "metered"

    class Options(loop.Generator.Options):
        fail_after_metric: bool = False

    def generate(self, ctx, chats, sampling, *, adapter, progress=True):
        CALLS.append(("generate", ctx.phase, ctx.lora_rank))
        ctx.metric("probe/calls", ctx.reported.get("probe/calls", 0) + 1)
        if self.options.fail_after_metric:
            raise RuntimeError("told to fail")
        return [[loop.Completion(text="yes " * k, num_tokens=k + 1, finish_reason="stop")
                 for k in range(sampling.n)] for _ in chats]

    def release(self, ctx):
        CALLS.append(("release", ctx.phase, None))

    def reclaim(self, ctx):
        CALLS.append(("reclaim", ctx.phase, None))


class RankedUpdater(loop.Updater):
    name = "ranked_fake"

    def update(self, ctx, selection, output_dir):
        CALLS.append(("update", ctx.phase, None))
        from pathlib import Path

        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "adapter_config.json").write_text('{"weight": 0}')  # what the fake evaluator reads
        return loop.UpdateResult()

    def lora_rank(self):
        return 12


class Plugin:
    @staticmethod
    @loop.hookimpl
    def register_generators(register):
        register(MeteredGenerator)

    @staticmethod
    @loop.hookimpl
    def register_updaters(register):
        register(RankedUpdater)


@pytest.fixture
def registered():
    CALLS.clear()
    name = plugins.register(Plugin(), name="metered")
    yield
    plugins.unregister(name=name)


def config(tmp_path, **generator):
    text = fake_config(tmp_path / "runs", rounds=1, per_round=2, n=2, generator=generator)
    text = text.replace('[generator]\nname = "fake"', '[generator]\nname = "metered"', 1)
    text = text.replace('[updater]\nname = "fake"', '[updater]\nname = "ranked_fake"', 1)
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_reported_metric_is_stored_with_its_phase(tmp_path, registered):
    run_dir = run_inprocess(config(tmp_path))
    got = rows(run_dir / "run.db", "select round, phase, source, value from metrics where name = 'probe/calls'")
    assert got == [{"round": 1, "phase": "generate", "source": "components", "value": 1.0}]
    assert ("generate", "generate", 12) in CALLS  # ctx.lora_rank is the updater's
    kinds = [c[0] for c in CALLS]
    assert kinds.index("release") < kinds.index("update") < kinds.index("reclaim")


def test_failed_phase_stores_no_reported_metric(tmp_path, registered):
    result = cli_inprocess("run", str(config(tmp_path, fail_after_metric=True)), "--progress", "off")
    assert result.exit_code != 0
    db = next((tmp_path / "runs").glob("*/run.db"))
    assert rows(db, "select * from metrics where name = 'probe/calls'") == []


def test_metric_names_need_a_group():
    from conftest import make_context

    ctx = make_context()
    with pytest.raises(ValueError, match="group/name"):
        ctx.metric("calls", 1)
