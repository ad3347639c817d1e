"""One training step gives the same result on every mesh, layer layout, remat
policy and microbatch count (8 fake CPU devices, float32)."""

import textwrap

from conftest import run_on_8_devices

SCRIPT = textwrap.dedent("""
    import dataclasses
    import jax, jax.numpy as jnp
    from conftest import random_batch, relative_error as relative
    from flan_jax import optim, partitioning, step
    from flan_jax.model import T5Config, Transformer, scan

    BASE = T5Config(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8, num_encoder_layers=2,
                    num_decoder_layers=3, mlp_dim=64, dropout_rate=0.0)
    lengths = {"inputs": 16, "targets": 8}
    batch = random_batch(32, lengths["inputs"], lengths["targets"], BASE.vocab_size)
    RULES = {"dp": partitioning.DATA_PARALLEL_LOGICAL_AXIS_RULES, "fsdp": partitioning.FSDP_LOGICAL_AXIS_RULES}

    def one_step(mesh_shape, rules, microbatches=1, devices=None, **model_kwargs):
        config = dataclasses.replace(BASE, **model_kwargs)
        tx = optim.adafactor(learning_rate=1e-2)
        partitioner = partitioning.Partitioner(mesh_shape, RULES[rules], devices=devices)
        # The shardings step.initialize gives (it calls abstract_state), without
        # compiling an initialisation whose weights would be replaced below.
        model = step.abstract_state(Transformer(config), tx, partitioner, lengths)[0]
        # The same starting weights everywhere: the 1x1 reference's, in this layout.
        params = jax.device_put(scan.to_layout(REFERENCE_INIT, config.scan_layers), model.params_shardings)
        with partitioner.activate():
            opt_state = jax.jit(tx.init, out_shardings=model.opt_state_shardings)(params)
            train_step = step.make_train_step(model, tx, partitioner, num_microbatches=microbatches)
            params, opt_state, metrics = train_step(params, opt_state, partitioner.shard_batch(batch),
                                                    jax.random.key(0), jnp.asarray(0))
        return float(metrics["loss"]), params, opt_state

    REFERENCE_INIT = jax.device_get(step.initialize(Transformer(BASE), optim.adafactor(),
        partitioning.Partitioner(devices=jax.devices()[:1]), lengths, seed=0)[1])
    ref_loss, ref_params, _ = one_step((1, 1), "dp", devices=jax.devices()[:1])
    ref_params = jax.device_get(ref_params)

    cases = {
        "8x1 data parallel": dict(mesh_shape=(8, 1), rules="dp"),
        "8-way FSDP": dict(mesh_shape=(8, 1), rules="fsdp"),
        "4x2 (FSDP x tensor)": dict(mesh_shape=(4, 2), rules="fsdp"),
        "2x4 (FSDP x tensor)": dict(mesh_shape=(2, 4), rules="fsdp"),
        "scanned, 8-way FSDP": dict(mesh_shape=(8, 1), rules="fsdp", scan_layers=True),
        "remat full": dict(mesh_shape=(8, 1), rules="fsdp", remat_policy="full"),
        "remat dots": dict(mesh_shape=(8, 1), rules="fsdp", remat_policy="dots"),
        "4 microbatches, 8x1": dict(mesh_shape=(8, 1), rules="dp", microbatches=4),
        "4 microbatches, scanned 4x2": dict(mesh_shape=(4, 2), rules="fsdp", microbatches=4, scan_layers=True),
    }
    worst = 0.0
    for name, kwargs in cases.items():
        loss, params, opt_state = one_step(**kwargs)
        if name == "8-way FSDP":
            kernel = params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
            assert kernel.sharding.spec[0] == "data", kernel.sharding.spec  # ('model' has size 1 here)
            assert kernel.addressable_shards[0].data.shape == (4, 64)
            # Adafactor's statistics for it are split over 'data' too.
            stats = jax.tree.leaves(opt_state["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"])
            assert any(s.ndim and s.sharding.spec and s.sharding.spec[0] == "data" for s in stats), [s.sharding for s in stats]
        if name == "scanned, 8-way FSDP":
            kernel = params["decoder"]["layers"]["mlp"]["wo"]["kernel"]
            assert kernel.shape == (3, 64, 32) and kernel.sharding.spec[2] == "data", kernel.sharding.spec
            assert kernel.addressable_shards[0].data.shape == (3, 64, 4)
        if name == "2x4 (FSDP x tensor)":
            kernel = params["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
            assert tuple(kernel.sharding.spec) == ("data", "model"), kernel.sharding.spec
            assert kernel.addressable_shards[0].data.shape == (16, 16)
        params = scan.to_layout(jax.device_get(params), False)
        assert jax.tree.structure(params) == jax.tree.structure(ref_params), name
        loss_diff = abs(loss - ref_loss) / abs(ref_loss)
        param_diff = max(relative(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
        print(f"{name:32s} loss {loss:.7f} (rel diff {loss_diff:.1e}), params max rel diff {param_diff:.1e}")
        assert loss_diff <= 1e-5 and param_diff <= 1e-5, name
        worst = max(worst, loss_diff, param_diff)
    # The step changed the parameters (so equal parameters mean equal updates).
    init = jax.tree.leaves(REFERENCE_INIT)
    assert min(relative(a, b) for a, b in zip(jax.tree.leaves(ref_params), init)) > 1e-3
    print(f"reference loss {ref_loss:.7f}; all {len(cases)} cases within {worst:.1e}")
""")


def test_one_step_is_the_same_on_every_mesh_layout_and_microbatching():
    assert "all 9 cases within" in run_on_8_devices(SCRIPT)
