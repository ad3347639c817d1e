"""Tests for tasks/: templates, built-in data, vocabulary and SeqIO registration.

The vocabulary is trained once (well under a second) into FLAN_JAX_CACHE_DIR or
~/.cache/flan_jax on first use, so this file runs on a fresh machine as is.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
import time

import pytest
import seqio

import tasks
from tasks import builtin, registry, templates, vocab

tasks.register()  # Every task module's tasks, registered with SeqIO (once per process).

FAMILY = builtin.NUMBER_COMPARISON
SPLIT, INDEX = "validation", 2  # A fixed query: "Which number is smaller: 15 or 246?"

# Every variant of the query above, written out by hand from the rules in the
# tasks/templates.py docstring. Its template (index 1) is
# "Compare the numbers.\n{question}"; the few-shot exemplars are train examples.
EXPECTED = {
    "zs_noopt": (
        "Compare the numbers.\nWhich number is smaller: 15 or 246?",
        "15",
    ),
    "zs_opt": (
        "Compare the numbers.\nWhich number is smaller: 15 or 246?\n\nOPTIONS:\n- 15\n- 246",
        "15",
    ),
    "zs_cot": (
        "Compare the numbers.\nWhich number is smaller: 15 or 246?\n\nOPTIONS:\n- 15\n- 246\n"
        "Let's think step by step.",
        "246 - 15 = 231, which is positive, so 15 is smaller. So the answer is 15.",
    ),
    "fs_noopt": (
        "Compare the numbers.\nWhich number is larger: 947 or 650?\n947\n\n"
        "Compare the numbers.\nWhich number is larger: 541 or 935?\n935\n\n"
        "Compare the numbers.\nWhich number is larger: 673 or 230?\n673\n\n"
        "Compare the numbers.\nWhich number is smaller: 15 or 246?",
        "15",
    ),
    "fs_opt": (
        "Compare the numbers.\nWhich number is larger: 947 or 650?\n\nOPTIONS:\n- 947\n- 650\n947\n\n"
        "Compare the numbers.\nWhich number is larger: 541 or 935?\n\nOPTIONS:\n- 541\n- 935\n935\n\n"
        "Compare the numbers.\nWhich number is larger: 673 or 230?\n\nOPTIONS:\n- 673\n- 230\n673\n\n"
        "Compare the numbers.\nWhich number is smaller: 15 or 246?\n\nOPTIONS:\n- 15\n- 246",
        "15",
    ),
    "fs_cot": (
        "Compare the numbers.\nWhich number is larger: 947 or 650?\n\nOPTIONS:\n- 947\n- 650\n"
        "Let's think step by step.\n"
        "947 - 650 = 297, which is positive, so 947 is larger. So the answer is 947.\n\n"
        "Compare the numbers.\nWhich number is larger: 541 or 935?\n\nOPTIONS:\n- 541\n- 935\n"
        "Let's think step by step.\n"
        "935 - 541 = 394, which is positive, so 935 is larger. So the answer is 935.\n\n"
        "Compare the numbers.\nWhich number is larger: 673 or 230?\n\nOPTIONS:\n- 673\n- 230\n"
        "Let's think step by step.\n"
        "673 - 230 = 443, which is positive, so 673 is larger. So the answer is 673.\n\n"
        "Compare the numbers.\nWhich number is smaller: 15 or 246?\n\nOPTIONS:\n- 15\n- 246\n"
        "Let's think step by step.",
        "246 - 15 = 231, which is positive, so 15 is smaller. So the answer is 15.",
    ),
}


def _render(family: registry.Family, split: str, index: int, variant: str, **kwargs) -> dict[str, str]:
    return registry.render_example(family, split, index, family.example(split, index), variant, **kwargs)


# --- templates -----------------------------------------------------------------


def test_every_variant_renders_exactly_as_documented():
    assert FAMILY.example(SPLIT, INDEX) == {
        "question": "Which number is smaller: 15 or 246?",
        "answer": "15",
        "rationale": "246 - 15 = 231, which is positive, so 15 is smaller.",
        "options": ["15", "246"],
    }
    assert set(FAMILY.spec.variants) == set(EXPECTED)
    for variant, (inputs, targets) in EXPECTED.items():
        assert _render(FAMILY, SPLIT, INDEX, variant) == {"inputs": inputs, "targets": targets}, variant


def test_non_multiple_choice_family_has_four_variants_and_no_options():
    family = builtin.ARITHMETIC
    assert family.spec.variants == ("zs_noopt", "fs_noopt", "zs_cot", "fs_cot")
    rendered = _render(family, "train", 0, "zs_cot")
    assert "OPTIONS" not in rendered["inputs"]
    assert rendered["inputs"].endswith("\nLet's think step by step.")
    assert rendered["targets"].endswith(f"So the answer is {family.example('train', 0)['answer']}.")
    with pytest.raises(ValueError, match="no variant 'zs_opt'"):
        _render(family, "train", 0, "zs_opt")


@pytest.mark.parametrize("family", builtin.BUILTIN_FAMILIES, ids=lambda f: f.name)
def test_few_shot_prompts_never_contain_the_query(family):
    for split in ("train", "validation"):
        for index in range(40):
            query = family.example(split, index)
            for variant in ("fs_noopt", "fs_cot"):
                inputs = _render(family, split, index, variant)["inputs"]
                zero_shot = _render(family, split, index, "zs" + variant[2:])["inputs"]
                # The query comes last, and only there; three exemplars come before it.
                assert inputs.endswith(family.spec.shot_separator + zero_shot)
                assert inputs.count(query["question"]) == 1, (split, index)
                if variant == "fs_cot":
                    assert inputs.count("So the answer is") == family.spec.num_shots


def test_exemplars_are_dropped_until_the_prompt_fits():
    full = _render(FAMILY, SPLIT, INDEX, "fs_opt")["inputs"]
    zero_shot = EXPECTED["zs_opt"][0]
    assert _render(FAMILY, SPLIT, INDEX, "fs_opt", max_input_length=len(full))["inputs"] == full
    two_shots = _render(FAMILY, SPLIT, INDEX, "fs_opt", max_input_length=len(full) - 1)["inputs"]
    assert two_shots.count("OPTIONS") == 3 and full.startswith(two_shots.rsplit("\n\nCompare", 1)[0])
    # A query that alone is too long stays whole: truncation is the tokenizer's job.
    assert _render(FAMILY, SPLIT, INDEX, "fs_opt", max_input_length=10)["inputs"] == zero_shot
    # Lengths may be counted in any unit, e.g. words.
    by_words = _render(FAMILY, SPLIT, INDEX, "fs_opt", max_input_length=40, length_fn=lambda s: len(s.split()))
    assert len(by_words["inputs"].split()) <= 40 and by_words["inputs"].endswith(zero_shot)


def test_template_choice_is_deterministic_in_the_seed():
    picks = [templates.pick_template("number_comparison", "train", i, 0, 3) for i in range(60)]
    assert picks == [templates.pick_template("number_comparison", "train", i, 0, 3) for i in range(60)]
    assert set(picks) == {0, 1, 2}  # Every template is used.
    assert picks != [templates.pick_template("number_comparison", "train", i, 1, 3) for i in range(60)]
    # Same seed, same rendering; another seed picks other templates or exemplars.
    example = FAMILY.example(SPLIT, INDEX)
    first = registry.render_example(FAMILY, SPLIT, INDEX, example, "fs_noopt", seed=0)
    assert registry.render_example(FAMILY, SPLIT, INDEX, example, "fs_noopt", seed=0) == first
    others = [registry.render_example(FAMILY, SPLIT, INDEX, example, "fs_noopt", seed=s) for s in (1, 2)]
    assert any(other != first for other in others)


def test_templates_reject_answer_leaks_and_bad_options():
    with pytest.raises(ValueError, match="target-only"):
        templates.Template("{question} ({answer})")
    spec = templates.TaskSpec("toy", [templates.Template("{question}")], multiple_choice=True)
    example = {"question": "Q?", "answer": "c", "rationale": "R.", "options": ["a", "b"]}
    with pytest.raises(ValueError, match="not among the options"):
        templates.render(spec, example, "zs_opt", template_index=0)


def test_extract_answer():
    cot_target = _render(FAMILY, SPLIT, INDEX, "zs_cot")["targets"]
    assert templates.extract_answer(cot_target) == "15"
    assert registry.postprocess(cot_target.encode(), example={}, is_target=True) == "15"
    assert registry.postprocess("So the answer is 3. Hmm. So the answer is 09/25/2020.", is_target=False) == "09/25/2020"
    assert registry.postprocess("  apple kiwi pear \n", is_target=False) == "apple kiwi pear"
    assert registry.postprocess("So the answer is", is_target=False) == ""


# --- built-in data ---------------------------------------------------------------


def test_examples_are_deterministic_and_well_formed():
    assert len(builtin.BUILTIN_FAMILIES) >= 7
    assert sum(f.spec.multiple_choice for f in builtin.BUILTIN_FAMILIES) >= 2
    for family in builtin.BUILTIN_FAMILIES:
        for index in range(20):
            example = family.example("train", index)
            assert example == family.example("train", index)
            assert {"question", "answer", "rationale"} <= set(example)
            assert all(isinstance(example[k], str) and example[k] for k in ("question", "answer", "rationale"))
            if family.spec.multiple_choice:
                assert example["answer"] in example["options"]
            for variant in templates.ZERO_SHOT_VARIANTS:
                if variant in family.spec.variants:
                    assert len(_render(family, "train", index, variant)["inputs"]) < 200, (family.name, variant)


def test_train_and_validation_are_disjoint():
    for family in builtin.BUILTIN_FAMILIES:
        assert (family.train_size, family.validation_size) == (10_000, 100)
        validation = {family.example("validation", i)["question"] for i in range(family.validation_size)}
        train = {family.example("train", i)["question"] for i in range(family.train_size)}
        assert not validation & train, family.name
        assert len(validation) > 90 and len(train) > 1000, family.name
    with pytest.raises(IndexError):
        FAMILY.example("validation", 100)


# --- vocabulary ------------------------------------------------------------------


def test_vocabulary_round_trips_text_with_digits():
    vocabulary = vocab.get_default_vocabulary()
    assert isinstance(vocabulary, seqio.SentencePieceVocabulary)
    assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) == (0, 1, 2)
    assert 300 < vocabulary.vocab_size <= 1024
    for text in ["Today is 03/14/2021. What is 1234567890 + 17?", "Zoë paid €12.50\n\nOPTIONS:\n- 7"]:
        assert vocabulary.decode(vocabulary.encode(text)) == text
    pieces = vocabulary.tokenizer.encode("x 90817", out_type=str)
    assert pieces[-5:] == ["9", "0", "8", "1", "7"]  # split_digits


def test_vocabulary_is_cached_under_a_corpus_hash(tmp_path):
    start = time.perf_counter()
    path = vocab.default_vocabulary_path()
    assert time.perf_counter() - start < 0.1  # Cached in the process, and on disk.
    sentences = vocab.corpus()
    assert os.path.basename(path) == vocab.model_name(sentences)
    assert vocab.model_name(sentences + ["one more"]) != vocab.model_name(sentences)
    # Training is deterministic and atomic: the same bytes, no temp files left.
    vocab.train(sentences, str(tmp_path / "a.model"))
    vocab.train(sentences, str(tmp_path / "b.model"))
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert (tmp_path / "a.model").read_bytes() == open(path, "rb").read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model"]


# --- SeqIO registration -------------------------------------------------------------


def _take(name: str, split: str, sequence_length: dict[str, int], n: int) -> list[dict]:
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset(sequence_length, split=split, shuffle=False)
    # The iterator dies with this function: see the note in tasks/registry.py.
    return list(ds.take(n).as_numpy_iterator())


def test_seqio_task_yields_tokenized_examples_ending_in_eos():
    name = tasks.task_name("number_comparison", "fs_cot")
    vocabulary = seqio.get_mixture_or_task(name).output_features["inputs"].vocabulary
    examples = _take(name, "validation", {"inputs": 512, "targets": 256}, 3)
    assert len(examples) == 3
    for ex in examples:
        for feature in ("inputs", "targets"):
            assert ex[feature][-1] == 1  # EOS
            assert vocabulary.decode(ex[feature][:-1].tolist()) == ex[f"{feature}_pretokenized"].decode()
        assert registry.postprocess(ex["targets_pretokenized"], example=ex, is_target=True) == ex["answer"].decode()
    first = FAMILY.example("validation", 0)
    assert examples[0]["inputs_pretokenized"].decode() == _render(FAMILY, "validation", 0, "fs_cot")["inputs"]
    assert examples[0]["answer"].decode() == first["answer"]


def test_seqio_few_shot_prompts_fit_the_input_length():
    name = tasks.task_name("arithmetic", "fs_cot")
    for ex in _take(name, "train", {"inputs": 64, "targets": 256}, 4):
        assert len(ex["inputs"]) <= 64 and ex["inputs"][-1] == 1
        # 64 tokens leave no room for a worked exemplar: only the query is left.
        assert ex["inputs_pretokenized"].decode().count("So the answer is") == 0


def test_mixtures():
    assert (tasks.TRAIN_MIXTURE, tasks.HELDOUT_MIXTURE, tasks.VALIDATION_MIXTURE) == (
        "builtin_train", "builtin_heldout", "builtin_validation_zs")
    train = {t.name for t in seqio.get_mixture_or_task(tasks.TRAIN_MIXTURE).tasks}
    heldout = {t.name for t in seqio.get_mixture_or_task(tasks.HELDOUT_MIXTURE).tasks}
    validation = {t.name for t in seqio.get_mixture_or_task(tasks.VALIDATION_MIXTURE).tasks}
    assert heldout == {f"builtin_boolean_expressions_{v}" for v in templates.NOOPT_VARIANTS}
    assert not train & heldout and not validation & heldout
    assert "builtin_arithmetic_fs_cot" in train and "builtin_number_comparison_zs_opt" in train
    assert validation == {n for n in train if n.split("_")[-2] == "zs"}
    mixture = seqio.get_mixture_or_task(tasks.TRAIN_MIXTURE)
    rate = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    # Equal per family: four variants at 1/4 each, six at 1/6 each.
    assert rate["builtin_arithmetic_zs_cot"] == pytest.approx(1 / 4)
    assert rate["builtin_number_comparison_zs_cot"] == pytest.approx(1 / 6)


def test_importing_twice_is_fine():
    before = set(seqio.TaskRegistry.names())
    importlib.reload(tasks)
    importlib.reload(builtin)
    tasks.discover()
    tasks.register(again=True)
    assert set(seqio.TaskRegistry.names()) == before


def test_unknown_task_name_raises_a_clear_error():
    with pytest.raises(ValueError, match="No Task or Mixture found with name 'builtin_no_such_task'"):
        seqio.get_mixture_or_task("builtin_no_such_task")


def test_a_new_file_in_the_package_adds_a_task(tmp_path, monkeypatch):
    # The README's example, as a module in an extra directory of the package.
    (tmp_path / "last_letters.py").write_text(textwrap.dedent('''
        """Last-letter concatenation: join the last letters of three words."""
        import random

        from tasks.registry import Family, add_family
        from tasks.templates import TaskSpec, Template

        _WORDS = ("river", "candle", "tiger", "honey", "lemon", "quilt", "spoon", "zebra")


        def last_letters(rng: random.Random) -> dict:
            words = rng.sample(_WORDS, 3)
            return {
                "question": f"Join the last letters of: {' '.join(words)}",
                "answer": "".join(w[-1] for w in words),
                "rationale": " ".join(f"{w} ends in {w[-1]}." for w in words),
            }


        add_family(Family(
            TaskSpec("last_letters", [Template("{question}"), Template("Q: {question}")]),
            last_letters,
            train_size=1000,
            validation_size=20,
        ))
    '''))
    monkeypatch.setattr(tasks, "__path__", [*tasks.__path__, str(tmp_path)])
    try:
        assert "last_letters" in tasks.discover()
        tasks.register(again=True)
        name = tasks.task_name("last_letters", "zs_cot")
        assert name in {t.name for t in seqio.get_mixture_or_task(tasks.TRAIN_MIXTURE).tasks}
        (ex,) = _take(name, "validation", {"inputs": 128, "targets": 64}, 1)
        assert ex["inputs_pretokenized"].decode().endswith("Let's think step by step.")
        assert templates.extract_answer(ex["targets_pretokenized"]) == ex["answer"].decode()
    finally:
        registry.remove_family("last_letters")
        sys.modules.pop("tasks.last_letters", None)
        tasks.register(again=True)
    assert tasks.task_name("last_letters", "zs_cot") not in seqio.TaskRegistry.names()
