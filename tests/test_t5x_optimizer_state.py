"""Finetuning continues the init checkpoint's optimizer state, as T5X's finetuning does: a T5X
checkpoint's Adafactor second moments and step, a flan-jax run's optimizer state.

The reference below is Adafactor as the paper (Shazeer & Stern, 2018) and
T5X's defaults define it, written out in numpy with T5X's conventions: a
matrix's row statistics average over the larger of its two dimensions (the
second on a tie), and the moments decay by 1 - (step + 1)**-0.8 where step
counts the updates already made.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
import tensorstore as ts

from flan_jax import checkpoints as ckpt_lib
from flan_jax import formats, optim, partitioning, train_state
from flan_jax import step as step_lib
from flan_jax.errors import UserError
from flan_jax.model import T5Config, Transformer, scan

FIXTURE = Path(os.environ.get("FLAN_JAX_FIXTURES_DIR", Path(__file__).resolve().parents[2] / "shared" / "fixtures")) / "t5x"
LAYOUTS = ("legacy_tensorstore_msgpack", "default_orbax")
CONFIG = T5Config(vocab_size=256, emb_dim=32, num_heads=2, head_dim=16, num_encoder_layers=2, num_decoder_layers=2,
                  mlp_dim=64, mlp_activations=("gelu", "linear"), dropout_rate=0.0, logits_via_embedding=False)


def reference_update(param, grad, stats, step, lr=1e-3):
    """One Adafactor update (T5X defaults: factored at >= 128, clipping 1, relative step, eps 1e-30/1e-3)."""
    decay = 1.0 - (step + 1.0) ** -0.8
    grad_sqr = grad**2 + 1e-30
    if param.ndim == 2 and np.sort(param.shape)[-2] >= 128:
        d1, d0 = np.argsort(param.shape, kind="stable")[-2:]  # row axis, column axis
        v_row = decay * stats["v_row"] + (1 - decay) * grad_sqr.mean(axis=d0)
        v_col = decay * stats["v_col"] + (1 - decay) * grad_sqr.mean(axis=d1)
        row = np.expand_dims((v_row / v_row.mean()) ** -0.5, d0)
        col = np.expand_dims(v_col**-0.5, d1)
        y = grad * row * col
    else:
        y = grad * (decay * stats["v"] + (1 - decay) * grad_sqr) ** -0.5
    y = y / max(1.0, np.sqrt(np.mean(y**2)))
    return -lr * max(np.sqrt(np.mean(param**2)), 1e-3) * y


def t5x_statistics(shape, rng):
    """T5X's param_states entry for a parameter: factored rows/columns or a full v, size-1 placeholders."""
    one = np.zeros((1,), np.float32)
    if len(shape) == 2 and sorted(shape)[-2] >= 128:
        d1, d0 = np.argsort(shape, kind="stable")[-2:]
        return {"v_row": rng.uniform(0.1, 2, np.delete(shape, d0)).astype(np.float32),
                "v_col": rng.uniform(0.1, 2, np.delete(shape, d1)).astype(np.float32), "v": one, "m": one}
    return {"v_row": one, "v_col": one, "v": rng.uniform(0.1, 2, shape).astype(np.float32), "m": one}


@pytest.mark.parametrize("step", [20, 100_000])
def test_next_update_is_the_one_t5x_makes(step):
    """Square, wide, tall, small and vector parameters: after the statistics are put in, optax's
    next update equals the reference Adafactor update from the same statistics and step."""
    rng = np.random.default_rng(0)
    shapes = {"square": (128, 128), "wide": (128, 256), "tall": (384, 128), "small": (200, 64), "scale": (64,)}
    params = {k: {"kernel": rng.normal(size=s).astype(np.float32)} for k, s in shapes.items()}
    grads = {k: {"kernel": (rng.normal(size=s) * rng.uniform(0.01, 3, s[-1:])).astype(np.float32)}
             for k, s in shapes.items()}
    stats = {k: {"kernel": t5x_statistics(s, rng)} for k, s in shapes.items()}
    tx = optim.adafactor()
    state = optim.with_t5x_statistics(jax.tree.map(np.asarray, tx.init(params)), stats, step)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    for name in shapes:
        p, g, s = params[name]["kernel"], grads[name]["kernel"], stats[name]["kernel"]
        np.testing.assert_allclose(updates[name]["kernel"], reference_update(p, g, s, step), rtol=2e-5, atol=1e-10,
                                   err_msg=name)
        assert int(new_state[name]["kernel"][0].count) == step + 1
    # Continuing matters: from fresh statistics the update is another one.
    fresh, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert not np.allclose(fresh["wide"]["kernel"], updates["wide"]["kernel"], rtol=1e-2)


def test_mismatched_statistics_are_named():
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": np.zeros((128, 256), np.float32)}}
    state = jax.tree.map(np.asarray, optim.adafactor().init(params))
    wrong = {"dense": {"kernel": t5x_statistics((128, 384), rng)}}  # another parameter's shape
    with pytest.raises(ValueError, match=r"dense/kernel: T5X's Adafactor v_col is \(384,\), this optimizer's is \(256,\)"):
        optim.with_t5x_statistics(state, wrong, 5)
    with pytest.raises(ValueError, match="dense/kernel: no Adafactor statistics"):
        optim.with_t5x_statistics(state, {"other": {}}, 5)


def _init_from(path, config, tx, init_optimizer_state=True):
    model, params, opt_state = step_lib.initialize(
        Transformer(config), tx, partitioning.Partitioner(), {"inputs": 16, "targets": 8}, seed=0)
    state = train_state.load_pretrained(
        train_state.Pretrained(path, init_optimizer_state), model, tx, train_state.TrainState(0, params, opt_state))
    return state.params, state.opt_state


def _zarr(layout_dir: Path, name: str) -> np.ndarray:
    """One array of the legacy layout read straight from its zarr directory."""
    # tensorstore refuses paths with '..' (as FLAN_JAX_FIXTURES_DIR has under tests/run.sh).
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.abspath(layout_dir / name)}}
    return np.asarray(ts.open(spec, read=True).result().read().result())


@pytest.mark.skipif(not FIXTURE.exists(), reason="T5X fixture not found")
def test_finetune_from_t5x_continues_its_adafactor_state():
    """Both layouts, layers scanned or not: every parameter's second moments are T5X's, the decay
    continues from T5X's step 20, and the learning-rate schedule starts at 0."""
    legacy = FIXTURE / "legacy_tensorstore_msgpack" / "checkpoint_20"
    base = formats.load_checkpoint(str(legacy)).config
    names = {
        ("encoder", "layers_1", "mlp", "wi_0", "kernel"): "state.param_states.encoder.layers_1.mlp.wi_0.kernel.v",
        ("decoder", "relpos_bias", "rel_embedding"): "state.param_states.decoder.relpos_bias.rel_embedding.v",
    }
    expected = {path: _zarr(legacy, name) for path, name in names.items()}
    for layout in LAYOUTS:
        for scan_layers in (False, True):
            config = dataclasses.replace(base, scan_layers=scan_layers)
            _, opt_state = _init_from(str(FIXTURE / layout / "checkpoint_20"), config, optim.adafactor())
            factored = [s for chain in jax.tree.leaves(opt_state, is_leaf=lambda x: type(x) is tuple) for s in chain]
            counts = [np.asarray(s.count) for s in factored if hasattr(s, "v_row")]
            schedule_counts = [np.asarray(s.count) for s in factored if type(s).__name__ == "ScaleByScheduleState"]
            assert len(counts) == (29 if scan_layers else 52)  # 52 parameters; scanned, 9 per encoder and 14 per decoder layer
            assert all((c == 20).all() for c in counts) and all((c == 0).all() for c in schedule_counts)
            for path, want in expected.items():
                node = opt_state
                for key in path:
                    node = node["layers" if scan_layers and key.startswith("layers_") else key]
                v = np.asarray(node[0].v)
                if scan_layers and "layers_1" in path:
                    v = v[1]
                np.testing.assert_array_equal(v, want, err_msg=f"{layout} {path}")
    # Opting out, or a checkpoint without optimizer state, starts from zero.
    _, fresh = _init_from(str(legacy), base, optim.adafactor(), init_optimizer_state=False)
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(fresh))


@pytest.mark.skipif(not FIXTURE.exists(), reason="T5X fixture not found")
def test_differently_factored_optimizer_is_refused():
    legacy = FIXTURE / "legacy_tensorstore_msgpack" / "checkpoint_20"
    config = formats.load_checkpoint(str(legacy)).config
    # Factoring its 64-wide matrices: T5X kept full second moments for them.
    with pytest.raises(UserError, match=r"cannot continue its Adafactor state: .*v_row is \(1,\), this optimizer's is "
                                        r"\(\d+,\).*TrainConfig.init_optimizer_state=False"):
        _init_from(str(legacy), config, optim.adafactor(min_dim_size_to_factor=16))


def test_finetune_from_a_flan_jax_run_continues_its_optimizer_state(tmp_path):
    """A run's saved Adafactor state comes back (scanned or not, whatever the run used) with the
    learning-rate schedule restarted; a converted checkpoint (params only) starts afresh."""
    config = dataclasses.replace(CONFIG, scan_layers=True)
    tx = optim.adafactor(warmup_steps=10)
    params = jax.tree.map(np.asarray, nn.unbox(Transformer(config).init(
        jax.random.key(0), *[np.ones((1, 4), np.int32)] * 3)["params"]))
    rng = np.random.default_rng(0)
    state = tx.init(params)
    for _ in range(3):  # three updates: non-zero moments, counts at 3
        grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
        _, state = tx.update(grads, state, params)
    run = tmp_path / "run"
    saver = ckpt_lib.Checkpointer(str(run / "checkpoints"), ckpt_lib.CheckpointConfig(best_metric=None))
    saver.save(3, params, state, {"step": 3, "model_config": dataclasses.asdict(config), "vocabulary": None})
    saver.wait()
    saver.close()
    saved = jax.tree.map(np.asarray, state)
    for scan_layers in (True, False):
        _, opt_state = _init_from(str(run), dataclasses.replace(config, scan_layers=scan_layers), tx)
        opt_state = jax.tree.map(np.asarray, opt_state)
        chains = lambda tree: jax.tree.leaves(tree, is_leaf=lambda x: type(x) is tuple)  # noqa: E731
        pairs = list(zip(chains(scan.to_layout(saved, scan_layers)), chains(opt_state), strict=True))
        assert len(pairs) == (29 if scan_layers else 52)
        for want_chain, got_chain in pairs:
            for want, got in zip(want_chain, got_chain, strict=True):
                if isinstance(want, optax.ScaleByScheduleState):
                    assert not got.count.any() and want.count.all()
                else:
                    jax.tree.map(np.testing.assert_array_equal, got, want)
            assert (want_chain[0].count == 3).all() and want_chain[0].v.any()
    with pytest.raises(UserError, match=r"optimizer state entry .*TrainConfig.init_optimizer_state=False"):
        _init_from(str(run), config, optim.adafactor(min_dim_size_to_factor=16))  # factors what the run did not
    converted = formats.save_flan_jax(str(tmp_path / "converted"), config, params, None, 3)
    _, fresh = _init_from(converted, config, tx)
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(fresh))
