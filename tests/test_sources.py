"""Tests for the real data sources: Flan CoT, BBH, MMLU, users' files; bad rows; missing files.

Tests marked `needs_data` read ../shared/data (FLAN_JAX_DATA_DIR, set by
tests/conftest.py) and are skipped where it does not exist; the others write
their own files under tmp_path.
"""

from __future__ import annotations

import functools
import http.server
import json
import logging
import os
import threading
from pathlib import Path

import gin
import pytest
import seqio

import tasks
from flan_jax.errors import UserError
from tasks import bbh, flan_cot, mmlu, registry, sources, templates, user_files

tasks.register()  # Every task module's tasks, registered with SeqIO (once per process).

DATA = Path(os.environ.get("FLAN_JAX_DATA_DIR", "/nonexistent"))
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"no data directory at {DATA}")
LONG = {"inputs": 4096, "targets": 1024}  # Room for every prompt: nothing dropped or cut.


def _take(name: str, split: str, sequence_length: dict[str, int], n: int | None = None) -> list[dict]:
    ds = seqio.get_mixture_or_task(name).get_dataset(sequence_length, split=split, shuffle=False)
    if n is not None:
        ds = ds.take(n)
    # The iterator dies with this function: see the note in tasks/registry.py.
    return [{k: v.decode() if isinstance(v, bytes) else v for k, v in ex.items()} for ex in ds.as_numpy_iterator()]


@pytest.fixture
def clean_gin():
    yield
    gin.clear_config()


# --- Flan CoT: every variant of one example, written out by hand ------------------------------

# aqua_train.tsv line 1 is train example 0; its template (index 1) is
# "Solve this math problem.\n{question}". The answer "(C)" is the option's text.
AQUA_QUERY = ("Solve this math problem.\nRs. 5600 is divided into three parts A, B and C. "
              "How much A is more than C if their ratio is 1/7:1/7:1/14?")
AQUA_OPTIONS = "\n\nOPTIONS:\n- 300\n- 992\n- 1120\n- 552\n- 312"
AQUA_COT_TARGET = "1/7:1/7:1/14 = 2:2:1\n1/5*5600 = 1120\n2240-1120 = 1120 So the answer is 1120."
# Its three exemplars, as fs_opt shows them (question, options, answer).
AQUA_SHOTS_OPT = [
    "Solve this math problem.\nFind the odd man out\n253, 136, 352, 324, 631, 244"
    "\n\nOPTIONS:\n- 324\n- 136\n- 352\n- 631\n- 531",
    "Solve this math problem.\nFind the expenditure on digging a well 14m deep and of 3m diameter at Rs.15 per "
    "cubic meter?\n\nOPTIONS:\n- Rs.1185\n- Rs.1285\n- Rs.1385\n- Rs.1485\n- Rs.1495",
    "Solve this math problem.\nThe speed of a car is 80 km in the first hour and 60 km in the second hour. What "
    "is the average speed of the car?\n\nOPTIONS:\n- 70 kmph\n- 92 kmph\n- 75 kmph\n- 65 kmph\n- 77 kmph",
]
AQUA_SHOT_ANSWERS = ["324", "Rs.1485", "70 kmph"]
AQUA_SHOT_COT = [
    "The sum all three digits comes to 10 except 324 So the answer is 324.",
    "22/7 * 14 * 3/2 * 3/2 = 99 m2\n99 * 15 = 1485 So the answer is Rs.1485.",
    "S = (80 + 60)/2 = 70 kmph So the answer is 70 kmph.",
]
AQUA_EXPECTED = {
    "zs_noopt": (AQUA_QUERY, "1120"),
    "zs_opt": (AQUA_QUERY + AQUA_OPTIONS, "1120"),
    "zs_cot": (AQUA_QUERY + AQUA_OPTIONS + "\nLet's think step by step.", AQUA_COT_TARGET),
    "fs_noopt": (
        "Solve this math problem.\nFind the odd man out\n253, 136, 352, 324, 631, 244\n324\n\n"
        "Solve this math problem.\nFind the expenditure on digging a well 14m deep and of 3m diameter at Rs.15 per "
        "cubic meter?\nRs.1485\n\n"
        "Solve this math problem.\nThe speed of a car is 80 km in the first hour and 60 km in the second hour. What "
        "is the average speed of the car?\n70 kmph\n\n" + AQUA_QUERY,
        "1120",
    ),
    "fs_opt": (
        "".join(f"{shot}\n{answer}\n\n" for shot, answer in zip(AQUA_SHOTS_OPT, AQUA_SHOT_ANSWERS))
        + AQUA_QUERY + AQUA_OPTIONS,
        "1120",
    ),
    "fs_cot": (
        "".join(f"{shot}\nLet's think step by step.\n{cot}\n\n" for shot, cot in zip(AQUA_SHOTS_OPT, AQUA_SHOT_COT))
        + AQUA_QUERY + AQUA_OPTIONS + "\nLet's think step by step.",
        AQUA_COT_TARGET,
    ),
}

# strategyqa_train.tsv line 1 (train example 0), template "Answer yes or no.\n{question}".
STRATEGYQA_EXPECTED = {
    "zs_noopt": ("Answer yes or no.\nAre more people today related to Genghis Khan than Julius Caesar?", "yes"),
    "zs_cot": (
        "Answer yes or no.\nAre more people today related to Genghis Khan than Julius Caesar?\n"
        "Let's think step by step.",
        "Julius Caesar had three children. Genghis Khan had sixteen children. Modern geneticists have determined "
        "thatout of every 200 men today has DNA that can be traced to Genghis Khan. So the answer is yes.",
    ),
    "fs_noopt": (
        "Answer yes or no.\nCould someone have arrived at Wrestlemania X in a Toyota Prius?\nno\n\n"
        "Answer yes or no.\nDo onions have a form that resembles the inside of a tree?\nyes\n\n"
        "Answer yes or no.\nWould 1996 leap year baby technically be 1 year old in 2000?\nyes\n\n"
        "Answer yes or no.\nAre more people today related to Genghis Khan than Julius Caesar?",
        "yes",
    ),
    "fs_cot": (
        "Answer yes or no.\nCould someone have arrived at Wrestlemania X in a Toyota Prius?\n"
        "Let's think step by step.\n"
        "Wrestlemania X took place in 1994. The Toyota Prius was first manufactured in 1997. So the answer is no.\n\n"
        "Answer yes or no.\nDo onions have a form that resembles the inside of a tree?\n"
        "Let's think step by step.\n"
        "When bisected, an onion has rings that extend from the core to the outside. Trees are formed of a series "
        "of rings that extend from the inside to the outside. So the answer is yes.\n\n"
        "Answer yes or no.\nWould 1996 leap year baby technically be 1 year old in 2000?\n"
        "Let's think step by step.\n"
        "A leap year happens once every 4 years and has 29 days in February. The years 1996, 2000, 2004, 2008, "
        "2012, 2016, and 2020 are the last 7 leap years that have happened. 1996 to 2000 is one leap year. "
        "So the answer is yes.\n\n"
        "Answer yes or no.\nAre more people today related to Genghis Khan than Julius Caesar?\n"
        "Let's think step by step.",
        "Julius Caesar had three children. Genghis Khan had sixteen children. Modern geneticists have determined "
        "thatout of every 200 men today has DNA that can be traced to Genghis Khan. So the answer is yes.",
    ),
}


@needs_data
@pytest.mark.parametrize("dataset, expected", [("aqua", AQUA_EXPECTED), ("strategyqa", STRATEGYQA_EXPECTED)])
def test_flan_cot_first_line_renders_every_variant_exactly(dataset, expected):
    assert set(registry.get_source(f"flan_cot_{dataset}").spec.variants) == set(expected)
    for variant, (inputs, targets) in expected.items():
        (ex,) = _take(flan_cot.task_name(dataset, variant), "train", LONG, 1)
        assert (ex["inputs_pretokenized"], ex["targets_pretokenized"]) == (inputs, targets), variant
        assert registry.postprocess(targets) == ex["answer"]


@needs_data
def test_flan_cot_sources_parse_every_row():
    rows = {"aqua": 2728, "creak": 6915, "ecqa": 7112, "gsm8k": 7473, "qasc": 1084, "sensemaking": 6070,
            "strategyqa": 2061}  # ../shared/data/README.md
    for dataset in flan_cot.DATASETS:
        source = registry.get_source(f"flan_cot_{dataset.name}")
        splits = source.load()
        stats = sources.stats(source.name)
        assert (stats.kept, stats.skipped) == (rows[dataset.name], 0), dataset.name
        assert len(splits["train"]) + len(splits["validation"]) == rows[dataset.name]
        assert 0.01 < len(splits["validation"]) / rows[dataset.name] < 0.03, dataset.name
        train_keys = {json.dumps([e["question"], e.get("options")]) for e in splits["train"]}
        assert not any(json.dumps([e["question"], e.get("options")]) in train_keys for e in splits["validation"])
        for example in splits["train"][:200]:
            assert "\\n" not in example["rationale"] and "Options:" not in example["question"]
            if dataset.multiple_choice:
                assert example["answer"] in example["options"]
    sensemaking = registry.get_source("flan_cot_sensemaking").example("train", 0)
    assert sensemaking["answer"] == 'Sentence A: "He poured orange juice on his cereal."'
    assert registry.get_source("flan_cot_sensemaking").spec.variants == templates.OPT_VARIANTS


@needs_data
def test_flan_cot_every_variant_renders_without_leaking_the_query():
    for dataset in flan_cot.DATASETS:
        source = registry.get_source(f"flan_cot_{dataset.name}")
        for split in ("train", "validation"):
            for index in range(8):
                example = source.example(split, index)
                for variant in source.spec.variants:
                    rendered = registry.render_example(source, split, index, example, variant)
                    zero_shot = registry.render_example(source, split, index, example, "zs" + variant[2:])
                    inputs = rendered["inputs"]
                    assert rendered["targets"] == zero_shot["targets"]
                    assert templates.extract_answer(rendered["targets"]) == example["answer"]
                    if variant.startswith("fs_"):
                        # Exemplars, then the query, which appears only there.
                        assert inputs.endswith("\n\n" + zero_shot["inputs"])
                        assert inputs.count(zero_shot["inputs"]) == 1, (dataset.name, split, index, variant)
                    if variant.endswith("_noopt"):
                        assert "OPTIONS" not in inputs
                exemplars = source.exemplars(split, index, example, registry.RENDER_SEED)
                assert len(exemplars) == 3 and not any(templates.same_question(e, example) for e in exemplars)


@needs_data
@pytest.mark.parametrize("inputs_length", [600, 160])
def test_flan_cot_few_shot_prompts_fit_in_tokens_and_overflow_is_counted(inputs_length):
    # With the default vocabulary, a qasc fs_cot prompt is 800-1100 tokens, its query alone 95-180:
    # 600 tokens leave room for one or two exemplars, 160 for none, and some queries are cut.
    name = flan_cot.task_name("qasc", "fs_cot")
    vocabulary = seqio.get_mixture_or_task(name).output_features["inputs"].vocabulary
    sources.reset_stats(name)
    examples = _take(name, "validation", {"inputs": inputs_length, "targets": 64})  # All, so counts are exact.
    size = len(registry.get_source("flan_cot_qasc").load()["validation"])
    assert len(examples) == size > 10
    limit = inputs_length - 1  # EOS comes after.
    too_long, shots = 0, []
    for ex in examples:
        tokens = len(vocabulary.encode(ex["inputs_pretokenized"]))
        shots.append(ex["inputs_pretokenized"].count("So the answer is"))
        assert len(ex["inputs"]) <= inputs_length and ex["inputs"][-1] == 1
        if shots[-1]:
            assert tokens <= limit  # A prompt with exemplars always fits.
        too_long += tokens > limit
    if inputs_length == 600:
        assert 0 < max(shots) < 3 and too_long == 0
    else:
        assert max(shots) == 0 and too_long > 0
    counts = sources.stats(name).counts
    assert counts["rendered"] == size and counts["inputs_truncated"] == too_long
    long_targets = sum(len(vocabulary.encode(ex["targets_pretokenized"])) > 63 for ex in examples)
    assert counts["targets_truncated"] == long_targets > 0


@needs_data
def test_flan_cot_mixture_rates_are_row_counts():
    mixture = seqio.get_mixture_or_task(flan_cot.MIXTURE)
    assert len(mixture.tasks) == 6 * 4 + 3 * 4  # MC sets (sensemaking has 4 variants) and the others.
    gsm8k = seqio.get_mixture_or_task(flan_cot.task_name("gsm8k", "zs_cot"))
    aqua = seqio.get_mixture_or_task(flan_cot.task_name("aqua", "fs_opt"))
    assert mixture.get_rate(gsm8k) == len(registry.get_source("flan_cot_gsm8k").load()["train"]) / 4
    assert mixture.get_rate(aqua) == len(registry.get_source("flan_cot_aqua").load()["train"]) / 6


# --- BBH -------------------------------------------------------------------------------------

BOOLEAN_DIRECT = (
    "Evaluate the result of a random Boolean expression.\n\n"
    "Q: not ( ( not not True ) ) is\nA: False\n\n"
    "Q: True and False and not True and True is\nA: False\n\n"
    "Q: not not ( not ( False ) ) is\nA: True\n\n"
    "Q: not ( True ) and ( True ) is\nA:"
)


@needs_data
def test_bbh_prompts_are_the_published_ones():
    assert sorted(p.stem for p in (DATA / "bbh" / "bbh").glob("*.json")) == sorted(bbh.TASKS)
    (direct,) = _take("bbh_boolean_expressions_direct", "test", LONG, 1)
    assert (direct["inputs_pretokenized"], direct["targets_pretokenized"]) == (BOOLEAN_DIRECT, "False")
    (cot,) = _take("bbh_boolean_expressions_cot", "test", LONG, 1)
    assert cot["inputs_pretokenized"].startswith(
        "Evaluate the result of a random Boolean expression.\n\nQ: not ( ( not not True ) ) is\n"
        "A: Let's think step by step.\nRemember that (i) expressions inside brackets are always evaluated first")
    assert cot["inputs_pretokenized"].endswith(
        "Z = not not ( A ) = not not (True) = not not False = True. So the answer is True.\n\n"
        "Q: not ( True ) and ( True ) is\nA: Let's think step by step.")
    assert cot["targets_pretokenized"] == "So the answer is False."
    assert registry.postprocess(cot["targets_pretokenized"]) == "False"
    # Every task's CoT prompt is its file without the canary and "-----" lines, then the query.
    total = 0
    for task in bbh.TASKS:
        file_text = (DATA / "bbh" / "cot-prompts" / f"{task}.txt").read_text()
        assert file_text.startswith("BENCHMARK DATA SHOULD NEVER APPEAR") and "\n-----\n" in file_text
        source = registry.get_source(f"bbh_{task}_cot")
        example = source.example("test", 0)
        rendered = registry.render_example(source, "test", 0, example, "fs_cot")
        assert rendered["inputs"] == (file_text.split("\n", 2)[2].strip()
                                      + f"\n\nQ: {example['question']}\nA: Let's think step by step.")
        assert source.split_size("validation") == source.split_size("test")
        total += source.split_size("test")
    assert total == 6511
    assert {t.name for t in seqio.get_mixture_or_task("bbh_cot").tasks} == {f"bbh_{t}_cot" for t in bbh.TASKS}
    assert len(seqio.get_mixture_or_task("bbh_direct").tasks) == 27


@needs_data
def test_bbh_scores_through_seqio_evaluator():
    evaluator = seqio.Evaluator(
        "bbh_sports_understanding_cot", feature_converter=seqio.EncDecFeatureConverter(pack=False),
        sequence_length={"inputs": 1024, "targets": 64}, num_examples=4, logger_cls=(), use_memory_cache=False,
    )  # The default split, "validation".
    vocabulary = seqio.get_mixture_or_task("bbh_sports_understanding_cot").output_features["targets"].vocabulary
    answer = vocabulary.encode("Santi Cazorla is a soccer player. So the answer is no.")

    def predict_fn(ds):  # Always "no", phrased as chain of thought.
        return [(index, answer) for index, _ in ds.as_numpy_iterator()]

    future, _ = evaluator.evaluate(compute_metrics=True, step=0, predict_fn=predict_fn)
    targets = [ex["answer"] for ex in _take("bbh_sports_understanding_cot", "validation", LONG, 4)]
    assert targets == ["no", "yes", "yes", "no"]
    assert future.result()["bbh_sports_understanding_cot"]["accuracy"] == pytest.approx(50.0)


# --- MMLU ------------------------------------------------------------------------------------


@needs_data
def test_mmlu_counts_and_five_shot_prompt():
    assert sorted(p.name.removesuffix("_dev.csv") for p in (DATA / "mmlu" / "dev").glob("*.csv")) == list(
        mmlu.SUBJECTS)
    totals = {"dev": 0, "validation": 0, "test": 0}
    for subject in mmlu.SUBJECTS:
        loaded = registry.get_source(f"mmlu_{subject}").load()
        for split in totals:
            totals[split] += len(loaded[split])
        assert sources.stats(f"mmlu_{subject}").skipped == 0
    assert totals == {"dev": 285, "validation": 1542, "test": 14079}  # ../shared/data/README.md

    (ex,) = _take("mmlu_abstract_algebra", "test", LONG, 1)
    assert ex["inputs_pretokenized"].startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and K are "
        "subgroups of G then HK is a subgroup of G.\nA. True, True\nB. False, False\nC. True, False\n"
        "D. False, True\nAnswer: B\n\n")
    assert ex["inputs_pretokenized"].count("\nAnswer:") == 6 and ex["inputs_pretokenized"].endswith("\nAnswer:")
    assert ex["targets_pretokenized"] in mmlu.LETTERS
    assert len(seqio.get_mixture_or_task("mmlu").tasks) == 57


# --- bad rows, missing files, where the data is -------------------------------------------------

GOOD_ROW = b"Which is two?\\nOptions:\\n(A) 1\\n(B) 2\t(B)\tOne plus one is two."


def test_malformed_rows_are_skipped_counted_and_reported(tmp_path, clean_gin, caplog):
    lines = [
        GOOD_ROW,
        b"only\ttwo columns",
        b"Which is one?\\nOptions:\\n(A) 1\\n(B) 2\t\tAn empty answer.",
        b"Bad \xff bytes?\\nOptions:\\n(A) 1\\n(B) 2\t(A)\tR.",
        b"Which is three?\\nOptions:\\n(A) 1\\n(B) 2\t(C)\tNot an option.",
        b"No options at all?\t(A)\tR.",
        b"Which is one?\\nOptions:\\n(A) 1\\n(B) 2\t(A)\tOne is one.\textra",
        GOOD_ROW.replace(b"two", b"2"),
    ]
    (tmp_path / "aqua_train.tsv").write_bytes(b"\n".join(lines) + b"\n")
    gin.bind_parameter("flan_cot_location.location", str(tmp_path))
    source = registry.get_source("flan_cot_aqua")
    with caplog.at_level(logging.WARNING, logger="tasks.sources"):
        loaded = source.load()
    path = tmp_path / "aqua_train.tsv"
    stats = sources.stats("flan_cot_aqua")
    assert (stats.kept, stats.skipped) == (2, 6)
    assert len(loaded["train"]) + len(loaded["validation"]) == 2
    assert stats.problems == [  # The first MAX_REPORTED_PROBLEMS, with file and line.
        f"{path}:2: expected 3 tab-separated columns, found 2",
        f"{path}:3: empty answer",
        f"{path}:4: not valid UTF-8 (invalid start byte at byte 4)",
        f"{path}:5: answer '(C)' is none of the options ['1', '2']",
        f"{path}:6: no Options block",
    ]
    assert [r.getMessage() for r in caplog.records] == [f"flan_cot_aqua: skipped row {p}" for p in stats.problems]
    gin.clear_config()
    if DATA.is_dir():  # Back to the real file, read afresh.
        assert len(source.load()["train"]) > 2 and sources.stats("flan_cot_aqua").skipped == 0


def test_a_csv_row_with_bytes_that_are_not_utf8_is_skipped_alone():
    data = b'q1,"A\nstill q1",B\nq\xff2,A,B\nq3,A,B\n'
    stats = sources.SourceStats("f")
    rows = list(sources.iter_rows(data, "f.csv", "csv", stats))
    assert rows == [(1, ["q1", "A\nstill q1", "B"]), (4, ["q3", "A", "B"])]
    assert stats.problems == ["f.csv:3: not valid UTF-8"]


@pytest.mark.parametrize("task, split, source, folder, file, published", [
    ("flan_cot_aqua_zs_opt", "train", "flan_cot_aqua", "flan_cot", "aqua_train.tsv",
     "https://github.com/google-research/FLAN/tree/main/flan/v2/cot_data"),
    ("bbh_navigate_cot", "test", "bbh_navigate_cot", "bbh", "cot-prompts/navigate.txt",
     "https://github.com/suzgunmirac/BIG-Bench-Hard"),
    ("mmlu_virology", "test", "mmlu_virology", "mmlu", "dev/virology_dev.csv", "https://github.com/hendrycks/test"),
])
def test_a_missing_file_names_file_directory_and_source(task, split, source, folder, file, published, tmp_path,
                                                        monkeypatch):
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
    # Registering needs no data; building the dataset fails, with one clear message.
    with pytest.raises(sources.MissingDataError) as error:
        seqio.get_mixture_or_task(task).get_dataset(LONG, split=split)
    assert isinstance(error.value, UserError)
    assert str(error.value).startswith(
        f"{source}: data file {file} not found in {tmp_path / folder} (looked for {tmp_path / folder / file}). "
        f"Get it from {published}")

    monkeypatch.delenv(sources.DATA_DIR_ENV)
    with pytest.raises(sources.MissingDataError, match=f"no data directory is set.*{sources.DATA_DIR_ENV}"):
        seqio.get_mixture_or_task(task).get_dataset(LONG, split=split)


def test_data_dir_gin_binding_beats_the_environment(monkeypatch, clean_gin):
    monkeypatch.setenv(sources.DATA_DIR_ENV, "/from/env")
    assert sources.data_dir() == "/from/env"
    gin.bind_parameter("data_dir.path", "/from/gin")
    assert sources.data_dir() == "/from/gin"
    assert flan_cot.flan_cot_location() == "/from/gin/flan_cot"
    monkeypatch.delenv(sources.DATA_DIR_ENV)
    gin.clear_config()
    assert sources.data_dir() is None


def test_flan_cot_files_can_come_from_a_url(tmp_path, monkeypatch, clean_gin):
    served = tmp_path / "served"
    (served / "cot").mkdir(parents=True)
    (served / "cot" / "qasc_train.tsv").write_bytes(GOOD_ROW + b"\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("FLAN_JAX_CACHE_DIR", str(tmp_path / "cache"))
    url = f"http://127.0.0.1:{server.server_address[1]}/cot"
    try:
        dataset = next(d for d in flan_cot.DATASETS if d.name == "qasc")
        stats = sources.SourceStats("qasc_from_url")
        loaded = flan_cot.read(dataset, url, stats)
        assert loaded["train"] + loaded["validation"] == [
            {"question": "Which is two?", "answer": "2", "rationale": "One plus one is two.", "options": ["1", "2"]}]
        with pytest.raises(sources.MissingDataError, match=f"could not download {url}/aqua_train.tsv.*404"):
            flan_cot.read(flan_cot.DATASETS[0], url, stats)
    finally:
        server.shutdown()
        server.server_close()
    # Read once, then from the cache: no server needed any more.
    assert flan_cot.read(dataset, url, sources.SourceStats("again")) == loaded


# --- the template library's few-shot settings ------------------------------------------------


def test_few_shot_fallback_and_separators():
    shot = {"question": "Q1?", "answer": "A1", "rationale": "R1."}
    query = {"question": "Q2?", "answer": "A2", "rationale": "R2."}
    spec = templates.TaskSpec("toy", [templates.Template("Q: {question}\nA:")], prefix="Task.\n\n",
                              shot_separator="\n###\n", shot_joiner=" ", cot_separator=" ")

    def render(spec, variant="fs_noopt", **kwargs):
        return templates.render(spec, query, variant, template_index=0, exemplars=[shot, shot], **kwargs)

    assert render(spec)["inputs"] == "Task.\n\nQ: Q1?\nA: A1\n###\nQ: Q1?\nA: A1\n###\nQ: Q2?\nA:"
    assert render(spec, "fs_cot")["inputs"] == (
        "Task.\n\nQ: Q1?\nA: Let's think step by step. R1. So the answer is A1.\n###\n"
        "Q: Q1?\nA: Let's think step by step. R1. So the answer is A1.\n###\n"
        "Q: Q2?\nA: Let's think step by step.")
    # No exemplar fits in 20 characters: render the query alone, or drop the example.
    assert render(spec, max_input_length=20) == {"inputs": "Task.\n\nQ: Q2?\nA:", "targets": "A2"}
    dropping = templates.TaskSpec("toy", spec.templates, few_shot_fallback="drop")
    assert render(dropping, max_input_length=20) is None
    assert render(dropping, max_input_length=1000) is not None
    with pytest.raises(ValueError, match="few_shot_fallback"):
        templates.TaskSpec("toy", spec.templates, few_shot_fallback="never")


# --- users' own files ------------------------------------------------------------------------


def test_register_file_task_from_jsonl(tmp_path):
    path = tmp_path / "riddles.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "solution": 2 * i, "why": f"{i} + {i} = {2 * i}."} for i in range(60)]
    lines = [json.dumps(row) for row in rows] + ["{not json", json.dumps({"prompt": "No answer?", "why": "."})]
    path.write_text("\n".join(lines) + "\n")
    spec = templates.TaskSpec("riddles", [templates.Template("{question}")], few_shot_fallback="drop")
    names = user_files.register_file_task(
        "riddles", str(path), field_map={"question": "prompt", "answer": "solution", "rationale": "why"}, spec=spec)
    try:
        assert names == ["riddles_zs_noopt", "riddles_fs_noopt", "riddles_zs_cot", "riddles_fs_cot"]
        stats = sources.stats("riddles")
        examples = _take("riddles_zs_cot", "train", {"inputs": 64, "targets": 64}, 1)
        assert (stats.kept, stats.skipped) == (60, 2)
        assert stats.problems == [f"{path}:61: not valid JSON (Expecting property name enclosed in double quotes)",
                                  f"{path}:62: no field 'solution'"]
        assert examples[0]["inputs_pretokenized"].endswith("?\nLet's think step by step.")
        assert templates.extract_answer(examples[0]["targets_pretokenized"]) == examples[0]["answer"]
        # fs_cot with room for no exemplar: few_shot_fallback="drop" leaves every example out, and counts it.
        sources.reset_stats("riddles_fs_cot")
        assert _take("riddles_fs_cot", "validation", {"inputs": 24, "targets": 64}) == []
        assert sources.stats("riddles_fs_cot").counts["dropped_no_fit"] == registry.get_source("riddles").split_size(
            "validation") > 0
    finally:
        registry.remove_source("riddles")


def test_register_file_task_from_csv_with_options_and_tfds(tmp_path, monkeypatch):
    path = tmp_path / "quiz.csv"
    path.write_text('q,a,b,c,ans\n"Pick, the middle",x,y,z,y\nBad answer,x,y,z,w\nshort,row\n')
    names = user_files.register_file_task("quiz", {"train": str(path), "validation": str(path)},
                                          field_map={"question": "q", "answer": "ans", "options": ["a", "b", "c"]})
    tfds_names = []
    try:
        assert names == ["quiz_zs_noopt", "quiz_zs_opt", "quiz_fs_noopt", "quiz_fs_opt"]
        (ex,) = _take("quiz_zs_opt", "validation", LONG)
        assert ex["inputs_pretokenized"] == "Pick, the middle\n\nOPTIONS:\n- x\n- y\n- z"
        assert ex["targets_pretokenized"] == "y"
        assert sources.stats("quiz").problems == [f"{path}:3: answer 'w' is none of the options ['x', 'y', 'z']",
                                                  f"{path}:4: no field 'ans'"] * 2  # Both splits read the file.

        import tensorflow as tf
        import tensorflow_datasets as tfds

        def fake_load(name, split, data_dir=None):  # A TFDS dataset without TFDS's download machinery.
            assert (name, data_dir) == ("toy_qa", "/tfds")
            n = 5 if split == "train" else 2
            return tf.data.Dataset.from_tensor_slices({"q": [f"{split} {i}?" for i in range(n)], "a": ["x"] * n})

        monkeypatch.setattr(tfds, "load", fake_load)
        tfds_names = user_files.register_tfds_task("toy", "toy_qa", {"question": "q", "answer": "a"}, data_dir="/tfds")
        assert tfds_names == ["toy_zs_noopt", "toy_fs_noopt"]
        fs = _take("toy_fs_noopt", "validation", LONG)
        assert [ex["inputs_pretokenized"].split("\n\n")[-1] for ex in fs] == ["validation 0?", "validation 1?"]
        assert all(ex["inputs_pretokenized"].count("train ") == 3 for ex in fs)
    finally:
        registry.remove_source("quiz")
        if tfds_names:
            registry.remove_source("toy")
    assert not {"quiz_zs_opt", "toy_fs_noopt"} & set(seqio.TaskRegistry.names())
