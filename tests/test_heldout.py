"""The Flan-T5 paper's held-out evaluation: MGSM-CoT, TyDiQA-Direct, GSM8K's exemplars and `flan_heldout`.

Tests marked `needs_data` read ../shared/data (FLAN_JAX_DATA_DIR). TyDiQA's
GoldP files are not there: tests write a small one in the published schema.
"""

from __future__ import annotations

import collections
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import tasks
from flan_jax import evaluation, suites
from flan_jax.errors import UserError
from tasks import gsm8k, heldout, mgsm, registry, sources, tydiqa

tasks.register()  # Every task module's tasks, registered with SeqIO (once per process).

DATA = Path(os.environ.get("FLAN_JAX_DATA_DIR", "/nonexistent"))
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"no data directory at {DATA}")
BIG = {"inputs": 8192, "targets": 64}  # Room for every exemplar.
# One word per GoldP language, in its script: questions, contexts and answers are built around it.
WORDS = {"arabic": "القاهرة", "bengali": "ঢাকা", "english": "London", "finnish": "Helsinki", "indonesian": "Jakarta",
         "korean": "서울", "russian": "Москва", "swahili": "Nairobi", "telugu": "హైదరాబాద్"}


def _goldp(languages, per_language: int, offset: int = 0) -> dict:
    """A GoldP file in the published schema: several paragraphs per language; odd ones have two gold answers."""
    articles = []
    for name in languages:
        word = WORDS[name]
        paragraphs = []
        for i in range(offset, offset + per_language):
            context = f"«{word} {i}» — città, Stadt, ciudad ({name} {i})."
            answers = [{"text": f"{word} {i}", "answer_start": 1}]
            if i % 2:
                answers.append({"text": word, "answer_start": 1})
            paragraphs.append({"context": context, "qas": [
                {"id": f"{name}-{1000 + i}-{i}", "question": f"Which city is {i}? ¿{word}?", "answers": answers}]})
        articles.append({"title": name, "paragraphs": paragraphs})
    return {"version": "TyDiQA-GoldP-1.1", "data": articles}


@pytest.fixture
def goldp_dir(tmp_path, monkeypatch):
    """A directory with a dev and a train GoldP file of every language, as $FLAN_JAX_TYDIQA_DIR."""
    directory = tmp_path / "tydiqa"
    directory.mkdir()
    (directory / tydiqa.FILES["dev"]).write_text(json.dumps(_goldp(WORDS, 4), ensure_ascii=False), encoding="utf-8")
    (directory / tydiqa.FILES["train"]).write_text(json.dumps(_goldp(WORDS, 2, offset=100)), encoding="utf-8")
    monkeypatch.setenv(tydiqa.DIR_ENV, str(directory))
    return directory


@pytest.fixture(scope="module")
def heldout_examples(tmp_path_factory):
    """flan_heldout's six suites and GSM8K, the first 3 examples of each task (TyDiQA from GoldP files
    written as `goldp_dir` writes them), loaded once for the tests that read them without changing them."""
    directory = tmp_path_factory.mktemp("heldout") / "tydiqa"
    directory.mkdir()
    (directory / tydiqa.FILES["dev"]).write_text(json.dumps(_goldp(WORDS, 4), ensure_ascii=False), encoding="utf-8")
    (directory / tydiqa.FILES["train"]).write_text(json.dumps(_goldp(WORDS, 2, offset=100)), encoding="utf-8")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv(tydiqa.DIR_ENV, str(directory))
        return suites.load_suites([registry.get_suite("flan_heldout"), registry.get_suite("gsm8k_cot")],
                                  {"inputs": 512, "targets": 64}, limit=3, log=lambda _: None)


# --- MGSM and GSM8K --------------------------------------------------------------------------


def test_final_number_reads_every_language_and_script():
    cases = {
        "5 + 6 = 11. The answer is 11.": "11",
        "So the answer is $1,234.50.": "1234.5",
        "74 - 35 = 39. Die Antwort lautet 39.": "39",
        "Ответ — 2,125.": "2125",
        "5+6=11。答えは１１です。": "11",  # Full-width digits, right after the phrase.
        "总共 12 个。答案是18。": "18",
        "৫ + ৬ = ১১। উত্তর হল ১১।": "11",  # Bengali digits.
        "ดังนั้น 5 + 6 = 11 คำตอบคือ 11": "11",
        "సమాధానం 9.బొమ్మలున్నాయి.": "9",
        "He had 20-12=8 left": "8",  # A minus between numbers is no sign.
        "It is -3 degrees.": "-3",
        "no number": "no number",
    }
    assert {text: mgsm.final_number(text) for text in cases} == cases


def test_mgsm_reads_numbers_as_each_language_writes_them():
    phrase = {lang: phrases[0] for lang, phrases in mgsm.ANSWER_PHRASES.items()}
    cases = [(lang, "70.000", "70000") for lang in ("de", "es")]
    cases += [(lang, f"1{space}500", "1500") for lang in ("fr", "ru") for space in (" ", "\u00a0", "\u202f")]
    cases += [(lang, "1,500", "1500") for lang in ("en", "zh", "ja", "th")]
    cases += [(lang, "2,5", "2.5") for lang in ("de", "fr", "es", "ru")]
    cases += [("de", "1.234.567,50", "1234567.5"), ("de", "1.5", "1.5"), ("es", "0.30", "0.3"),
              ("bn", "১,৫০,০০০", "150000"), ("te", "1,50,000", "150000"), ("en", "1\u00a0500", "1500"),
              ("en", "70.000", "70"), ("en", "2,5", "2")]  # English has no decimal comma.
    for lang, number, expected in cases:
        assert mgsm.final_number(f"{phrase[lang]} {number}.", lang=lang) == expected, (lang, number)
    # A model that goes on into a new question of its own (any language's prefix) is read up to it.
    stops = ("Question:", "Frage:", "問題：")
    assert mgsm.final_number("5 + 6 = 11. The answer is 11.\n\nQuestion: x? The answer is 7.", stops=stops) == "11"
    assert mgsm.final_number("Die Antwort ist 3.\n\n問題：x? 答えは7です。", lang="de", stops=stops) == "3"
    assert mgsm.final_number("Question: x? The answer is 7.", stops=stops) == ""


@needs_data
def test_mgsm_predictions_stop_at_any_languages_question_and_targets_read_as_written():
    assert mgsm.stop_prefixes(str(DATA / "mgsm")) == (
        "প্রশ্ন:", "Frage:", "Question:", "Pregunta:", "Question :", "問題：", "Задача:", "Swali:", "ప్రశ్న:", "โจทย์:",
        "问题：")
    de = registry.get_source("mgsm_de").postprocess_fn
    assert de("Die Antwort lautet 70.000.\n\nFrage: Und? Die Antwort lautet 5.") == "70000"
    assert de("Die Antwort lautet 70.000.\n\nQuestion : Et ? La réponse est 5.") == "70000"
    assert de("Die Antwort lautet 70.000.\n\n问题：多少？答案是 5。") == "70000"
    for lang in mgsm.LANGUAGES:  # The data files write every language's answers in English ("2,125").
        postprocess = registry.get_source(f"mgsm_{lang}").postprocess_fn
        answers = [row.split("\t")[1] for row in (DATA / "mgsm" / f"mgsm_{lang}.tsv").read_text("utf-8").splitlines()]
        assert len(answers) == 250 and "2,125" in answers, lang
        assert [postprocess(a, is_target=True) for a in answers] == [a.replace(",", "") for a in answers], lang


@needs_data
def test_every_published_exemplar_extracts_to_its_number_in_all_languages():
    literals = mgsm.read_literals((DATA / "mgsm" / "exemplars.py").read_bytes(), "exemplars.py")
    numbers = [str(n) for n in literals["EXEMPLAR_NUMBER_ANSWERS"]]
    table = literals["MGSM_EXEMPLARS"]
    assert sorted(table) == sorted(mgsm.LANGUAGES)
    for lang, shots in table.items():
        assert [mgsm.final_number(shots[str(k)]["a"], lang=lang) for k in range(1, 9)] == numbers, lang


@needs_data
def test_mgsm_prompt_is_the_published_exemplars_in_order_then_the_query():
    table = mgsm.read_literals((DATA / "mgsm" / "exemplars.py").read_bytes(), "x")["MGSM_EXEMPLARS"]
    for lang in ("en", "zh", "de"):
        shots = [table[lang][str(k)] for k in range(1, 9)]
        question, answer = (DATA / "mgsm" / f"mgsm_{lang}.tsv").read_text("utf-8").split("\n")[0].split("\t")
        q_label = re.match(r"[^:：]*[:：] ?", shots[0]["q"]).group(0)
        a_label = re.match(r"[^:：]*[:：]", shots[0]["a"]).group(0)
        expected = "\n\n".join(f"{s['q']}\n{s['a']}" for s in shots) + f"\n\n{q_label}{question}\n{a_label}"
        (example,) = evaluation.load_task_examples(f"mgsm_{lang}", "test", BIG, 1).features
        assert example["inputs_pretokenized"].decode() == expected, lang
        assert example["targets_pretokenized"].decode() == answer


@needs_data
def test_gsm8k_prompt_is_the_shared_exemplars_in_order_then_the_query():
    shots = [json.loads(line) for line in (DATA / "gsm8k" / "cot_exemplars.jsonl").read_text("utf-8").splitlines()]
    first_question = json.loads((DATA / "gsm8k" / "test.jsonl").read_text().split("\n")[0])["question"]
    (example,) = evaluation.load_task_examples("gsm8k_cot", "test", BIG, 1).features
    expected = "\n\n".join(f"Q: {s['question']}\nA: {s['rationale']} The answer is {s['answer']}." for s in shots)
    assert len(shots) == 8 and shots[0]["question"].startswith("There are 15 trees in the grove.")
    assert example["inputs_pretokenized"].decode() == expected + f"\n\nQ: {first_question}\nA:"
    postprocess = registry.get_source("gsm8k_cot").postprocess_fn
    assert postprocess("3 + 4 = 7. The answer is 7.\n\nQ: Then? A: The answer is 9.") == "7"


def test_gsm8k_bad_or_missing_exemplars_file_is_one_line_naming_it(tmp_path):
    from tasks import gsm8k

    good = json.dumps({"question": "Q?", "rationale": "R.", "answer": "6"})
    no_rationale = json.dumps({"question": "Q?", "answer": "6"})
    for lines, where in (([good, "{not json"], ":2:"), ([good, "", no_rationale], ":3:"),
                         ([json.dumps(["a list"])], ":1:"), (None, "not found")):
        path = tmp_path / gsm8k.EXEMPLARS_FILE
        path.unlink(missing_ok=True)
        if lines is not None:
            path.write_text("\n".join(lines))
        with pytest.raises(UserError) as error:
            gsm8k.read_exemplars(str(tmp_path))
        assert str(path) in str(error.value) and where in str(error.value) and "\n" not in str(error.value), lines
    path.write_text(good)
    assert gsm8k.read_exemplars(str(tmp_path)) == [{"question": "Q?", "answer": "R. The answer is 6.", "rationale": ""}]


@needs_data
def test_gold_targets_score_100_and_a_constant_answer_its_frequency(heldout_examples, fake_generate):
    for suite in ("mgsm_cot", "tydiqa_direct", "gsm8k_cot"):
        spec = registry.get_suite(suite)
        examples = heldout_examples.examples[suite]  # the first 3 of each task, at 512 input tokens
        assert [task.name for task in examples] == list(spec.tasks), suite
        assert all(task.features for task in examples), suite
        gold, _ = fake_generate(examples, lambda task, i: task.texts("targets")[i])
        assert all(r.metrics[spec.metric] == 100.0 for r in gold.values()), (suite, gold)
        for task in examples:
            targets = [task.task.postprocess_fn(t, example=ex, is_target=True)
                       for t, ex in zip(task.texts("targets"), task.features)]
            if suite == "tydiqa_direct":  # The second gold answer of odd paragraphs: half of them.
                constant = targets[1][-1]
                expected = sum(constant in golds for golds in targets)
                phrased = constant
            else:
                constant, expected = collections.Counter(targets).most_common(1)[0]
                phrased = f"Let me think. The answer is {constant}."
            result = fake_generate([task], lambda t, i: phrased)[0][task.name]
            assert result.metrics[spec.metric] == pytest.approx(100.0 * expected / len(targets)), task.name
            assert 0 < expected < len(targets) or suite != "tydiqa_direct"


def test_malformed_exemplars_file_is_one_line_naming_it(tmp_path):
    for text in ("MGSM_EXEMPLARS = {'en': {'1': {'q': 'Question: x', 'a': 'Answer: 1'}}", "MGSM_EXEMPLARS = open('x')",
                 "MGSM_EXEMPLARS = {'en': {'1': {'q': 'no label', 'a': 'Answer: 1'}}}", "OTHER = 1"):
        path = tmp_path / "exemplars.py"
        path.write_text(text)
        with pytest.raises(UserError) as error:
            mgsm.read_exemplars("mgsm_en", str(tmp_path))
        assert str(path) in str(error.value) and "\n" not in str(error.value), text


# --- TyDiQA ----------------------------------------------------------------------------------


def test_tydiqa_prompt_is_one_train_exemplar_then_the_query_and_scores_all_gold_answers(goldp_dir, fake_generate):
    task = evaluation.load_task_examples("tydiqa_fi", "validation", BIG, None)
    assert len(task.features) == 4
    exemplar = _goldp(["finnish"], 1, offset=100)["data"][0]["paragraphs"][0]
    query = _goldp(["finnish"], 4)["data"][0]["paragraphs"][1]
    expected = (f"{exemplar['context']}\n\nQ: {exemplar['qas'][0]['question']}\nA: Helsinki 100\n\n"
                f"{query['context']}\n\nQ: {query['qas'][0]['question']}\nA:")
    assert task.texts("inputs")[1] == expected
    golds = task.task.postprocess_fn(task.texts("targets")[1], example=task.features[1], is_target=True)
    assert golds == ["Helsinki 1", "Helsinki"]
    result = fake_generate([task], lambda t, i: "the Helsinki")[0]["tydiqa_fi"]  # SQuAD drops the article.
    assert result.metrics["em"] == 50.0 and 50.0 < result.metrics["f1"] < 100.0


def test_tydiqa_with_only_the_dev_file_uses_its_first_example_and_says_so(goldp_dir, monkeypatch):
    os.remove(goldp_dir / tydiqa.FILES["train"])
    os.rename(goldp_dir, str(goldp_dir) + "_dev_only")  # A new location: read again.
    monkeypatch.setenv(tydiqa.DIR_ENV, str(goldp_dir) + "_dev_only")
    task = evaluation.load_task_examples("tydiqa_ko", "validation", BIG, None)
    assert len(task.features) == 3  # The first of 4 is the exemplar, not scored.
    assert all(text.startswith("«서울 0»") for text in task.texts("inputs"))
    assert "not scored" in tydiqa.notes()["exemplars"]


def test_tydiqa_missing_or_malformed_files_are_one_line_naming_them(tmp_path, monkeypatch):
    monkeypatch.setenv(tydiqa.DIR_ENV, str(tmp_path))
    with pytest.raises(UserError) as error:
        registry.get_source("tydiqa_fi").load()
    message = str(error.value)
    assert "\n" not in message and tydiqa.FILES["dev"] in message and tydiqa.DOWNLOAD_AT in message
    assert tydiqa.DIR_ENV in message
    for i, content in enumerate(("{not json", json.dumps({"data": [{"title": "x"}]}), json.dumps([1]))):
        directory = tmp_path / f"bad{i}"
        directory.mkdir()
        (directory / tydiqa.FILES["dev"]).write_text(content)
        monkeypatch.setenv(tydiqa.DIR_ENV, str(directory))
        with pytest.raises(UserError) as error:
            registry.get_source("tydiqa_fi").load()
        assert str(directory / tydiqa.FILES["dev"]) in str(error.value) and "\n" not in str(error.value)


def test_tydiqa_bad_questions_are_skipped_and_counted(tmp_path, monkeypatch):
    data = _goldp(["finnish", "korean"], 2)
    data["data"][0]["paragraphs"][0]["qas"][0]["answers"] = []
    data["data"][1]["paragraphs"][0]["qas"][0]["id"] = "klingon-1"
    (tmp_path / tydiqa.FILES["dev"]).write_text(json.dumps(data))
    (tmp_path / tydiqa.FILES["train"]).write_text(json.dumps(_goldp(["finnish"], 1, offset=100)))
    monkeypatch.setenv(tydiqa.DIR_ENV, str(tmp_path))
    assert len(registry.get_source("tydiqa_fi").load()["validation"]) == 1
    stats = sources.stats("tydiqa")
    assert stats.skipped == 2 and any("klingon" in p for p in stats.problems)


# --- the composite suite -------------------------------------------------------------------


def test_flan_heldout_is_the_six_with_mmlu_on_validation_and_suites_run_once():
    composite = registry.get_suite("flan_heldout")
    members = composite.members()
    assert [s.name for s in members] == list(heldout.MEMBERS)
    assert {s.name: s.split for s in members}["mmlu_direct"] == "validation"
    assert {s.split for s in registry.get_suite("flan_heldout_mmlu_test").members() if "mmlu" in s.name} == {"test"}
    flat, composites = suites.expand_suites([composite, registry.get_suite("bbh_cot")])
    assert [s.name for s in flat] == list(heldout.MEMBERS) and composites == {"flan_heldout": list(heldout.MEMBERS)}
    with pytest.raises(UserError, match="mmlu_direct.*two splits"):
        suites.expand_suites([composite, registry.get_suite("mmlu_direct")])
    with pytest.raises(UserError, match="unknown suite 'flan_nope'"):
        registry.get_suite("flan_nope")


@needs_data
def test_flan_heldout_end_to_end_on_a_tiny_random_model(tmp_path, goldp_dir, capsys, tiny_run):
    from flan_jax import cli

    run = tiny_run(tmp_path / "run", 5)
    output = tmp_path / "heldout.json"
    cli.main(["eval", f"--checkpoint={run}", "--suite=flan_heldout,gsm8k_cot", "--limit=2", "--input_length=256",
              "--target_length=4", f"--output={output}"])
    printed = capsys.readouterr().out
    results = json.loads(output.read_text())
    composite = results["composites"]["flan_heldout"]
    assert composite["suites"] == list(heldout.MEMBERS) and set(composite["scores"]) == set(heldout.MEMBERS)
    normalized = [results["suites"][name]["normalized"] for name in heldout.MEMBERS]
    assert composite["normalized_average"] == pytest.approx(np.mean(normalized))
    assert results["normalized_average"] == composite["normalized_average"]  # GSM8K is an extra, not averaged.
    assert results["extras"] == ["gsm8k_cot"] and "gsm8k_cot" in results["suites"]
    assert results["suites"]["mmlu_direct"]["split"] == "validation"
    assert results["suites"]["bbh_cot"]["num_tasks"] == 27
    for suite, languages, scored in (("mgsm_cot", mgsm.LANGUAGES, mgsm.TRANSLATED),
                                     ("tydiqa_direct", sorted(tydiqa.LANGUAGES.values()), tydiqa.PAPER_LANGUAGES)):
        report = results["suites"][suite]
        prefix = suite.split("_")[0]
        assert set(report["tasks"]) == {f"{prefix}_{lang}" for lang in languages}
        assert report["scored_tasks"] == [f"{prefix}_{lang}" for lang in scored]
        assert set(report["averages"]) == {"all_languages", "en"}
        assert all(row["num_examples"] == 2 for row in report["tasks"].values())
        assert report["score"] == pytest.approx(np.mean([report["tasks"][t]["score"] for t in report["scored_tasks"]]))
    assert set(results["suites"]["tydiqa_direct"]["metrics"]) == {"em", "f1"}
    assert "exemplars" in results["suites"]["tydiqa_direct"]["notes"]
    assert "flan_heldout normalized average" in printed and "mgsm_te" in printed and "gsm8k_cot (extra)" in printed

    other = dict(results, composites={"flan_heldout": dict(composite, normalized_average=12.5)})
    (tmp_path / "other.json").write_text(json.dumps(other))
    cli.main(["eval", "--compare", str(output), str(tmp_path / "other.json")])
    table = capsys.readouterr().out
    assert "mmlu_direct [validation]" in table and "flan_heldout normalized avg" in table and "12.50" in table


# --- predictions made elsewhere: --export_prompts, then --predictions ---------------------------


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@needs_data
def test_exported_prompts_answered_with_their_gold_targets_score_100_and_a_constant_its_frequency(
        tmp_path, heldout_examples):
    from flan_jax import suite_files

    loaded = heldout_examples  # flan_heldout and gsm8k_cot, the first 3 examples of each task
    assert loaded.limit == 3
    exported = tmp_path / "prompts.jsonl"
    count = suite_files.export_prompts(loaded, str(exported))
    records = [json.loads(line) for line in exported.read_text("utf-8").splitlines()]
    assert count == len(records) == sum(len(t.features) for ex in loaded.examples.values() for t in ex)
    assert {r["suite"] for r in records} == set(heldout.MEMBERS) | {"gsm8k_cot"}
    first = loaded.examples["bbh_cot"][0]
    (record,) = [r for r in records if r["task"] == first.name and r["index"] == 0]
    assert record["inputs"] == first.texts("inputs")[0] and record["target"] == first.texts("targets")[0]
    assert record["stops"] == ["Q:"]
    assert next(r for r in records if r["suite"] == "mmlu_direct")["options"] == ["A", "B", "C", "D"]

    gold = _write_jsonl(tmp_path / "gold.jsonl", [{"task": r["task"], "index": r["index"], "prediction": r["target"]}
                                                   for r in reversed(records)])
    results = suites.score_predictions(loaded, suite_files.read_predictions(str(gold), loaded))
    assert {name: report["score"] for name, report in results["suites"].items()} == dict.fromkeys(results["suites"],
                                                                                                   100.0)
    assert results["normalized_average"] == 100.0

    # One answer for every example of a task scores the share of examples it answers right.
    constant = {}
    for examples in loaded.examples.values():
        for task in examples:
            if task.name.startswith("tydiqa"):  # a list of gold answers each: checked in its own test
                continue
            targets = [task.task.postprocess_fn(t, example=ex, is_target=True)
                       for t, ex in zip(task.texts("targets"), task.features)]
            answer, hits = collections.Counter(targets).most_common(1)[0]
            raw = task.texts("targets")[targets.index(answer)]
            constant[task.name] = (raw, 100.0 * hits / len(targets))
    answers = _write_jsonl(tmp_path / "constant.jsonl", [
        {"task": r["task"], "index": r["index"], "prediction": constant.get(r["task"], ("x",))[0]} for r in records])
    results = suites.score_predictions(loaded, suite_files.read_predictions(str(answers), loaded))
    for report in results["suites"].values():
        for task, row in report["tasks"].items():
            if task in constant:
                assert row["score"] == pytest.approx(constant[task][1]), task

    # A missing, a second or an unknown row is one line naming the file (and line).
    gold_lines = gold.read_text("utf-8").splitlines()
    for name, lines, expected in (
        ("missing", gold_lines[1:], "no prediction for"),
        ("twice", gold_lines + gold_lines[:1], f":{len(gold_lines) + 1}: a second prediction"),
        ("unknown", gold_lines + [json.dumps({"task": "nope", "index": 0, "prediction": "1"})],
         f":{len(gold_lines) + 1}: unknown task 'nope'"),
        ("out_of_range", gold_lines + [json.dumps({"task": "gsm8k_cot", "index": 3, "prediction": "1"})],
         "gsm8k_cot has no example 3"),
        ("not_json", gold_lines[:2] + ["{oops"], ":3: not JSON"),
    ):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        with pytest.raises(UserError) as error:
            suite_files.read_predictions(str(path), loaded)
        assert str(path) in str(error.value) and expected in str(error.value), (name, error.value)
        assert "\n" not in str(error.value)


@needs_data
def test_eval_export_prompts_then_predictions_on_the_command_line(tmp_path, capsys):
    from flan_jax import cli

    prompts, output = tmp_path / "gsm8k_prompts.jsonl", tmp_path / "scored.json"
    cli.main(["eval", "--suite=gsm8k_cot", "--limit=4", f"--export_prompts={prompts}"])
    records = [json.loads(line) for line in prompts.read_text("utf-8").splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3] and "4 prompts" in capsys.readouterr().out
    predictions = _write_jsonl(tmp_path / "answers.jsonl", [
        {"task": r["task"], "index": r["index"],
         "prediction": f"Let's see. The answer is {gsm8k.final_number(r['target'])}. Q: And 2 + 2? A: The answer is 5."}
        for r in records])
    cli.main(["eval", "--suite=gsm8k_cot", "--limit=4", f"--predictions={predictions}", f"--output={output}"])
    printed = capsys.readouterr().out
    results = json.loads(output.read_text())
    assert results["suites"]["gsm8k_cot"]["score"] == 100.0  # read before the invented "Q:"
    assert "gsm8k_cot" in printed and "normalized average" in printed
    with pytest.raises(SystemExit) as exit_info:  # the other suites' rows are not in the file
        cli.main(["eval", "--suite=gsm8k_cot,mgsm_cot", "--limit=4", f"--predictions={predictions}"])
    assert "no prediction for mgsm_" in str(exit_info.value)
