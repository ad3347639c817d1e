"""Best-fit packing (flan_jax/packing.py): rows, determinism, resuming, density, model parity, length suggestions."""

from __future__ import annotations

import collections
import itertools

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

import tasks
from flan_jax import data, data_inspect, packing
from flan_jax.errors import UserError
from flan_jax.model import T5Config, Transformer

tasks.register()  # Every task module's tasks, registered with SeqIO (once per process).

LENGTHS = {"inputs": 64, "targets": 32}


def _random_examples(rng: np.random.Generator, count: int, high: dict[str, int]) -> dict[str, list[np.ndarray]]:
    """`count` examples of random non-zero tokens, lengths in [1, high[feature]]."""
    return {k: [rng.integers(2, 30_000, rng.integers(1, n + 1)) for _ in range(count)] for k, n in high.items()}


def _unpack(rows: dict[str, np.ndarray], feature_lengths: dict[str, int]) -> list[tuple[tuple[int, ...], ...]]:
    """The examples in packed rows, read back through segment ids and positions; checks the layout on the way."""
    examples = []
    for r in range(len(rows["inputs"])):
        segments = {}
        for k in feature_lengths:
            tokens, ids, positions = (rows[k + s][r] for s in packing.ROW_SUFFIXES)
            assert tokens.shape == (feature_lengths[k],)
            used = int((ids > 0).sum())
            assert (ids[used:] == 0).all() and (tokens[used:] == 0).all() and (positions[used:] == 0).all()
            assert (tokens[:used] != 0).all()
            # Segment ids 1..k in order, positions restart at 0 in each segment.
            starts = np.flatnonzero(np.diff(ids[:used], prepend=0))
            assert list(ids[starts]) == list(range(1, len(starts) + 1))
            for start, end in zip(starts, [*starts[1:], used]):
                assert list(positions[start:end]) == list(range(end - start))
            segments[k] = [tuple(tokens[s:e]) for s, e in zip(starts, [*starts[1:], used])]
        assert len({len(v) for v in segments.values()}) == 1, "inputs and targets hold different examples"
        examples += list(zip(*(segments[k] for k in feature_lengths)))
    return examples


def test_rows_hold_every_example_once_within_the_lengths():
    rng = np.random.default_rng(0)
    feature_lengths = {"inputs": 50, "targets": 20}
    features = _random_examples(rng, 300, {"inputs": 70, "targets": 30})  # Some longer than a row: cut.
    rows = packing.pack_block(features, feature_lengths)
    expected = [tuple(tuple(features[k][i][:n]) for k, n in feature_lengths.items()) for i in range(300)]
    assert collections.Counter(_unpack(rows, feature_lengths)) == collections.Counter(expected)
    assert all(v.dtype == np.int32 for v in rows.values())


def test_an_example_empty_in_every_feature_is_dropped():
    rows = packing.pack_block({"inputs": [np.array([5, 1]), np.array([], int)], "targets": [np.array([1]), np.array([], int)]},
                              {"inputs": 4, "targets": 4})
    assert rows["inputs_segment_ids"].tolist() == [[1, 1, 0, 0]]
    assert rows["targets_segment_ids"].tolist() == [[1, 0, 0, 0]]


def test_layout_is_seqios_when_the_examples_fit_one_row():
    examples = [{"inputs": [7, 8, 5, 1], "targets": [3, 9, 1]}, {"inputs": [8, 4, 9, 3, 1], "targets": [4, 1]}]
    lengths = {"inputs": 10, "targets": 7}
    ds = tf.data.Dataset.from_generator(lambda: iter(examples),
                                        output_signature={k: tf.TensorSpec([None], tf.int32) for k in lengths})
    want = next(seqio.utils.trim_and_pack_dataset(ds, lengths).as_numpy_iterator())
    got = packing.pack_block({k: [np.array(ex[k]) for ex in examples] for k in lengths}, lengths)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k][0], want[k], err_msg=k)


def test_best_fit_decreasing_over_both_features():
    # One feature: sequential packing needs 3 rows ([6], [5, 4], [5]); best fit of the
    # largest first needs 2 ([6, 4], [5, 5]).
    assert packing.assign_rows(np.array([[6], [5], [4], [5]]), [10]) == [[0, 2], [1, 3]]
    # The tightest of the rows it fits: 3 goes with 7 (room 3), not with 5 (room 5).
    assert packing.assign_rows(np.array([[7], [5], [3]]), [10]) == [[0, 2], [1]]
    # Two features (inputs bind: 15 of 20 vs 13 of 20): example 1 fits row 0 exactly on inputs but not on
    # targets, so it opens row 1; example 2 then fits only row 1.
    assert packing.assign_rows(np.array([[6, 8], [4, 4], [5, 1]]), [10, 10]) == [[0], [1, 2]]
    # Ties go by position, not by anything random: equal examples fill rows in stream order.
    assert packing.assign_rows(np.full((6, 2), 5), [10, 10]) == [[0, 1], [2, 3], [4, 5]]
    # The same block always gives the same rows.
    rng = np.random.default_rng(1)
    block = np.stack([rng.integers(0, 100, 500), rng.integers(1, 40, 500)], axis=1)
    first = packing.assign_rows(block, [128, 48])
    assert first == packing.assign_rows(block.copy(), [128, 48])
    assert sorted(itertools.chain(*first)) == list(range(500))
    with pytest.raises(ValueError, match="trim"):
        packing.assign_rows(np.array([[11, 1]]), [10, 10])


def test_simulation_matches_the_packed_rows():
    rng = np.random.default_rng(2)
    features = _random_examples(rng, 500, {"inputs": 90, "targets": 40})
    lengths = {"inputs": 64, "targets": 32}
    rows = packing.pack_block(features, lengths)
    sim = packing.simulate({k: [len(x) for x in v] for k, v in features.items()}, lengths)
    assert sim.rows == len(rows["inputs"])
    for k in lengths:
        assert sim.fill[k] == pytest.approx(float(np.mean(rows[k] != 0)))
        assert sim.truncated[k] == sum(len(x) > lengths[k] for x in features[k])


# ------------------------------------------------------------------ tf.data, seqio, TrainIterator

BATCH, SAVE_AT, AFTER = 4, 15, 8
# A small buffer, so that the saved position falls inside a packed block, after several blocks.
ITERATOR_KWARGS = dict(seed=5, packer="best_fit", pack_buffer_size=24)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """builtin_train batches through TrainIterator with best-fit packing, the position saved after batch SAVE_AT."""
    state_dir = str(tmp_path_factory.mktemp("input_state"))
    batches = data.TrainIterator("builtin_train", LENGTHS, BATCH, **ITERATOR_KWARGS)
    first = [next(batches) for _ in range(SAVE_AT)]
    assert batches.write_state(state_dir)
    rest = [next(batches) for _ in range(AFTER)]
    del batches  # A tf.data iterator alive at exit can hang TensorFlow's shutdown.
    return first + rest, state_dir


def test_train_iterator_resumes_exactly_with_best_fit(reference):
    batches, state_dir = reference
    resumed = data.TrainIterator("builtin_train", LENGTHS, BATCH, **ITERATOR_KWARGS)
    assert resumed.read_state(state_dir) and resumed.position == SAVE_AT
    got = [next(resumed) for _ in range(AFTER)]
    del resumed
    for a, b in zip(got, batches[SAVE_AT:], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _examples_of(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The examples in packed model-feature batches."""
    rows = {}
    for k, prefix, tokens in (("inputs", "encoder", "encoder_input_tokens"), ("targets", "decoder", "decoder_target_tokens")):
        rows[k] = np.concatenate([b[tokens] for b in batches])
        rows[f"{k}_segment_ids"] = np.concatenate([b[f"{prefix}_segment_ids"] for b in batches])
        rows[f"{k}_positions"] = np.concatenate([b[f"{prefix}_positions"] for b in batches])
    return [{k: np.array(x, np.int32) for k, x in zip(LENGTHS, ex)} for ex in _unpack(rows, LENGTHS)]


def _convert(converter: seqio.FeatureConverter, examples: list[dict[str, np.ndarray]],
             lengths: dict[str, int] = LENGTHS) -> dict[str, np.ndarray]:
    ds = tf.data.Dataset.from_generator(lambda: iter(examples),
                                        output_signature={k: tf.TensorSpec([None], tf.int32) for k in lengths})
    rows = list(converter(ds, lengths).as_numpy_iterator())
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def test_best_fit_packs_denser_than_seqio_on_builtin_train(reference):
    batches, _ = reference
    assert max(b["encoder_segment_ids"].max() for b in batches) > 1  # really packed
    # The mixture's examples, read back from the rows (which also checks their layout), in a random order.
    examples = _examples_of(batches)
    np.random.default_rng(0).shuffle(examples)
    theirs = _convert(seqio.EncDecFeatureConverter(pack=True), examples)
    ours = _convert(packing.BestFitEncDecFeatureConverter(pack=True, buffer_size=128), examples)
    assert sorted(ours) == sorted(theirs)
    # The same tokens and examples, in fewer rows.
    assert data.num_real_tokens(ours) == data.num_real_tokens(theirs)
    count = len(examples)
    assert ours["encoder_segment_ids"].max(axis=1).sum() == theirs["encoder_segment_ids"].max(axis=1).sum() == count
    assert len(ours["encoder_input_tokens"]) < len(theirs["encoder_input_tokens"])
    theirs_fill, ours_fill = data.fill_rates(theirs), data.fill_rates(ours)
    for key in theirs_fill:
        assert ours_fill[key] > theirs_fill[key], (key, ours_fill, theirs_fill)
    # Model features as seqio makes them: decoder inputs are the targets shifted right within each example.
    dec_in, tgt, pos = ours["decoder_input_tokens"], ours["decoder_target_tokens"], ours["decoder_positions"]
    np.testing.assert_array_equal(dec_in[:, 1:][pos[:, 1:] > 0], tgt[:, :-1][pos[:, 1:] > 0])
    assert (dec_in[pos == 0] == 0).all()


def test_packer_is_chosen_in_gin_and_checked():
    assert isinstance(data.feature_converter(pack=True), packing.BestFitEncDecFeatureConverter)  # the default
    assert type(data.feature_converter(pack=False)) is seqio.EncDecFeatureConverter
    try:
        gin.parse_config("get_train_dataset.packer = 'seqio'\nget_train_dataset.pack_buffer_size = 77")
        assert data.configured_packing() == ("seqio", 77)
        assert type(data.feature_converter(pack=True)) is seqio.EncDecFeatureConverter
        gin.parse_config("get_train_dataset.packer = 'best_fit'")
        assert data.feature_converter(pack=True).buffer_size == 77
    finally:
        gin.clear_config()
    with pytest.raises(UserError, match=r"get_train_dataset.packer='first_fit': expected one of 'best_fit', 'seqio'"):
        data.get_train_dataset("builtin_train", LENGTHS, 2, packer="first_fit")


# ------------------------------------------------------------------ the model


def test_packed_logits_equal_unpacked():
    config = T5Config(vocab_size=128, emb_dim=32, num_heads=2, head_dim=16, num_encoder_layers=2,
                      num_decoder_layers=2, mlp_dim=64, dropout_rate=0.0)
    model = Transformer(config)
    ones = jnp.ones((1, 8), jnp.int32)
    params = flax.linen.unbox(model.init(jax.random.key(0), ones, ones, ones, enable_dropout=False)["params"])
    apply = jax.jit(model.apply, static_argnames="enable_dropout")
    rng = np.random.default_rng(3)
    examples = [  # EOS-terminated, distinct
        {"inputs": np.append(rng.integers(2, 128, n - 1), 1).astype(np.int32),
         "targets": np.append(rng.integers(2, 128, m - 1), 1).astype(np.int32)}
        for n, m in [(9, 3), (4, 6), (12, 2), (3, 3), (7, 5), (5, 4)]
    ]
    lengths = {"inputs": 20, "targets": 10}
    packed = _convert(packing.BestFitEncDecFeatureConverter(pack=True), examples, lengths)
    unpacked = _convert(seqio.EncDecFeatureConverter(pack=False), examples, lengths)  # one example per row
    assert len(packed["encoder_input_tokens"]) < len(examples)

    def logits(batch: dict[str, np.ndarray]) -> np.ndarray:
        names = ["encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens"]
        names += ["encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions"]
        return np.asarray(apply({"params": params}, *(batch.get(k) for k in names), enable_dropout=False))

    packed_logits, unpacked_logits = logits(packed), logits(unpacked)
    seen = []
    for r, row in enumerate(packed["decoder_segment_ids"]):
        for segment in range(1, row.max() + 1):
            inputs = packed["encoder_input_tokens"][r][packed["encoder_segment_ids"][r] == segment]
            i = next(i for i, ex in enumerate(examples) if np.array_equal(ex["inputs"], inputs))
            where = row == segment
            np.testing.assert_array_equal(packed["decoder_target_tokens"][r][where], examples[i]["targets"])
            np.testing.assert_allclose(packed_logits[r, where], unpacked_logits[i, :where.sum()], atol=1e-5, rtol=0)
            seen.append(i)
    assert sorted(seen) == list(range(len(examples)))


# ------------------------------------------------------------------ data stats: lengths for a fill


def _total_fill(sim: packing.Simulation, caps: dict[str, int]) -> float:
    return sum(sim.fill[k] * caps[k] for k in caps) / sum(caps.values())


def test_suggested_lengths_reach_the_fill():
    rng = np.random.default_rng(4)
    count = 1500
    token_lengths = {"inputs": np.minimum(rng.lognormal(5.3, 0.7, count).astype(int) + 1, 3000),
                     "targets": np.minimum(rng.lognormal(3.5, 0.6, count).astype(int) + 1, 600)}
    result = data_inspect.suggest_lengths(token_lengths, 0.9, max_truncated=0.01)
    best = result["suggestion"]
    assert best is not None and best == result["candidates"][0]
    caps = {"inputs": best["inputs"], "targets": best["targets"]}
    sim = packing.simulate(token_lengths, caps)
    assert _total_fill(sim, caps) >= 0.9
    assert best["fill"]["total"] == pytest.approx(_total_fill(sim, caps))
    assert max(sim.truncated.values()) <= 0.01 * count
    # Nothing in the grid with shorter rows reaches the fill without cutting more examples.
    shorter = 0
    for inputs, targets in itertools.product(data_inspect.INPUT_LENGTH_CANDIDATES, range(64, 4096, 64)):
        if inputs + targets < best["inputs"] + best["targets"]:
            other = {"inputs": inputs, "targets": targets}
            sim_other = packing.simulate(token_lengths, other)
            assert _total_fill(sim_other, other) < 0.9 or max(sim_other.truncated.values()) > 0.01 * count
            shorter += 1
    assert shorter > 0
    # Examples of those lengths packed for real fill the rows as simulated.
    features = {k: [np.ones(min(n, caps[k]), np.int32) for n in v] for k, v in token_lengths.items()}
    rows = packing.pack_block(features, caps)
    for k in caps:
        assert float(np.mean(rows[k] != 0)) == pytest.approx(best["fill"][k])
    # An unreachable fill gives no suggestion, and the closest candidate.
    none = data_inspect.suggest_lengths(token_lengths, 1.0)
    assert none["suggestion"] is None and none["closest"]["fill"]["total"] < 1.0
    with pytest.raises(UserError, match="fill=1.5"):
        data_inspect.suggest_lengths(token_lengths, 1.5)
