"""Training on a sharded mesh (8 fake CPU devices) matches training on one device."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from flan_jax import optim, partitioning, trainer
    from flan_jax.model import T5Config, Transformer

    config = T5Config(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8, num_encoder_layers=2,
                      num_decoder_layers=2, mlp_dim=64, dropout_rate=0.0)
    lengths = {"inputs": 16, "targets": 8}
    rng = np.random.default_rng(0)
    tgt = rng.integers(2, 128, (8, 8)).astype(np.int32)
    batch = {
        "encoder_input_tokens": rng.integers(2, 128, (8, 16)).astype(np.int32),
        "decoder_target_tokens": tgt,
        "decoder_input_tokens": np.concatenate([np.zeros((8, 1), np.int32), tgt[:, :-1]], 1),
        "decoder_loss_weights": np.ones((8, 8), np.float32),
    }
    train_config = trainer.TrainConfig(model_dir="-", mixture_or_task_name="-", num_steps=3)

    def run(partitioner):
        tx = optim.adafactor(learning_rate=1e-2)
        model, params, opt_state = trainer.initialize(Transformer(config), tx, partitioner, lengths, seed=0)
        step = trainer.make_train_step(model, tx, train_config, partitioner)
        losses = []
        with partitioner.activate():
            for i in range(3):
                params, opt_state, metrics = step(params, opt_state, partitioner.shard_batch(batch),
                                                  jax.random.key(0), jnp.asarray(i))
                losses.append(float(metrics["loss"]))
        return losses, params

    single, params_1 = run(partitioning.Partitioner(devices=jax.devices()[:1]))
    sharded, params_8 = run(partitioning.Partitioner(model_parallel_size=2,
                            logical_axis_rules=partitioning.STANDARD_LOGICAL_AXIS_RULES))
    kernel = params_8["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model"), kernel.sharding
    assert len(kernel.sharding.device_set) == 8
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    print("losses", single, sharded)
""")


def test_sharded_training_matches_one_device():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "losses" in result.stdout
