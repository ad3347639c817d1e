"""Prompt tuning (T5Config.prompt_length): the model's prompt over the slot
positions, packing, initialisation from embeddings, the data path and a
train step that updates the prompt alone."""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf
from conftest import pack_row
from flax import traverse_util

import tasks
from flan_jax import batching, data, evaluation, inference, optim, partitioning, peft
from flan_jax import step as step_lib
from flan_jax.errors import UserError
from flan_jax.model import Transformer

tasks.register()  # Every task module's tasks, registered with SeqIO (once per process).

P = 3
SLOT = data.PROMPT_SLOT_ID
TASK = "builtin_boolean_expressions_zs_noopt"  # short inputs: several per packed row


@pytest.fixture(scope="module")
def prompt_config(tiny_config):
    return dataclasses.replace(tiny_config, prompt_length=P)


def _init(config, seed: int = 0):
    ones = jnp.ones((1, 8), jnp.int32)
    variables = Transformer(config).init(jax.random.key(seed), ones, ones, ones, enable_dropout=False)
    return flax.linen.unbox(variables["params"])


def _example(rng: np.random.Generator, n: int, m: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(P slots + n - 1 random tokens + EOS, m - 1 random tokens + EOS)."""
    inputs = data.prepend_prompt_slots(np.append(rng.integers(2, vocab, n - 1), 1).astype(np.int32), P)
    return inputs, np.append(rng.integers(2, vocab, m - 1), 1).astype(np.int32)


def _shift_right(targets: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros_like(targets[..., :1]), targets[..., :-1]], axis=-1)


# ------------------------------------------------------------------ the model


def test_packed_logits_equal_unpacked_with_a_prompt(prompt_config):
    params = _init(prompt_config)
    apply = jax.jit(Transformer(prompt_config).apply, static_argnames="enable_dropout")
    rng = np.random.default_rng(0)
    examples = [_example(rng, n, m, prompt_config.vocab_size) for n, m in [(5, 4), (7, 3), (4, 5)]]
    enc, enc_seg, enc_pos = pack_row([x for x, _ in examples], 32)
    tgt, dec_seg, dec_pos = pack_row([y for _, y in examples], 14)
    dec_in = np.where(dec_pos == 0, 0, np.roll(tgt, 1, axis=1))  # seqio shifts right within each example
    # No positions: the model finds each segment's start from the segment ids.
    packed = np.asarray(apply({"params": params}, enc, dec_in, tgt, enc_seg, dec_seg, enable_dropout=False))
    other_prompt = traverse_util.unflatten_dict(
        {**traverse_util.flatten_dict(params), peft.PROMPT_PATH: params["encoder"]["prompt"]["prompt"] + 1.0}
    )
    for segment, (inputs, targets) in enumerate(examples, 1):
        alone = np.asarray(apply({"params": params}, inputs[None], _shift_right(targets[None]), targets[None],
                                 enable_dropout=False))
        rows = dec_seg[0] == segment
        np.testing.assert_allclose(packed[0, rows], alone[0], atol=1e-5, rtol=0)
        # ... and the prompt is what the slots read: another prompt, other logits.
        moved = apply({"params": other_prompt}, inputs[None], _shift_right(targets[None]), targets[None],
                      enable_dropout=False)
        assert np.abs(np.asarray(moved) - alone).max() > 1e-3


def test_prompt_starts_as_embedding_rows_and_is_redrawn_from_loaded_ones(tiny_config):
    # A vocabulary above T5X's population of 5000: rows come from its first 5000 ids.
    config = dataclasses.replace(tiny_config, vocab_size=6000, emb_dim=8, prompt_length=20)
    params = _init(config)

    def row_ids(prompt, embedding) -> list[int]:
        matches = [np.flatnonzero((np.asarray(embedding) == np.asarray(row)).all(axis=1)) for row in prompt]
        assert all(len(m) == 1 for m in matches), "a prompt row that is not an embedding row"
        return [int(m[0]) for m in matches]

    ids = row_ids(params["encoder"]["prompt"]["prompt"], params["token_embedder"]["embedding"])
    assert len(set(ids)) == len(ids) and max(ids) < 5000
    loaded = jax.random.normal(jax.random.key(7), params["token_embedder"]["embedding"].shape)  # "a pretrained base"
    params = {**params, "token_embedder": {"embedding": loaded}}
    redrawn = peft.init_prompt_from_embeddings(config, params, jax.random.key(1))
    prompt = redrawn["encoder"]["prompt"]["prompt"]
    assert prompt.shape == (20, 8) and prompt.dtype == jnp.float32
    assert max(row_ids(prompt, loaded)) < 5000
    assert redrawn["token_embedder"]["embedding"] is loaded
    assert peft.init_prompt_from_embeddings(tiny_config, params, jax.random.key(1)) is params  # no prompt: as is


# ------------------------------------------------------------------ the data path


def test_prepend_puts_exactly_the_slots_in_front():
    text = np.array([5, 6, 7, 1], np.int32)
    np.testing.assert_array_equal(data.prepend_prompt_slots(text, P), [SLOT] * P + [5, 6, 7, 1])
    np.testing.assert_array_equal(data.prepend_prompt_slots(tf.constant(text), P).numpy(), [SLOT] * P + [5, 6, 7, 1])
    assert data.text_lengths({"inputs": 10, "targets": 4}, P) == {"inputs": 10 - P, "targets": 4}
    with pytest.raises(UserError, match=r"task_feature_lengths\['inputs'\]=8 leaves no room for text"):
        data.text_lengths({"inputs": 8, "targets": 4}, 8)


def test_training_rows_start_every_segment_with_the_slots():
    lengths = {"inputs": 64, "targets": 32}
    plain = {"split": "train", "shuffle": False, "pack": False}
    with_slots = next(data.get_train_dataset(TASK, lengths, 8, prompt_length=P, **plain).as_numpy_iterator())
    shorter = {**lengths, "inputs": 64 - P}
    without = next(data.get_train_dataset(TASK, shorter, 8, **plain).as_numpy_iterator())
    # The same examples, each after P slots, within the same length: the text has P tokens less room.
    expected = np.concatenate([np.full((8, P), SLOT), without["encoder_input_tokens"]], axis=1)
    np.testing.assert_array_equal(with_slots["encoder_input_tokens"], expected)

    packed = next(data.get_train_dataset(TASK, lengths, 8, prompt_length=P, split="train").as_numpy_iterator())
    tokens, segments = packed["encoder_input_tokens"], packed["encoder_segment_ids"]
    assert segments.max() > 1  # several examples share rows
    for row, ids in zip(tokens, segments):
        for segment in range(1, ids.max() + 1):
            example = row[ids == segment]
            assert (example[:P] == SLOT).all() and example[P] != SLOT, example


def test_evaluation_inputs_carry_the_slots(prompt_config):
    lengths = {"inputs": 32, "targets": 16}
    examples = evaluation.load_task_examples(TASK, "validation", lengths, limit=4, prompt_length=P)
    assert all((ex["inputs"][:P] == SLOT).all() and len(ex["inputs"]) <= 32 for ex in examples.features)
    assert examples.text_length == 32 - P
    # A prompt-tuned model refuses inputs without slots (rather than overwrite their text).
    runner = inference.ModelRunner(Transformer(prompt_config))
    params = _init(prompt_config)
    targets = np.array([[5, 1, 0, 0]], np.int32)
    runner.score(params, batching.pad_rows([examples.features[0]["inputs"]], 1, 32), targets)
    with pytest.raises(ValueError, match="prompt slots"):
        runner.score(params, np.array([[7, 8, 9, 1]], np.int32), targets)


def test_infer_prompts_start_with_the_slots_within_the_input_length(prompt_config, monkeypatch):
    seen = []

    def fake_decode_fn(module, method, max_decode_length, **options):
        def decode(params, inputs):
            seen.append(np.asarray(inputs))
            return jnp.zeros((inputs.shape[0], max_decode_length), jnp.int32)
        return decode

    monkeypatch.setattr(inference, "decode_fn", fake_decode_fn)
    vocab = seqio.ByteVocabulary()
    model = inference.LoadedModel(Transformer(prompt_config), None, vocab, 0, "test")
    inference.generate(model, ["hi", "a much longer prompt"], max_input_length=16, max_decode_length=4)
    rows = {tuple(row[row > 0]) for row in seen[0]}
    # P slots, then the text cut to leave room for EOS within 16 tokens.
    expected = [(SLOT,) * P + tuple(vocab.encode(text)[: 16 - P - 1]) + (1,) for text in ("hi", "a much longer prompt")]
    assert rows == set(expected)
    with pytest.raises(UserError, match="--max_input_length=3 leaves no room"):
        inference.generate(model, ["hi"], max_input_length=P)


# ------------------------------------------------------------------ training


def test_a_train_step_updates_the_prompt_alone(prompt_config):
    lengths = {"inputs": 16, "targets": 8}
    part = partitioning.Partitioner()
    tx = optim.adafactor(learning_rate=1e-2)
    model, params, opt_state = step_lib.initialize(Transformer(prompt_config), tx, part, lengths, seed=0)
    rng = np.random.default_rng(0)
    enc = rng.integers(2, prompt_config.vocab_size, (4, 16)).astype(np.int32)
    enc[:, :P] = SLOT
    tgt = rng.integers(2, prompt_config.vocab_size, (4, 8)).astype(np.int32)
    batch = {"encoder_input_tokens": enc, "decoder_input_tokens": _shift_right(tgt), "decoder_target_tokens": tgt,
             "decoder_loss_weights": np.ones((4, 8), np.float32)}
    before = {k: np.array(v) for k, v in traverse_util.flatten_dict(params).items()}  # the step donates params
    step_fn = step_lib.make_train_step(model, tx, part)
    params, _, metrics = step_fn(params, opt_state, part.shard_batch(batch), jax.random.key(0), jnp.asarray(0))
    assert float(metrics["skipped"]) == 0.0
    after = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    assert after.keys() == before.keys()
    for path, value in after.items():
        if path == peft.PROMPT_PATH:
            assert not np.array_equal(value, before[path]), "the prompt did not train"
        else:
            np.testing.assert_array_equal(value, before[path], err_msg="/".join(path))
