"""`selfloop export --format`: TRL's conversational formats from a real run's database.

Model-free runs (the fake components) with three selectors fill pairs and `selected`
rows; each format is read back and compared with the database. The trl-dpo file is then
given to TRL's DPOTrainer (skipped without trl), which must tokenize the chat-templated
prompt, system turn included, and train a step.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from core_helpers import FAKE_PLUGIN, cli_inprocess, run_inprocess

SYSTEM = "Answer in one word."


def config(tmp: Path, selector: str) -> Path:
    data = tmp / "prompts.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "system": SYSTEM}) + "\n"
                                for i in range(6)))
    path = tmp / f"{selector}.toml"
    path.write_text(f"""
name = "{selector}"
rounds = 2
seed = 5
runs_dir = "{tmp / 'runs'}"
plugins = ["{FAKE_PLUGIN}"]
[model]
build = {{ name = "fake" }}
[generator]
name = "fake"
[generate]
n = 4
[[prompts]]
name = "dataset"
path = "{data}"
system_field = "system"
per_round = 4
[[judges]]
name = "fake"
[selector]
name = "{selector}"
[updater]
name = "fake"
""")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("export")
    return {s: run_inprocess(config(tmp, s)) for s in ("fake_pairs", "top_k", "labels")}


def export(run: Path, *args: str) -> list[dict]:
    result = cli_inprocess("export", str(run), *args)
    assert result.exit_code == 0, result.stderr
    out = [a for a in args if a.endswith((".jsonl", ".parquet"))]
    if not out:
        return [json.loads(line) for line in result.stdout.splitlines()]
    if out[0].endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(out[0]).to_pylist()
    return [json.loads(line) for line in Path(out[0]).read_text().splitlines()]


def q(run: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{run / 'run.db'}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_trl_dpo_rows_are_chats_with_the_system_prompt_and_scores(runs, tmp_path):
    run = runs["fake_pairs"]
    pairs = q(run, "select p.round, pr.text, ch.text, rj.text, p.chosen_score, p.rejected_score "
                   "from pairs p join prompts pr on pr.id = p.prompt_id join candidates ch on "
                   "ch.id = p.chosen_id join candidates rj on rj.id = p.rejected_id "
                   "where p.selected = 1 order by p.id")
    assert {r for r, *_ in pairs} == {1, 2}
    rows = export(run, "--format", "trl-dpo", "-o", str(tmp_path / "dpo.jsonl"))
    assert [(r["round"], r["prompt"], r["chosen"], r["rejected"], r["chosen_score"], r["rejected_score"])
            for r in rows] == [
        (rd, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
         [{"role": "assistant", "content": good}], [{"role": "assistant", "content": bad}], cs, rs)
        for rd, text, good, bad, cs, rs in pairs]
    # One round, as Parquet: the same rows of that round.
    round2 = export(run, "--format", "trl-dpo", "--round", "2", "-o", str(tmp_path / "dpo.parquet"))
    assert round2 == [r for r in rows if r["round"] == 2]
    # The plain format keeps prompt and system as text.
    plain = export(run, "--format", "jsonl")
    assert [(p["prompt"], p["system"], p["chosen"]) for p in plain] == [
        (text, SYSTEM, good) for _, text, good, *_ in pairs]


def test_trl_sft_and_kto_export_the_selected_answers(runs, tmp_path):
    top = q(runs["top_k"], "select c.text, s.score from selected s join candidates c on "
                           "c.id = s.candidate_id where s.label = 'top' order by s.id")
    assert top
    sft = export(runs["top_k"], "--format", "trl-sft", "-o", str(tmp_path / "sft.parquet"))
    assert [(r["completion"], r["score"]) for r in sft] == [
        ([{"role": "assistant", "content": t}], s) for t, s in top]
    assert all(r["prompt"][0] == {"role": "system", "content": SYSTEM} for r in sft)

    labels = q(runs["labels"], "select c.text, s.label = 'desirable' from selected s join candidates c "
                               "on c.id = s.candidate_id order by s.id")
    kto = export(runs["labels"], "--format", "trl-kto", "-o", str(tmp_path / "kto.jsonl"))
    assert [(r["completion"][0]["content"], r["label"]) for r in kto] == [(t, bool(d)) for t, d in labels]
    assert {r["label"] for r in kto} == {True, False}
    # Paired data splits into chosen (true) and rejected (false) answers, as TRL does.
    paired = export(runs["fake_pairs"], "--format", "trl-kto")
    assert len(paired) == 2 * len(q(runs["fake_pairs"], "select id from pairs where selected = 1"))


def test_an_unknown_output_type_is_refused(runs, tmp_path):
    result = cli_inprocess("export", str(runs["fake_pairs"]), "--format", "trl-dpo",
                           "-o", str(tmp_path / "out.csv"))
    assert result.exit_code == 2
    assert "name a .jsonl, .json, .parquet file" in result.stderr
    assert not (tmp_path / "out.csv").exists()


def test_trl_dpo_trainer_reads_the_export_with_the_chat_template(runs, tmp_path, tiny_model_dir):
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install -e .[bench])")
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "dpo.jsonl"
    export(runs["fake_pairs"], "--format", "trl-dpo", "-o", str(path))
    data = load_dataset("json", data_files=str(path), split="train")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, max_steps=1,
                         report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, bf16=False,
                         logging_steps=1)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    for example, tokenized in zip(data, trainer.train_dataset):
        templated = tok.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        assert tokenized["prompt_ids"] == templated  # the whole templated prompt: nothing cut
        assert tok.decode(templated).startswith(f"<|system|>{SYSTEM}<eos><|user|>")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    loss = trainer.state.log_history[0]["loss"]
    assert loss == loss and loss > 0  # finite: one real DPO step on the exported pairs
    assert any(not (p.detach() == before[n]).all() for n, p in model.named_parameters())
