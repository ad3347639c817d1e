"""Held out means held out: the n-gram overlap index (flan_jax/decontamination.py)."""

from __future__ import annotations

import random

import pytest

from flan_jax import decontamination

QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")


def _index(*texts: str) -> decontamination.OverlapIndex:
    index = decontamination.OverlapIndex()
    for i, text in enumerate(texts):
        index.add("eval", i, text)
    return index


def test_a_shared_13_word_run_matches_whatever_the_case_punctuation_and_spacing():
    index = _index(QUESTION, "A completely different question about the boiling point of water at sea level?")
    run = "NATALIA sold clips -- to 48 of her\nfriends in April; and then she"  # 13 words
    assert index.matches(f"Some training text. {run} and more.") == {("eval", 0)}
    twelve = "natalia sold clips to 48 of her friends in april and then"
    assert index.matches(f"Some training text. {twelve} and more.") == set()
    assert index.matches("the boiling point of water at sea level") == set()  # 8 words, not 13


def test_short_texts_match_whole_and_very_short_ones_are_counted_not_checked():
    index = _index("What is the capital city of France today?", "Sort: b a")
    assert index.too_short == {"eval": 1}
    assert len(index) == 1
    assert index.matches("Q: what is the capital city of france today? A: Paris") == {("eval", 0)}
    assert index.matches("what is the capital city of france") == set()
    assert index.matches("sort: b a") == set()


def test_unicode_words_are_matched_in_any_script():
    question = "Джанет держит 16 уток каждый день она съедает три яйца на завтрак и печёт кексы для друзей"
    index = _index(question)
    assert index.matches("Перевод: " + question.upper()) == {("eval", 0)}


def test_report_counts_each_pair_and_plants_are_found_exactly():
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(5000)]
    eval_texts = [" ".join(rng.choice(vocabulary) for _ in range(30)) for _ in range(50)]
    index = decontamination.OverlapIndex()
    for i, text in enumerate(eval_texts):
        index.add("bench", i, text)
    planted = {3: "train_a", 17: "train_a", 41: "train_b"}
    training = []
    for n in range(400):
        task = "train_a" if n % 2 else "train_b"
        training.append((task, " ".join(rng.choice(vocabulary) for _ in range(40))))
    for i, task in planted.items():
        words = eval_texts[i].split()
        training.append((task, "prefix words " + " ".join(words[5:18]) + " suffix"))  # exactly 13 of its words
    report = decontamination.scan(index, training, decontamination.OverlapReport({"bench": len(eval_texts)}))
    found = {(train, ev): sorted(p.eval_examples) for (train, ev), p in report.pairs.items()}
    assert found == {("train_a", "bench"): [3, 17], ("train_b", "bench"): [41]}
    assert report.training_read == {"train_a": 202, "train_b": 201}
    rows = report.as_dict()["pairs"]
    assert rows[0] == {"training_task": "train_a", "eval_task": "bench", "eval_examples": 2, "eval_size": 50,
                       "eval_share": 0.04, "training_examples": 2, "eval_indices": [3, 17]}


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="min_words"):
        decontamination.OverlapIndex(n=5, min_words=8)


def test_ngrams_many_evaluation_examples_share_are_boilerplate_and_ignored():
    preamble = "the following paragraphs each describe a set of seven objects arranged in a fixed order"
    index = decontamination.OverlapIndex(max_shared=3)
    for i, colour in enumerate(["red", "green", "blue", "grey"]):
        index.add("bbh", i, f"{preamble}. On a shelf there are a {colour} book, a white cup and a black pen.")
    assert index.boilerplate() > 0
    assert index.matches(f"Training text: {preamble}.") == set()  # In all four: boilerplate.
    assert index.matches("shelf there are a green book, a white cup and a black pen and more") == {("bbh", 1)}
