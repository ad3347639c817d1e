"""Mixtures (tasks/mixing.py) and deterministic, resumable training data (flan_jax/data.py).

Rates are checked on small made-up tasks whose sizes are known, so every
expected number is written out. Task membership of a sample is read with
`mixing.sample_task_names`, which is checked against a real seqio mixture
first; the built-in and (when the data is there) Flan CoT mixtures are then
sampled 20,000 times.
"""

from __future__ import annotations

import collections
import logging

import numpy as np
import pytest
import seqio
import tensorflow as tf
from conftest import SMALL_MIXTURE

import tasks
from flan_jax import data
from tasks import mixing

tasks.register()  # Every task module's tasks, registered with SeqIO (once per process).

# Made-up tasks: {family: (train examples, variants)}. Their examples are one
# token, the family's index, so a mixture's output says where it came from.
FAMILIES = {
    "mt_small": (1_000, ("zs_noopt", "fs_cot")),
    "mt_big": (50_000, ("zs_noopt", "fs_cot")),
    "mt_single": (200, ("zs_noopt",)),
}
VOCAB = seqio.PassThroughVocabulary(16)


def _names(family: str) -> list[str]:
    return [f"{family}_{v}" for v in FAMILIES[family][1]]


RECIPE_COLLECTIONS = {"flan": _names("mt_small"), "niv2": _names("mt_big"), "cot": _names("mt_single"), "dialog": []}


@pytest.fixture(scope="module", autouse=True)
def made_up_tasks():
    for index, (family, (size, variants)) in enumerate(FAMILIES.items()):
        def dataset_fn(split, shuffle_files, seed=None, index=index, size=size):
            return tf.data.Dataset.range(size).map(lambda _: {"inputs": tf.constant([index], tf.int32)})

        source = seqio.FunctionDataSource(dataset_fn, splits=["train"], num_input_examples={"train": size})
        for variant in variants:
            name = f"{family}_{variant}"
            seqio.TaskRegistry.remove(name)
            seqio.TaskRegistry.add(name, source=source, preprocessors=[],
                                   output_features={"inputs": seqio.Feature(VOCAB, add_eos=False, dtype=tf.int32)})
    # Registered here, not in the tests that check them, so any test can use them.
    mixing.add_mixture("mt_sub_small", mixing.example_proportional(_names("mt_small"), cap=10_000))
    mixing.add_mixture("mt_sub_rest", mixing.example_proportional(_names("mt_big") + _names("mt_single"), cap=10_000))
    mixing.add_mixture("mt_parent", {"mt_sub_small": 0.75, "mt_sub_rest": 0.25})
    mixing.add_recipe("mt_recipe", RECIPE_COLLECTIONS, warn=False)
    yield
    for name in [m for m in seqio.MixtureRegistry.names() if m.startswith("mt_")]:
        seqio.MixtureRegistry.remove(name)
    for family in FAMILIES:
        for name in _names(family):
            seqio.TaskRegistry.remove(name)


def _rates(rates: dict) -> dict[str, float]:
    return {name: rate(seqio.get_mixture_or_task(name)) for name, rate in rates.items()}


def _assert_shares(name: str, expected: dict[str, float]) -> None:
    shares = mixing.task_shares(name)
    assert shares.keys() == expected.keys()
    for task, share in expected.items():
        assert shares[task] == pytest.approx(share, abs=1e-12), task


# --- rates -------------------------------------------------------------------------------


def test_split_variant():
    assert mixing.split_variant("flan_cot_gsm8k_fs_cot") == ("flan_cot_gsm8k", "fs_cot")
    assert mixing.split_variant("builtin_dates_zs_noopt") == ("builtin_dates", "zs_noopt")
    assert mixing.split_variant("mmlu_anatomy") == ("mmlu_anatomy", None)
    assert mixing.split_variant("bbh_navigate_cot") == ("bbh_navigate_cot", None)


def test_num_examples_uses_seqio_count_else_counts_the_source():
    assert mixing.num_examples("mt_big_zs_noopt") == 50_000
    assert mixing.num_examples("builtin_dates_zs_cot") == 10_000

    def uncounted(split, shuffle_files, seed=None):  # A filter hides the size from tf.data.
        return tf.data.Dataset.range(301).filter(lambda i: i % 3 == 0).map(lambda _: {"inputs": [1]})

    task = seqio.Task("mt_uncounted", seqio.FunctionDataSource(uncounted, splits=["train"]), preprocessors=[],
                      output_features={"inputs": seqio.Feature(VOCAB, add_eos=False, dtype=tf.int32)})
    assert task.num_input_examples("train") is None
    assert mixing.num_examples(task) == 101


def test_capped_rates_split_a_dataset_evenly_over_its_variants():
    rates = _rates(mixing.example_proportional(_names("mt_small") + _names("mt_big") + _names("mt_single"), cap=10_000))
    assert rates == {
        "mt_small_zs_noopt": 500.0, "mt_small_fs_cot": 500.0,    # min(1000, 10000) / 2 variants
        "mt_big_zs_noopt": 5_000.0, "mt_big_fs_cot": 5_000.0,    # min(50000, 10000) / 2
        "mt_single_zs_noopt": 200.0,                             # min(200, 10000) / 1
    }
    uncapped = _rates(mixing.example_proportional(_names("mt_big")))
    assert uncapped == {"mt_big_zs_noopt": 25_000.0, "mt_big_fs_cot": 25_000.0}


def test_variant_weights_multiply_rates_and_select_variants():
    weights = {"zs_noopt": 1.0, "fs_cot": 0.25}
    rates = _rates(mixing.example_proportional(_names("mt_small") + _names("mt_big"), cap=10_000, variant_weights=weights))
    assert rates == {"mt_small_zs_noopt": 1_000.0, "mt_small_fs_cot": 250.0,
                     "mt_big_zs_noopt": 10_000.0, "mt_big_fs_cot": 2_500.0}
    only_cot = mixing.example_proportional(_names("mt_small") + ["mmlu_anatomy"], variant_weights={"fs_cot": 2.0})
    assert _rates(only_cot) == {"mt_small_fs_cot": 2_000.0}  # Unlisted variants, and tasks without one, are left out.


def test_nested_mixture_gives_each_submixture_its_rate():
    # mt_parent = {mt_sub_small: 0.75, mt_sub_rest: 0.25}, both capped at 10,000 (see made_up_tasks).
    # Inside mt_sub_rest the rates are 5000, 5000, 200 (total 10200).
    _assert_shares("mt_parent", {
        "mt_small_zs_noopt": 0.75 * 0.5, "mt_small_fs_cot": 0.75 * 0.5,
        "mt_big_zs_noopt": 0.25 * 5_000 / 10_200, "mt_big_fs_cot": 0.25 * 5_000 / 10_200,
        "mt_single_zs_noopt": 0.25 * 200 / 10_200,
    })


def test_flan_2022_recipe_over_present_collections(caplog):
    assert {c: (x.rate, x.cap) for c, x in mixing.FLAN_2022.items()} == {
        "flan": (0.4, 30_000), "t0": (0.32, 20_000), "niv2": (0.2, 5_000), "cot": (0.05, 100_000), "dialog": (0.03, 200_000),
    }
    with caplog.at_level(logging.WARNING, logger="tasks.mixing"):
        recipe = mixing.add_recipe("mt_recipe", RECIPE_COLLECTIONS)
    assert "t0, dialog" in caplog.text  # Missing collections are named ...
    assert recipe.missing == ("t0", "dialog")
    total = 0.4 + 0.2 + 0.05  # ... and the present ones renormalised.
    assert recipe.shares == pytest.approx({"flan": 0.4 / total, "niv2": 0.2 / total, "cot": 0.05 / total})
    # niv2 caps each task at 5000 examples: mt_big's 50,000 count as 5000, split over 2 variants.
    assert _rates(dict(seqio.get_mixture_or_task("mt_recipe_niv2").rate_per_task_name)) == {
        "mt_big_zs_noopt": 2_500.0, "mt_big_fs_cot": 2_500.0}
    _assert_shares("mt_recipe", {
        "mt_small_zs_noopt": 0.4 / total / 2, "mt_small_fs_cot": 0.4 / total / 2,
        "mt_big_zs_noopt": 0.2 / total / 2, "mt_big_fs_cot": 0.2 / total / 2,
        "mt_single_zs_noopt": 0.05 / total,
    })
    with pytest.raises(ValueError, match="not in the recipe"):
        mixing.add_recipe("mt_bad", {"books": _names("mt_small")})
    with pytest.raises(ValueError, match="has a task"):
        mixing.add_recipe("mt_bad", {"flan": []})


def test_flan2022_is_registered_from_the_local_cot_collection():
    recipe = mixing.recipes()["flan2022"]
    assert recipe.shares == {"cot": 1.0}
    assert recipe.missing == ("flan", "t0", "niv2", "dialog")
    assert seqio.get_mixture_or_task("flan2022").rate_per_task_name == {"flan2022_cot": 1.0}


# --- sampling ----------------------------------------------------------------------------


def test_sample_task_names_is_what_the_seqio_mixture_draws():
    mixing.add_mixture("mt_sampled", {"mt_sub_small": 0.6, "mt_big_fs_cot": 3_000.0, "mt_single_zs_noopt": 1_000.0})
    family_of_index = list(FAMILIES)
    mixture = seqio.get_mixture_or_task("mt_sampled")
    ds = mixture.get_dataset(None, split="train", shuffle=False, seed=7, num_epochs=None)
    real = [family_of_index[int(ex["inputs"][0])] for ex in ds.take(2_000).as_numpy_iterator()]
    predicted = [mixing.split_variant(t)[0] for t in mixing.sample_task_names("mt_sampled", 2_000, seed=7)]
    assert predicted == real


def _check_sampled_shares(name: str, num_samples: int = 20_000) -> None:
    counts = collections.Counter(mixing.sample_task_names(name, num_samples, seed=1))
    for task, share in mixing.task_shares(name).items():
        assert abs(counts[task] / num_samples - share) < 0.02, (task, counts[task] / num_samples, share)


@pytest.mark.parametrize("name", ["builtin_train", "mt_recipe", "mt_parent"])
def test_sampled_shares_match_rates(name):
    _check_sampled_shares(name)


def test_flan_cot_shares(flan_cot_data):
    _check_sampled_shares("flan2022")
    # No task reaches the cot cap of 100,000 examples: the recipe keeps flan_cot's shares.
    assert mixing.task_shares("flan2022") == pytest.approx(mixing.task_shares("flan_cot"))
    by_dataset = collections.defaultdict(float)
    for task, share in mixing.task_shares("flan2022").items():
        by_dataset[mixing.split_variant(task)[0]] += share
    sizes = {f: mixing.num_examples(f"{f}_fs_cot") for f in by_dataset}
    assert by_dataset == pytest.approx({f: n / sum(sizes.values()) for f, n in sizes.items()})


# --- deterministic, resumable iteration ---------------------------------------------------

LENGTHS = {"inputs": 32, "targets": 16}
BATCH, SEED, RESUME_AT, NUM_BATCHES = 2, 3, 40, 100


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The first 100 batches of builtin_small (4 tasks), with the input position saved after batch 40."""
    state_dir = str(tmp_path_factory.mktemp("input_state"))
    batches = data.TrainIterator(SMALL_MIXTURE, LENGTHS, BATCH, seed=SEED)
    first = [next(batches) for _ in range(RESUME_AT)]
    assert batches.write_state(state_dir)
    rest = [next(batches) for _ in range(NUM_BATCHES - RESUME_AT)]
    del batches
    return first + rest, state_dir


def test_same_seed_gives_the_same_batches(reference):
    batches, _ = reference
    ds = data.get_train_dataset(SMALL_MIXTURE, LENGTHS, BATCH, seed=SEED)
    assert _same(list(ds.take(NUM_BATCHES).as_numpy_iterator()), batches)
    other = data.get_train_dataset(SMALL_MIXTURE, LENGTHS, BATCH, seed=SEED + 1)
    assert not _same(list(other.take(1).as_numpy_iterator()), batches[:1])


def test_resume_by_skipping_continues_exactly(reference):
    batches, _ = reference
    ds = data.get_train_dataset(SMALL_MIXTURE, LENGTHS, BATCH, seed=SEED, start_batch=RESUME_AT)
    assert _same(list(ds.take(10).as_numpy_iterator()), batches[RESUME_AT:RESUME_AT + 10])


def test_resume_from_saved_position_continues_exactly(reference):
    batches, state_dir = reference
    resumed = data.TrainIterator(SMALL_MIXTURE, LENGTHS, BATCH, seed=SEED)
    assert resumed.read_state(state_dir)
    assert resumed.position == RESUME_AT
    assert _same([next(resumed) for _ in range(10)], batches[RESUME_AT:RESUME_AT + 10])
    assert resumed.position == RESUME_AT + 10
    del resumed
