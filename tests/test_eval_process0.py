"""`flan-jax eval` with several processes (issue 29): every process computes the
scores, process 0 alone writes the results file, the TensorBoard events and
exported prompts, and prints the table. Other processes are played by
monkeypatching `jax.process_index`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import pytest

from flan_jax import suite_results

DATA = Path(os.environ.get("FLAN_JAX_DATA_DIR", "/nonexistent"))
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"no data directory at {DATA}")


def _results() -> dict:
    """A results dict as `suites.summarize` shapes it, for one suite of one task."""
    row = {"score": 50.0, "chance": 25.0, "normalized": 100 / 3, "num_tasks": 1, "num_examples": 4}
    report = {**row, "split": "test", "over_length": 0, "truncated": 0, "unfinished": 0, "categories": {},
              "averages": {}, "tasks": {"task_a": {**row, "over_length": 0, "truncated": 0}}}
    return {"suites": {"suite_a": report}, "normalized_average": 100 / 3, "averaged_suites": ["suite_a"],
            "extras": [], "composites": {}}


@pytest.mark.parametrize("process", [0, 1])
def test_only_process_0_writes_the_results_and_tensorboard(tmp_path, monkeypatch, capsys, process):
    monkeypatch.setattr(jax, "process_index", lambda: process)
    output, tb_dir = tmp_path / "out" / "results.json", tmp_path / "out" / "results_tb"
    suite_results.report(_results(), str(output), str(tb_dir), step=7)
    printed = capsys.readouterr().out
    if process:
        assert not (tmp_path / "out").exists() and printed == ""
    else:
        assert json.loads(output.read_text()) == _results()
        assert any(p.name.startswith("events.out.tfevents") for p in tb_dir.iterdir())
        assert "suite_a" in printed and f"results      {output}" in printed and str(tb_dir) in printed


@needs_data
def test_eval_exports_and_scores_on_process_0_only(tmp_path, monkeypatch, capsys):
    from flan_jax import cli

    prompts, output = tmp_path / "prompts.jsonl", tmp_path / "scored.json"
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    cli.main(["eval", "--suite=gsm8k_cot", "--limit=2", f"--export_prompts={prompts}"])
    assert not prompts.exists() and "prompts" not in capsys.readouterr().out

    monkeypatch.setattr(jax, "process_index", lambda: 0)
    cli.main(["eval", "--suite=gsm8k_cot", "--limit=2", f"--export_prompts={prompts}"])
    records = [json.loads(line) for line in prompts.read_text("utf-8").splitlines()]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"task": r["task"], "index": r["index"], "prediction": "The answer is 1."})
                               + "\n" for r in records))
    capsys.readouterr()

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    cli.main(["eval", "--suite=gsm8k_cot", "--limit=2", f"--predictions={answers}", f"--output={output}"])
    assert not output.exists() and "normalized average" not in capsys.readouterr().out

    monkeypatch.setattr(jax, "process_index", lambda: 0)
    cli.main(["eval", "--suite=gsm8k_cot", "--limit=2", f"--predictions={answers}", f"--output={output}"])
    assert json.loads(output.read_text())["suites"]["gsm8k_cot"]["num_examples"] == 2
    assert "normalized average" in capsys.readouterr().out
