"""Held-out evaluation: answer extraction, scoring, rank classification, suites and `flan-jax eval --suite`.

Tests marked `needs_data` read ../shared/data (FLAN_JAX_DATA_DIR).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tasks
from flan_jax import batching, evaluation, inference, suites, training_eval
from flan_jax.model import T5Config, Transformer
from flan_jax.suite_results import format_results
from tasks import bbh, gsm8k, mmlu, registry, vocab

tasks.register()  # Every task module's tasks, registered with SeqIO (once per process).

DATA = Path(os.environ.get("FLAN_JAX_DATA_DIR", "/nonexistent"))
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"no data directory at {DATA}")
LENGTHS = {"inputs": 2048, "targets": 512}  # Room for every prompt of the built-in vocabulary's slices.
SUITES = ("bbh_direct", "bbh_cot", "mmlu_direct", "mmlu_cot", "gsm8k_cot")


def _suite_examples(limit: int, lengths=LENGTHS) -> dict[str, list[evaluation.TaskExamples]]:
    return {
        name: [evaluation.load_task_examples(t, "test", lengths, limit) for t in registry.get_suite(name).tasks]
        for name in SUITES
    }


@needs_data
def test_gold_targets_score_100_and_a_constant_answer_its_frequency(fake_generate):
    for suite, examples in _suite_examples(limit=12).items():
        gold, _ = fake_generate(examples, lambda task, i: task.texts("targets")[i], max_decode_length=512)
        assert all(r.metrics["accuracy"] == 100.0 for r in gold.values()), (suite, gold)

        for task in examples:
            postprocess = task.task.postprocess_fn
            answers = [postprocess(t, is_target=True) for t in task.texts("targets")]
            constant, count = collections.Counter(answers).most_common(1)[0]
            phrased = f"Let's think it over. So the answer is {constant}." if "cot" in suite else constant
            result = fake_generate([task], lambda t, i: phrased, max_decode_length=512)[0][task.name]
            assert result.metrics["accuracy"] == pytest.approx(100.0 * count / len(answers)), (task.name, constant)


@needs_data
def test_bbh_cot_exemplars_extract_to_their_published_answers():
    for name in bbh.TASKS:
        text = (DATA / "bbh" / "cot-prompts" / f"{name}.txt").read_text()
        _, exemplars, _ = bbh.parse_prompt(text)
        targets = {ex["target"] for ex in json.loads((DATA / "bbh" / "bbh" / f"{name}.json").read_text())["examples"]}
        # The exemplar's reply as the file writes it, from "Let's think step by step." to the period.
        reply_start = text.index("A: Let's think step by step.")
        assert exemplars and text[reply_start:].count("So the answer is") >= len(exemplars)
        for exemplar in exemplars:
            reply = f"Let's think step by step. {exemplar['rationale']} So the answer is {exemplar['answer']}."
            assert registry.postprocess(reply) == exemplar["answer"], name
            if len(targets) <= 20:  # A closed set of answers: the exemplars answer in the same phrasing.
                assert exemplar["answer"] in targets, (name, exemplar["answer"])


@needs_data
def test_rendered_bbh_cot_prompt_is_the_file_then_the_query():
    for name in ("date_understanding", "sports_understanding", "word_sorting"):
        file_text = (DATA / "bbh" / "cot-prompts" / f"{name}.txt").read_text()
        query = json.loads((DATA / "bbh" / "bbh" / f"{name}.json").read_text())["examples"][0]["input"]
        (example,) = evaluation.load_task_examples(f"bbh_{name}_cot", "test", LENGTHS, 1).features
        expected = file_text.split("\n", 2)[2].strip() + f"\n\nQ: {query}\nA: Let's think step by step."
        assert example["inputs_pretokenized"] == expected.encode()


@needs_data
def test_rendered_mmlu_cot_prompt_is_the_published_prompt_then_the_query():
    prompts = json.loads((DATA / "mmlu" / "mmlu-cot.json").read_text())
    for subject in ("abstract_algebra", "high_school_us_history", "college_chemistry"):
        row = next(iter(mmlu.sources.parse_file((DATA / "mmlu" / "test" / f"{subject}_test.csv").read_bytes(),
                                                 "test.csv", "csv", mmlu.parse_row, mmlu.sources.SourceStats("t"))))
        choices = " ".join(f"({letter}) {choice}" for letter, choice in zip(mmlu.LETTERS, row["choices"]))
        query = f"Q: {row['stem']}\n{choices}\nA: Let's think step by step."
        (example,) = evaluation.load_task_examples(f"mmlu_{subject}_cot", "test", {"inputs": 8192, "targets": 64},
                                                   1).features
        assert example["inputs_pretokenized"].decode() == prompts[subject].strip() + "\n\n" + query
        assert example["targets_pretokenized"].decode() == f"The answer is ({row['answer']})."


@needs_data
def test_mmlu_cot_prompt_too_long_drops_exemplars_whole_and_keeps_the_query():
    """At a short input length whole exemplars go from the end; the query is never cut unless alone too long."""
    task = evaluation.load_task_examples("mmlu_abstract_algebra_cot", "test", {"inputs": 512, "targets": 64}, 30)
    prompt = json.loads((DATA / "mmlu" / "mmlu-cot.json").read_text())["abstract_algebra"].strip()
    _, exemplars = mmlu.parse_cot_prompt(prompt)
    inputs = task.texts("inputs")
    assert len(set(inputs)) == len(inputs)  # Different questions stay different inputs.
    for text in inputs:
        assert text.endswith("\nA: Let's think step by step.")
        shots = text.count("\nA: Let's think step by step. ")
        assert shots < len(exemplars)  # 512 tokens cannot hold all five.
        # The exemplars kept are the first ones, whole.
        assert all(f"Q: {e['question']}\nA: Let's think step by step. {e['rationale']}" in text
                   for e in exemplars[:shots])
    assert task.over_length == len(inputs)
    assert task.truncated == sum(len(task.vocabulary.encode(t)) + 1 > 512 for t in inputs)


def test_mmlu_cot_prompt_parse_errors_name_the_place():
    with pytest.raises(mmlu.sources.MalformedRow, match="prompt.json"):
        mmlu.parse_cot_prompt("Header.\n\nQ: 1+1?\nA: Let's think step by step. Two.", "prompt.json")
    header, (exemplar,) = mmlu.parse_cot_prompt(
        "\nHeader.\n\nQ: 1+1?\n(A) 2 (B) 3\nA: Let's think step by step. One and one.  The answer is (A).")
    assert header == "Header." and exemplar == {"question": "1+1?\n(A) 2 (B) 3", "rationale": "One and one. ",
                                                "answer": "(A)"}


def test_answer_extraction_and_chance():
    assert gsm8k.final_number("So the answer is $1,234.50.") == "1234.5"
    assert gsm8k.final_number("He pays 3 + 4 = 7 dollars. The answer is 7 dollars.") == "7"
    assert gsm8k.final_number("Total: 12 apples and 30 pears, 42.") == "42"
    assert gsm8k.final_number("So the answer is -3.") == "-3"
    assert gsm8k.final_number("no idea") == "no idea"
    row = {"question": "Q?", "answer": "It is 2*3=<<2*3=6>>6.\nSo 6+1=<<6+1=7>>7\n#### 1,007"}
    assert gsm8k.parse_row(row) == {"question": "Q?", "answer": "1007", "rationale": "It is 2*3=6. So 6+1=7"}
    assert [mmlu.answer_letter(x) for x in ("B", "(C)", "D. 42", "So the answer is (A).", "The answer is B", "x")] == [
        "B", "C", "D", "A", "B", "x"]
    options = "Options:\n(A) red\n(B) blue\n(C) green"
    prompt = f"Q: old\n{options}\n(D) extra\nA: (A)\n\nQ: new\n{options}\nA:"
    assert bbh.chance(prompt, "(B)") == pytest.approx(1 / 3)
    assert bbh.chance("Q: x\nA:", "So the answer is valid.") == 0.5
    assert bbh.chance("Q: 2 + 2 =\nA:", "4") == 0.0
    assert suites.normalize(50.0, 25.0) == pytest.approx(100 / 3)


def _hf_twin() -> tuple[T5Config, object, dict]:
    """A tiny random transformers T5 (default vocabulary) and the same weights as flan-jax params."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from flan_jax.formats import hf

    config = T5Config(vocab_size=vocab.get_default_vocabulary().vocab_size, emb_dim=32, num_heads=2, head_dim=16,
                      num_encoder_layers=2, num_decoder_layers=2, mlp_dim=64, dropout_rate=0.0)
    torch.manual_seed(0)
    hf_model = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**{**hf.config_to_hf(config), "architectures": None})).eval()
    # transformers 5.x ties lm_head to `shared` even with tie_word_embeddings=False.
    hf_model.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.emb_dim) * 0.5)
    params = hf.params_from_hf_state_dict({k: v.numpy() for k, v in hf_model.state_dict().items()}, config)
    return config, hf_model, params


@needs_data
def test_rank_classification_picks_the_option_transformers_scores_highest():
    torch = pytest.importorskip("torch")
    config, hf_model, params = _hf_twin()

    lengths = {"inputs": 512, "targets": 8}
    examples = [evaluation.load_task_examples(f"mmlu_{s}", "test", lengths, 6)
                for s in ("anatomy", "virology", "marketing")]
    fns = inference.ModelRunner(Transformer(config)).fns(params)
    results = evaluation.evaluate_tasks(examples, fns, method="rank", target_length=8, show_progress=False)
    chosen, rows, expected_loglik = [], [], []
    for task in examples:
        assert results[task.name].method == "rank"
        for i, ex in enumerate(task.features):
            options = task.options(i)
            assert options == list(mmlu.LETTERS)
            targets = [task.vocabulary.encode(o) + [1] for o in options]
            padded = np.array([t + [0] * (max(map(len, targets)) - len(t)) for t in targets], np.int64)
            with torch.no_grad():
                logits = hf_model(input_ids=torch.tensor(ex["inputs"][None].astype(np.int64)).repeat(4, 1),
                                  decoder_input_ids=torch.tensor(np.pad(padded[:, :-1], ((0, 0), (1, 0))))).logits
            token_loglik = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(padded)[..., None])[..., 0]
            loglik = (token_loglik * torch.tensor(padded > 0)).sum(1)
            rows += [(ex["inputs"], target) for target in padded]
            expected_loglik += loglik.tolist()
            chosen.append(options[int(np.argmax(loglik.numpy()))])
    # Ours, every (example, option) row in one call (one compilation, not one per prompt length):
    # prompts and targets zero-padded, which the score masks.
    ours = fns.score(batching.pad_rows([i for i, _ in rows], len(rows), lengths["inputs"]),
                     batching.pad_rows([t.astype(np.int32) for _, t in rows], len(rows), lengths["targets"]))
    np.testing.assert_allclose(ours, expected_loglik, rtol=1e-4, atol=1e-4)
    answers = [mmlu.answer_letter(t) for task in examples for t in task.texts("targets")]
    expected = 100.0 * np.mean([c == a for c, a in zip(chosen, answers)])
    assert np.mean([r.metrics["accuracy"] for r in results.values()]) == pytest.approx(expected)


@needs_data
def test_training_evaluation_ranks_multiple_choice_tasks_and_generates_the_rest(flan_cot_data):
    ranked, generated = "flan_cot_qasc_zs_opt", "flan_cot_qasc_zs_cot"
    registry.add_mixture("test_rank_mixture", [(ranked, 1.0), (generated, 1.0)])
    tasks.register(again=True)
    evaluator = training_eval.Evaluator(
        evaluation.EvalConfig("test_rank_mixture", num_examples=5, batch_size=4, method="rank"),
        {"inputs": 256, "targets": 64},
    )
    (task,) = [t for t in evaluator.examples if t.name == ranked]
    gold = {(ex["inputs"].tobytes(), tuple(task.vocabulary.encode(t) + [1]))
            for ex, t in zip(task.features, task.texts("targets"))}

    def score(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:  # The gold option scores highest.
        return np.array([0.0 if (i[i > 0].tobytes(), tuple(t[t > 0])) in gold else -1.0 for i, t in zip(inputs, targets)])

    def decode(inputs: np.ndarray, max_decode_length: int):
        yield np.ones((len(inputs), 2), np.int32)  # An empty answer.

    metrics = evaluator.evaluate(evaluation.ModelFns(decode, score), step=0)
    assert metrics[f"eval/{ranked}/accuracy"] == 100.0
    assert metrics[f"eval/{generated}/accuracy"] == 0.0
    assert metrics["eval/average_accuracy"] == 50.0


@needs_data
def test_padded_lengths_step_a_quarter_octave_and_never_cut():
    padded = {n: batching.bucket(n, 2048) for n in range(1, 2049)}
    assert all(n <= p < n + max(16, n / 4) and p % 16 == 0 for n, p in padded.items())
    assert sorted(set(p for n, p in padded.items() if n > 1024)) == [1280, 1536, 1792, 2048]
    assert len(set(padded.values())) == 8 + 4 * 4  # 16..128 in steps of 16, then four per octave
    assert batching.bucket(1100, 1024) == 1024  # the cap; the rows were cut to it already


def test_over_length_prompts_are_counted_not_hidden():
    whole = evaluation.load_task_examples("bbh_date_understanding_cot", "test", LENGTHS, 4)
    assert whole.over_length == whole.truncated == 0
    short = evaluation.load_task_examples("bbh_date_understanding_cot", "test", {"inputs": 400, "targets": 64}, 4)
    assert short.over_length == 4  # Three exemplars do not fit in 400 tokens...
    assert all(len(ex["inputs"]) <= 400 for ex in short.features)  # ...so some were dropped.
    assert all(ex["prompt_tokens"] > 400 for ex in short.features)
    tiny = evaluation.load_task_examples("bbh_date_understanding_cot", "test", {"inputs": 32, "targets": 64}, 4)
    assert tiny.truncated == 4  # Even the query alone is cut.


@needs_data
def test_eval_suites_end_to_end_on_a_tiny_random_model(tmp_path, capsys, tiny_run):
    from flan_jax import cli

    run = tiny_run(tmp_path / "run", 3)
    output = tmp_path / "results.json"
    cli.main(["eval", f"--checkpoint={run}", f"--suite={','.join(SUITES)}", "--limit=2", "--input_length=256",
              "--target_length=4", "--method=rank", f"--output={output}"])
    printed = capsys.readouterr().out
    results = json.loads(output.read_text())
    assert results["step"] == 3 and results["format"] == "flan_jax"
    for name in SUITES:
        report = results["suites"][name]
        assert report["num_tasks"] == len(registry.get_suite(name).tasks)
        assert all(row["num_examples"] == 2 for row in report["tasks"].values())
        assert report["num_examples"] == 2 * report["num_tasks"]
        assert 0.0 <= report["score"] <= 100.0 and report["over_length"] > 0
        assert report["methods"] == (["rank"] if name == "mmlu_direct" else ["generate"]), name
        assert name in printed
    assert results["suites"]["mmlu_direct"]["chance"] == 25.0
    assert set(results["suites"]["mmlu_cot"]["categories"]) == {"STEM", "humanities", "social sciences", "other"}
    assert 0.0 < results["suites"]["bbh_direct"]["chance"] < 50.0
    normalized = [r["normalized"] for r in results["suites"].values()]
    assert results["normalized_average"] == pytest.approx(np.mean(normalized))
    assert list(Path(str(output)[: -len(".json")] + "_tb").iterdir()), "no TensorBoard event files"
    assert "normalized average" in printed and "over-length" in printed

    other = dict(results, normalized_average=12.5)
    (tmp_path / "other.json").write_text(json.dumps(other))
    cli.main(["eval", "--compare", str(output), str(tmp_path / "other.json")])
    table = capsys.readouterr().out
    assert "results.json" in table and "other.json" in table and "12.50" in table
    assert all(name in table for name in SUITES)


def test_eval_flags_and_unknown_suite_are_one_line_errors(tmp_path, capsys):
    from flan_jax import cli

    for argv, expected in (
        (["eval", "--suite=bbh_nope", "--checkpoint=x"], "unknown suite 'bbh_nope'"),
        (["eval", "--suite=bbh_cot", "--limit=0"], "--limit"),
        (["eval", "--compare", str(tmp_path / "missing.json"), str(tmp_path / "b.json")], "no such results file"),
        (["eval", "--compare", str(tmp_path / "one.json")], "two or more"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert expected in str(exit_info.value), (argv, exit_info.value)


# --- the published protocol: decode lengths, stopping, choice, MMLU weighting ------------------------


def _exemplar_targets(task_name: str) -> list[str]:
    """The rendered targets of a task's few-shot exemplars (what a model is shown to answer like)."""
    from tasks import templates

    (source, variants), = [(src, v) for src, v in registry.sources().values() if task_name in v]
    kind = variants[task_name].split("_", 1)[1]
    return [templates.render_zero_shot(source.spec, source.spec.templates[0], ex, kind)[1]
            for ex in source.load()[source.exemplar_split]]


@needs_data
def test_every_suites_default_decode_length_covers_its_longest_exemplar_target():
    default_vocab = vocab.get_default_vocabulary()
    for name in ("bbh_cot", "bbh_direct", "mmlu_cot", "mgsm_cot", "gsm8k_cot"):
        suite = registry.get_suite(name)
        longest = max(len(default_vocab.encode(t)) for task in suite.tasks for t in _exemplar_targets(task))
        assert longest <= suite.max_decode_length, (name, longest, suite.max_decode_length)
        assert longest > (100 if "cot" in name else 10), name  # the exemplars were read
    assert registry.get_suite("bbh_cot").max_decode_length > 1024  # geometric_shapes' rationales


@functools.cache
def _filler(tokens: int) -> str:
    """Reasoning-like text of at least `tokens` tokens of the default vocabulary, with no "Q:" in it."""
    text = ""
    while len(vocab.get_default_vocabulary().encode(text)) < tokens:
        text += "We look at each step of the problem again and count what is left. "
    return text


@needs_data
def test_a_model_that_answers_after_400_tokens_scores_100_on_bbh_cot_by_default(fake_model):
    suite = dataclasses.replace(registry.get_suite("bbh_cot"), tasks=registry.get_suite("bbh_cot").tasks[:6])
    loaded = suites.load_suites([suite], LENGTHS, limit=2, log=lambda _: None)
    filler = _filler(400)
    model = fake_model(loaded.examples["bbh_cot"], lambda task, i: f"{filler}{task.texts('targets')[i]}")
    fns = evaluation.ModelFns(model.decode)
    report = suites.run_suites([suite], fns, lengths=LENGTHS, loaded=loaded, show_progress=False)["suites"]["bbh_cot"]
    assert report["score"] == 100.0 and report["unfinished"] == 0
    cut = suites.run_suites([suite], fns, lengths=LENGTHS, decode_length=256, loaded=loaded, show_progress=False)
    assert cut["suites"]["bbh_cot"]["score"] == 0.0  # the old limit cut every answer


@needs_data
def test_a_model_that_runs_on_into_a_new_question_is_scored_on_its_first_answer_and_stops_early(fake_generate):
    suite = registry.get_suite("bbh_cot")
    examples = [evaluation.load_task_examples(t, "test", LENGTHS, 4) for t in suite.tasks[:3]]
    rambling = " Q: Is this another question? A: Let's think step by step. So the answer is (Z). " + _filler(1500)

    def answer(task, i):  # No EOS: it would go on to the decode limit.
        return f"Let's think. {task.texts('targets')[i]}{rambling}"

    results, model = fake_generate(examples, answer, eos=False, max_decode_length=suite.max_decode_length,
                                   stops=suite.stops())
    assert all(r.metrics["accuracy"] == 100.0 and r.unfinished == 0 for r in results.values()), results
    assert model.chunks_taken <= 4  # one batch of 12 rows, stopped a chunk or two after its last "Q:"
    assert not any("Q:" in sample["prediction"] for r in results.values() for sample in r.samples)

    results, model = fake_generate(examples, answer, eos=False, max_decode_length=suite.max_decode_length)
    assert all(r.metrics["accuracy"] == 0.0 and r.unfinished == 4 for r in results.values())  # (Z), the last answer
    assert model.chunks_taken == suite.max_decode_length // 16  # without stops: to the limit


@needs_data
def test_target_length_1024_decodes_1024_tokens(fake_model):
    suite = registry.get_suite("gsm8k_cot")
    loaded = suites.load_suites([suite], {"inputs": 256, "targets": 8}, limit=3, log=lambda _: None)
    model = fake_model(loaded.examples["gsm8k_cot"], lambda task, i: _filler(2000), eos=False)  # never done
    run = functools.partial(suites.run_suites, [suite], evaluation.ModelFns(model.decode), lengths=loaded.lengths,
                            loaded=loaded, show_progress=False)
    report = run(decode_length=1024)["suites"]["gsm8k_cot"]
    assert model.chunks_taken * model.chunk == 1024 and report["decode_length"] == 1024
    assert report["unfinished"] == 3  # every row reached the limit, and is counted
    model.chunks_taken = 0
    assert run()["suites"]["gsm8k_cot"]["decode_length"] == suite.max_decode_length == 256
    assert model.chunks_taken * model.chunk == 256


def test_chunked_greedy_decoding_is_greedy_decoding_and_stops_at_eos(monkeypatch, tiny_model):
    from flan_jax import decoding

    module, params = tiny_model(64)
    inputs = np.array(jax.random.randint(jax.random.key(3), (3, 12), 2, 64), np.int32)
    whole = np.asarray(jax.jit(lambda p, x: decoding.greedy_decode(module, p, x, max_decode_length=40))(params, inputs))
    runner = inference.ModelRunner(module, decode_chunk=7)
    chunks = list(runner.decode(params, inputs, 40))
    assert [c.shape[1] for c in chunks] == [7, 7, 7, 7, 7, 5]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), whole)
    # Once every row has emitted EOS (here: as if after the first chunk), no more chunks are decoded.
    extend = decoding.extend_decoding
    monkeypatch.setattr(decoding, "extend_decoding",
                        lambda *args: extend(*args)._replace(done=jnp.ones(len(inputs), bool)))
    assert len(list(inference.ModelRunner(module, decode_chunk=7).decode(params, inputs, 40))) == 1


@needs_data
def test_choice_picks_the_option_with_the_highest_first_step_logit_as_transformers_computes_it():
    torch = pytest.importorskip("torch")
    config, hf_model, params = _hf_twin()
    fns = inference.ModelRunner(Transformer(config)).fns(params)
    lengths = {"inputs": 512, "targets": 8}
    examples = [evaluation.load_task_examples(f"mmlu_{s}", "test", lengths, 3) for s in ("anatomy", "virology", "marketing")]
    # T5's vocabulary writes each letter as one token ("▁A"); the default one as one or two ("▁C"; "▁", "A").
    # One token each, as with T5's: options that are one token of the default vocabulary.
    single = ["True", "False", "no", "C"]
    encode = examples[0].vocabulary.encode
    assert all(len(encode(o)) == 1 for o in single) and len(encode("A")) == 2
    for task in examples:
        for ex in task.features:
            ex["options"] = np.array([o.encode() for o in single], object)

    def hf_log_probs(ex, option) -> float:  # evaluate_flan.py: the decoder fed the start id 0
        tokens = encode(option)
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor(ex["inputs"][None].astype(np.int64)),
                              decoder_input_ids=torch.tensor([[0] + tokens[:-1]])).logits[0]
        if len(tokens) == 1:
            return float(logits[0, tokens[0]])  # the raw first-step logit
        return float(torch.log_softmax(logits.double(), -1)[range(len(tokens)), tokens].sum())

    results = evaluation.evaluate_tasks(examples, fns, method="choice", show_progress=False)
    for task in examples:
        expected = [single[int(np.argmax([hf_log_probs(ex, o) for o in single]))] for ex in task.features]
        assert results[task.name].method == "choice"
        assert [s["prediction"] for s in results[task.name].samples] == expected, task.name
    # The letters, as MMLU has them: several tokens each, compared by their tokens' log-likelihood.
    for task in examples:
        for ex in task.features:
            ex["options"] = np.array([o.encode() for o in mmlu.LETTERS], object)
    results = evaluation.evaluate_tasks(examples, fns, method="choice", show_progress=False)
    for task in examples:
        expected = [mmlu.LETTERS[int(np.argmax([hf_log_probs(ex, o) for o in mmlu.LETTERS]))] for ex in task.features]
        assert [s["prediction"] for s in results[task.name].samples] == expected, task.name
        gold = [mmlu.answer_letter(t) for t in task.texts("targets")]
        accuracy = 100.0 * np.mean([e == g for e, g in zip(expected, gold)])
        assert results[task.name].metrics["accuracy"] == pytest.approx(accuracy)


@needs_data
def test_mmlu_averages_over_questions_with_the_subject_macro_average_beside(fake_model):
    small, large = "mmlu_abstract_algebra", "mmlu_high_school_biology"  # 11 and 34 validation questions
    suite = dataclasses.replace(registry.get_suite("mmlu_direct"), tasks=(small, large), method="generate",
                                split="validation")
    loaded = suites.load_suites([suite], {"inputs": 2048, "targets": 8}, log=lambda _: None)
    sizes = {t.name: len(t.features) for t in loaded.examples[suite.name]}
    assert sizes == {small: 11, large: 34}

    def right_on_the_small_subject(task, i):
        gold = mmlu.answer_letter(task.texts("targets")[i])
        return gold if task.name == small else next(l for l in mmlu.LETTERS if l != gold)

    model = fake_model(loaded.examples[suite.name], right_on_the_small_subject)
    results = suites.run_suites([suite], evaluation.ModelFns(model.decode), lengths=loaded.lengths,
                                show_progress=False, loaded=loaded)
    report = results["suites"][suite.name]
    assert report["score"] == pytest.approx(100.0 * 11 / 45)  # over questions, as evaluate_flan.py
    assert report["averages"][suites.MACRO]["score"] == pytest.approx(50.0)  # over subjects
    assert report["categories"]["STEM"]["score"] == pytest.approx(100.0 * 11 / 45)
    assert report["normalized"] == pytest.approx(suites.normalize(100.0 * 11 / 45, 25.0))
    assert "macro over tasks" in format_results(results)
