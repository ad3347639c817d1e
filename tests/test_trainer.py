"""Train step, optimizer and checkpoint round trip on a tiny model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax import checkpoints as ckpt_lib
from flan_jax import optim, partitioning, train_state
from flan_jax import step as step_lib
from flan_jax.model import Transformer

LENGTHS = {"inputs": 16, "targets": 8}


def _fixed_batch(vocab: int, batch: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    enc = rng.integers(2, vocab, (batch, LENGTHS["inputs"])).astype(np.int32)
    tgt = rng.integers(2, vocab, (batch, LENGTHS["targets"])).astype(np.int32)
    enc[:, -3:] = 0  # some padding
    tgt[:, -2:] = 0
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": enc,
        "decoder_input_tokens": dec_in,
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": (tgt > 0).astype(np.float32),
    }


def _copy(tree):
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)


@pytest.fixture(scope="module")
def build(tiny_config):
    """build(scan_layers) -> (config, model, step_fn, params, opt_state): the tiny
    model in that layer layout, its initial state and its compiled train step.

    Each layout is initialised and compiled once for all the tests here; every
    call returns fresh copies of params and opt_state, which the step donates.
    `build.partitioner` is the (one-device) partitioner they use.
    """
    part = partitioning.Partitioner()
    tx = optim.adafactor(learning_rate=1e-2)
    built = {}

    def build(scan_layers: bool = False):
        if scan_layers not in built:
            config = dataclasses.replace(tiny_config, scan_layers=scan_layers)
            model, params, opt_state = step_lib.initialize(Transformer(config), tx, part, LENGTHS, seed=0)
            built[scan_layers] = config, model, step_lib.make_train_step(model, tx, part), params, opt_state
        config, model, step_fn, params, opt_state = built[scan_layers]
        return config, model, step_fn, _copy(params), _copy(opt_state)

    build.partitioner = part
    return build


@pytest.fixture
def setup(build, tiny_config):
    _, _, step_fn, params, opt_state = build(scan_layers=False)
    return build.partitioner, step_fn, params, opt_state, tiny_config


def test_adafactor_steps_lower_the_loss(setup):
    part, step_fn, params, opt_state, cfg = setup
    batch = part.shard_batch(_fixed_batch(cfg.vocab_size))
    rng = jax.random.key(0)
    losses = []
    for step in range(8):
        params, opt_state, metrics = step_fn(params, opt_state, batch, rng, jnp.asarray(step))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[0] > np.log(cfg.vocab_size) * 0.8  # starts near uniform
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_checkpoint_round_trip_is_exact(setup, tmp_path):
    part, step_fn, params, opt_state, cfg = setup
    batch = part.shard_batch(_fixed_batch(cfg.vocab_size))
    for step in range(2):  # non-trivial optimizer statistics
        params, opt_state, _ = step_fn(params, opt_state, batch, jax.random.key(0), jnp.asarray(step))
    ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt", ckpt_lib.CheckpointConfig(best_metric=None))
    ckpt.save(2, params, opt_state, {"step": 2, "note": "x"})
    ckpt.wait()
    restored_params, restored_opt, meta = ckpt.restore(
        2, ckpt_lib.abstract_like(params), ckpt_lib.abstract_like(opt_state)
    )
    assert meta == {"step": 2, "note": "x"}
    assert jax.tree.structure(restored_params) == jax.tree.structure(params)
    assert jax.tree.structure(restored_opt) == jax.tree.structure(opt_state)
    for a, b in zip(jax.tree.leaves(params) + jax.tree.leaves(opt_state),
                    jax.tree.leaves(restored_params) + jax.tree.leaves(restored_opt)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.dtype == b.dtype
    # Saving the same step again never overwrites it.
    ckpt.save(2, jax.tree.map(jnp.zeros_like, params), opt_state, {"step": 2})
    ckpt.wait()
    again, _ = ckpt.restore_params(2, ckpt_lib.abstract_like(params))
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(again)[0]), np.asarray(jax.tree.leaves(params)[0])
    )
    ckpt.close()


def test_retention_keeps_best_and_last(tmp_path, setup):
    _, _, params, opt_state, _ = setup
    config = ckpt_lib.CheckpointConfig(keep_last=1, keep_best=1, best_metric="eval/acc")
    ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt", config)
    for step, acc in [(1, 10.0), (2, 50.0), (3, 20.0), (4, None), (5, 30.0)]:
        ckpt.save(step, params, opt_state, {"step": step}, metrics={"eval/acc": acc} if acc else None)
        ckpt.wait()
    assert ckpt.best_step() == 2
    assert ckpt.all_steps() == [2, 5]
    ckpt.close()


def test_cross_entropy_matches_numpy():
    from flan_jax.losses import cross_entropy_loss

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = np.array([[1, 2, 0], [4, 0, 0]])
    weights = (targets > 0).astype(np.float32)
    loss, metrics = cross_entropy_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), z_loss=0.0)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(np.take_along_axis(log_probs, targets[..., None], -1)[..., 0] * weights).sum() / weights.sum()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    assert float(metrics["num_tokens"]) == 3.0
    assert float(metrics["correct"]) == ((logits.argmax(-1) == targets) * weights).sum()


def test_correct_counts_the_tokens_whose_target_is_the_top_logit():
    from flan_jax.losses import cross_entropy_loss

    logits = np.random.default_rng(2).normal(size=(4, 50, 7)).astype(np.float32)
    targets = np.random.default_rng(3).integers(0, 7, (4, 50))
    targets[:, :20] = logits[:, :20].argmax(-1)  # some hits for sure
    weights = np.ones_like(targets, np.float32)
    weights[0] = 0  # not counted
    _, metrics = cross_entropy_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    want = ((logits.argmax(-1) == targets) * weights).sum()
    assert want >= 60 and float(metrics["correct"]) == want


@pytest.mark.parametrize("saved_scanned", [True, False], ids=["saved_scanned", "saved_unrolled"])
def test_resume_converts_between_scanned_and_unrolled_checkpoints(tmp_path, tiny_config, build, saved_scanned):
    """A run saved with one layer layout resumes with the other: parameters and
    Adafactor state convert, and the next step equals continuing in the saved layout."""
    from flan_jax import formats
    from flan_jax.model import scan

    part = build.partitioner
    batch = part.shard_batch(_fixed_batch(tiny_config.vocab_size))

    config, model, step_fn, params, opt_state = build(saved_scanned)
    for i in range(2):
        params, opt_state, _ = step_fn(params, opt_state, batch, jax.random.key(0), jnp.asarray(i))
    ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt", ckpt_lib.CheckpointConfig(best_metric=None))
    ckpt.save(2, params, opt_state, {"step": 2, "model_config": dataclasses.asdict(config)})
    ckpt.wait()
    # Continue in the saved layout: the reference.
    want, _, _ = step_fn(params, opt_state, batch, jax.random.key(0), jnp.asarray(2))

    _, other_model, other_step, other_params, other_opt = build(not saved_scanned)
    with part.activate():
        state = train_state.restore(ckpt, 2, other_model, train_state.TrainState(0, other_params, other_opt))
    restored, restored_opt, meta = state.params, state.opt_state, state.meta.to_dict()
    assert meta["step"] == 2
    assert scan.is_scanned(restored) == (not saved_scanned)
    assert jax.tree.structure(restored_opt) == jax.tree.structure(other_opt)
    got, _, _ = other_step(restored, restored_opt, batch, jax.random.key(0), jnp.asarray(2))
    for a, b in zip(jax.tree.leaves(scan.to_layout(jax.device_get(got), saved_scanned)), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # Inference-side loading converts too.
    loaded = formats.load_checkpoint(str(tmp_path / "ckpt" / "2"), config=dataclasses.replace(config, scan_layers=not saved_scanned))
    assert scan.is_scanned(loaded.params) == (not saved_scanned)
    ckpt.close()
