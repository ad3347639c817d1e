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

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tasks
from flan_jax import evaluation, formats, suites
from flan_jax.errors import UserError
from flan_jax.model import T5Config, Transformer
from tasks import heldout, mgsm, registry, sources, tydiqa, vocab

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


def _fake_generate(examples, answer_of) -> dict[str, evaluation.TaskResult]:
    """Evaluates with a fake model that 'generates' `answer_of(task, example index)`."""
    answers = {}
    for task in examples:
        for i, ex in enumerate(task.features):
            answers[ex["inputs"].tobytes()] = task.vocabulary.encode(answer_of(task, i)) + [1]

    def decode(inputs: np.ndarray, max_decode_length: int) -> np.ndarray:
        rows = [answers[row[row > 0].tobytes()] for row in inputs if row.any()]
        out = np.zeros((len(inputs), max(len(r) for r in rows)), np.int32)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    return evaluation.evaluate_tasks(examples, evaluation.ModelFns(decode, score=None), show_progress=False)


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


@needs_data
def test_every_published_exemplar_extracts_to_its_number_in_all_languages():
    literals = mgsm.read_literals((DATA / "mgsm" / "exemplars.py").read_bytes(), "exemplars.py")
    numbers = [str(n) for n in literals["EXEMPLAR_NUMBER_ANSWERS"]]
    table = literals["MGSM_EXEMPLARS"]
    assert sorted(table) == sorted(mgsm.LANGUAGES)
    for lang, shots in table.items():
        assert [mgsm.final_number(shots[str(k)]["a"]) for k in range(1, 9)] == numbers, lang


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
def test_gsm8k_uses_wei_et_al_exemplars_not_training_rows():
    table = mgsm.read_literals((DATA / "mgsm" / "exemplars.py").read_bytes(), "x")["MGSM_EXEMPLARS"]["en"]
    first_question = json.loads((DATA / "gsm8k" / "test.jsonl").read_text().split("\n")[0])["question"]
    (example,) = evaluation.load_task_examples("gsm8k_cot", "test", BIG, 1).features
    shots = [(table[str(k)]["q"].removeprefix("Question: "), table[str(k)]["a"].removeprefix("Step-by-Step Answer: "))
             for k in range(1, 9)]
    expected = "\n\n".join(f"Q: {q}\nA: {a}" for q, a in shots) + f"\n\nQ: {first_question}\nA:"
    assert example["inputs_pretokenized"].decode() == expected


@needs_data
def test_gold_targets_score_100_and_a_constant_answer_its_frequency(goldp_dir):
    for suite in ("mgsm_cot", "tydiqa_direct", "gsm8k_cot"):
        spec = registry.get_suite(suite)
        examples = [evaluation.load_task_examples(t, spec.split, {"inputs": 1024, "targets": 64}, 6)
                    for t in spec.tasks]
        assert all(task.features for task in examples), suite
        gold = _fake_generate(examples, lambda task, i: task.texts("targets")[i])
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
            result = _fake_generate([task], lambda t, i: phrased)[task.name]
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
        mgsm._EXEMPLARS_CACHE.clear()


# --- TyDiQA ----------------------------------------------------------------------------------


def test_tydiqa_prompt_is_one_train_exemplar_then_the_query_and_scores_all_gold_answers(goldp_dir):
    task = evaluation.load_task_examples("tydiqa_fi", "validation", BIG, None)
    assert len(task.features) == 4
    exemplar = _goldp(["finnish"], 1, offset=100)["data"][0]["paragraphs"][0]
    query = _goldp(["finnish"], 4)["data"][0]["paragraphs"][1]
    expected = (f"{exemplar['context']}\n\nQ: {exemplar['qas'][0]['question']}\nA: Helsinki 100\n\n"
                f"{query['context']}\n\nQ: {query['qas'][0]['question']}\nA:")
    assert task.texts("inputs")[1] == expected
    golds = task.task.postprocess_fn(task.texts("targets")[1], example=task.features[1], is_target=True)
    assert golds == ["Helsinki 1", "Helsinki"]
    result = _fake_generate([task], lambda t, i: "the Helsinki")["tydiqa_fi"]  # SQuAD drops the article.
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


def _tiny_model(vocab_size: int) -> tuple[Transformer, dict]:
    config = T5Config(vocab_size=vocab_size, emb_dim=32, num_heads=2, head_dim=16, num_encoder_layers=2,
                      num_decoder_layers=2, mlp_dim=64, dropout_rate=0.0)
    module = Transformer(config)
    tokens = jnp.ones((1, 8), jnp.int32)
    params = module.init(jax.random.key(1), tokens, tokens, tokens, enable_dropout=False)["params"]
    return module, params


@needs_data
def test_flan_heldout_end_to_end_on_a_tiny_random_model(tmp_path, goldp_dir, capsys):
    from flan_jax import cli

    module, params = _tiny_model(vocab.get_default_vocabulary().vocab_size)
    run = formats.save_flan_jax(str(tmp_path / "run"), module.config, params, vocab.default_vocabulary_path(), 5)
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
