"""Held out means held out: `flan-jax data overlap` and `TrainConfig.exclude_overlap_with` (tasks/overlap.py)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import seqio
import tensorflow as tf

from flan_jax.commands import catalog
from flan_jax.commands import train as train_command
from tasks import mixing, overlap, registry, seqio_tasks, sources, user_files

REPO = Path(__file__).resolve().parent.parent
PLANTED = {5: "Q: {}", 77: "{} Answer it.", 1200: "{}"}  # GSM8K test index -> how its question is copied
MIXTURE = "planted_mix"
TEXT_TASK = "planted_text"


def _gsm8k_questions() -> list[str]:
    path = os.path.join(sources.data_dir() or "", "gsm8k", "test.jsonl")
    if not os.path.exists(path):
        pytest.skip("no GSM8K test set (set FLAN_JAX_DATA_DIR)")
    with open(path) as f:
        return [json.loads(line)["question"] for line in f]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A user task (two variants of one source) of 20 unrelated rows plus copies of three GSM8K test questions,
    and a text task with one copy among unrelated rows; both in a mixture."""
    catalog.load_tasks()
    questions = _gsm8k_questions()
    rng = random.Random(0)
    vocabulary = [f"zq{i}" for i in range(300)]
    rows = [{"question": " ".join(rng.choice(vocabulary) for _ in range(30)), "answer": "1"} for _ in range(20)]
    for position, (i, layout) in zip((2, 9, 15), PLANTED.items()):
        rows.insert(position, {"question": layout.format(questions[i].upper()), "answer": "2"})
    path = tmp_path_factory.mktemp("planted") / "planted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = user_files.register_file_task("planted", str(path), validation_percent=0,
                                          variants=["zs_noopt", "fs_noopt"])
    texts = [" ".join(rng.choice(vocabulary) for _ in range(25)) for _ in range(9)] + [questions[300]]

    def text_rows(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices({"inputs": texts, "targets": ["x"] * len(texts)})

    registry.add_text_task(TEXT_TASK, seqio.FunctionDataSource(text_rows, splits=["train"]))
    seqio_tasks.refresh()
    mixing.add_mixture(MIXTURE, {**{n: 1.0 for n in names}, TEXT_TASK: 1.0})
    yield names
    registry.remove_mixture(MIXTURE)
    registry.remove_text_task(TEXT_TASK)
    registry.remove_source("planted")


def test_planted_copies_are_found_exactly_and_each_source_read_once(planted):
    result = overlap.overlap_report(MIXTURE, catalog.get_suites("gsm8k_cot"), progress=False)
    pairs = {(r["training_task"], r["eval_task"]): (r["eval_indices"], r["training_examples"]) for r in result["pairs"]}
    assert pairs == {("planted", "gsm8k_cot"): (sorted(PLANTED), 3), (TEXT_TASK, "gsm8k_cot"): ([300], 1)}
    assert result["training_read"] == {"planted": 23, TEXT_TASK: 10}  # Two variants, one source, read once.
    task = result["eval_tasks"]["gsm8k_cot"]
    assert task["examples"] == 1319 and task["exemplars"] == 8 and task["in_eval"] == []
    table = overlap.format_report(result)
    assert "planted" in table and "3/1319" in table


def test_exclusion_drops_exactly_the_planted_rows_and_counts_them(planted):
    sources.reset_stats()
    exclusion = train_command.overlap_exclusion(("gsm8k_cot",))
    lengths = {"inputs": 256, "targets": 16}
    kept = {}
    with exclusion.installed():
        for task in [*planted, TEXT_TASK]:
            ds = seqio.get_mixture_or_task(task).get_dataset(lengths, split="train", shuffle=False,
                                                             use_cached=False, num_epochs=1)
            kept[task] = [ex["inputs"] for ex in ds.as_numpy_iterator()]
    assert {task: len(rows) for task, rows in kept.items()} == {planted[0]: 20, planted[1]: 20, TEXT_TASK: 9}
    assert overlap.excluded_counts() == {"planted": 6, TEXT_TASK: 1}  # Counted per pipeline built: two variants.
    assert exclusion.report() == {"suites": ["gsm8k_cot"], "checked": 56, "dropped": {"planted": 6, TEXT_TASK: 1}}
    ds = seqio.get_mixture_or_task(planted[0]).get_dataset(lengths, split="train", shuffle=False, use_cached=False,
                                                           num_epochs=1)
    assert sum(1 for _ in ds.as_numpy_iterator()) == 23  # Built after: the filter is gone.


def test_training_logs_the_running_exclusion_counts(planted, tmp_path, tiny_config):
    """Every train record of metrics.jsonl carries the counts so far; the last one's are at most the final
    ones of excluded_overlap.json (the pipeline reads ahead), and each planted source has dropped by then."""
    import dataclasses

    from flan_jax import checkpoints, data, optim, run_dir, trainer

    sources.reset_stats()
    exclusion = train_command.overlap_exclusion(("gsm8k_cot",))
    vocab_size = data.targets_vocabulary(seqio.get_mixture_or_task(MIXTURE)).vocab_size
    config = trainer.TrainConfig(model_dir=str(tmp_path), mixture_or_task_name=MIXTURE, num_steps=3, batch_size=2,
                                 log_every=2, task_feature_lengths={"inputs": 64, "targets": 8},
                                 exclude_overlap_with=("gsm8k_cot",))
    trainer.train(config, model_config=dataclasses.replace(tiny_config, vocab_size=vocab_size),
                  optimizer=optim.adafactor(learning_rate=1e-2), show_progress=False,
                  checkpoint_config=checkpoints.CheckpointConfig(save_every=100, best_metric=None),
                  example_filter=exclusion)
    written = json.loads((tmp_path / run_dir.EXCLUDED_FILE).read_text())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    checked = [r["data/overlap_checked"] for r in train]
    assert checked == sorted(checked) and 0 < checked[-1] <= written["checked"]
    last = train[-1]
    by_source = {k.removeprefix("data/overlap_excluded/"): v for k, v in last.items()
                 if k.startswith("data/overlap_excluded/")}
    assert set(by_source) == set(written["dropped"]) == {"planted", TEXT_TASK}
    assert all(0 < by_source[name] <= written["dropped"][name] for name in by_source)
    assert last["data/overlap_excluded"] == sum(by_source.values())
    assert last["data/overlap_excluded"] < last["data/overlap_checked"]
    events = [e for path in (tmp_path / "tb").glob("events.*") for e in tf.compat.v1.train.summary_iterator(str(path))]
    tensorboard = {v.tag: float(tf.make_ndarray(v.tensor)) for e in events if e.step == 3 for v in e.summary.value}
    assert {k: v for k, v in tensorboard.items() if k.startswith("data/")} == {
        k: v for k, v in last.items() if k.startswith("data/")}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flan_jax.cli", "data", "overlap", *args], cwd=REPO,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True, timeout=600)


def test_flan_cot_against_gsm8k_test(flan_cot_data, tmp_path):
    """Flan CoT's GSM8K training rows share 13-word runs with 3 GSM8K test questions (near-duplicate problems:
    581 and 632 reuse a training problem's wording with other names and numbers; 602 shares a sentence)."""
    _gsm8k_questions()
    output = tmp_path / "overlap.json"
    result = _cli("--mixture=flan_cot", "--suite=gsm8k_cot", f"--output={output}")
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    assert [(r["training_task"], r["eval_task"], r["eval_indices"]) for r in report["pairs"]] == [
        ("flan_cot_gsm8k", "gsm8k_cot", [581, 602, 632])]
    assert set(report["training_read"]) == {f"flan_cot_{d}" for d in (
        "aqua", "creak", "ecqa", "gsm8k", "qasc", "sensemaking", "strategyqa")}
    assert report["eval_tasks"]["gsm8k_cot"]["exemplars"] == 8  # Wei et al.'s: none is a test question.
    assert report["eval_tasks"]["gsm8k_cot"]["in_eval"] == []
    assert "flan_cot_gsm8k" in result.stdout and "3/1319" in result.stdout


@pytest.mark.parametrize("args, named", [
    (("--mixture=flan_cot", "--suite=gsm8k_cot,nope"), "unknown suite 'nope'"),
    (("--mixture=nope", "--suite=gsm8k_cot"), "unknown task or mixture 'nope'"),
])
def test_bad_names_are_one_line(args, named):
    result = _cli(*args)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("flan-jax: error:")]
    assert len(errors) == 1 and named in errors[0], result.stderr  # TensorFlow's start-up lines aside.
    assert "Traceback" not in result.stderr


def test_an_mmlu_cot_exemplar_that_is_a_test_question_is_found(planted):
    """FLAN's 5-shot MMLU-CoT prompt for high-school physics holds MMLU test question 152 (the microwave oven)."""
    tasks = [t for t in overlap.eval_tasks(catalog.get_suites("mmlu_cot")) if t.name == "mmlu_high_school_physics_cot"]
    found = overlap.exemplars_in_eval(tasks[0], overlap.eval_index(tasks))
    assert found["exemplars"] == 5
    assert [(e["exemplar"].split(",")[0], e["identical"]) for e in found["in_eval"] if e["identical"]] == [
        ("A microwave oven is connected to an outlet", [152])]
