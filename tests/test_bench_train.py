"""`flan-jax bench train` (without TensorFlow, SeqIO, t5 or clu) and the FLOPs count behind MFU."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from flan_jax import flops
from flan_jax.model import T5Config, Transformer

# Runs the CLI with the data stack made unimportable, as on a GPU machine
# where only jax, flax, optax, orbax and gin are installed.
BLOCKED_RUN = textwrap.dedent("""
    import sys

    # None in sys.modules makes `import x` fail and find_spec(x) answer None,
    # as for a package that is not installed.
    for name in ("tensorflow", "tensorflow_text", "seqio", "t5", "clu", "tasks"):
        sys.modules[name] = None
    from flan_jax import cli
    cli.main(sys.argv[1:])
""")


def _bench(tmp_path, *flags):
    args = [
        "bench", "train", "--gin_file=models/tiny.gin", "--gin.T5Config.scan_layers=True",
        "--batch_size=4", "--lengths=32,16", "--steps=2", f"--json_out={tmp_path / 'out.json'}", *flags,
    ]
    result = subprocess.run([sys.executable, "-c", BLOCKED_RUN, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout, json.loads((tmp_path / "out.json").read_text())


def test_bench_train_runs_without_the_data_stack_and_reports_figures(tmp_path):
    out, results = _bench(tmp_path, "--layers=1,6", f"--profile_dir={tmp_path / 'profile'}")
    assert "peak for MFU" in out and "compile time flan-jax, 6+6 layers / flan-jax, 1+1 layers" in out
    assert [r["name"] for r in results] == ["flan-jax, 1+1 layers", "flan-jax, 6+6 layers"]
    for r in results:
        assert r["compile_seconds"] > 0 and r["step_seconds"] > 0 and 0 < r["mfu"] < 1
        assert r["real_tokens_per_sec"] < r["tokens_per_sec"]  # packed rows carry padding
        assert r["peak_memory_bytes"] > 0
    # The profile is summed by model part, forward and backward.
    assert "by model part:" in out and "encoder mlp (backward)" in out and "optimizer" in out


def test_bench_train_compares_with_transformers(tmp_path):
    pytest.importorskip("transformers")
    out, results = _bench(tmp_path, "--compare_hf")
    assert results[-1]["name"].startswith("transformers") and results[-1]["tokens_per_sec"] > 0
    assert "flan-jax / transformers tokens/s:" in out


def test_compile_only_plans_xxl_on_an_fsdp_mesh_it_does_not_have(tmp_path):
    """Flan-T5 XXL (11B parameters) on 8 fake devices, FSDP, remat: the step compiles from shapes
    alone and each device holds an eighth of the parameters (the relative-position tables, tiny,
    are replicated) and of their factored Adafactor statistics."""
    from flan_jax import formats
    from flan_jax.model import T5Config

    args = [
        "bench", "train", "--gin_file=models/flan_t5_xxl.gin", "--gin_file=partitioning/fsdp.gin",
        "--gin.T5Config.remat_policy='full'", "--batch_size=64", "--compile_only", "--devices=8",
        f"--json_out={tmp_path / 'plan.json'}",
    ]
    result = subprocess.run([sys.executable, "-c", BLOCKED_RUN, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    [plan] = json.loads((tmp_path / "plan.json").read_text())
    assert "nothing allocated" in result.stdout and "8 x cpu" in result.stdout
    config = T5Config(vocab_size=32128, emb_dim=4096, num_heads=64, head_dim=64, num_encoder_layers=24,
                      num_decoder_layers=24, mlp_dim=10240, mlp_activations=("gelu", "linear"),
                      logits_via_embedding=False)
    shapes = jax.tree_util.tree_leaves_with_path(formats.abstract_params(config))
    replicated = sum(4 * x.size for path, x in shapes if "relpos_bias" in jax.tree_util.keystr(path))
    total = sum(4 * x.size for _, x in shapes)
    assert total > 44e9  # float32 parameters of an 11B model
    assert plan["devices"] == 8 and plan["params_bytes"] == (total - replicated) // 8 + replicated
    assert 0 < plan["opt_state_bytes"] < plan["params_bytes"] / 100
    assert plan["compile_seconds"] > 0 and plan["xla_temp_bytes"] > 0


@pytest.mark.parametrize("activations", [("gelu", "linear"), ("relu",)])
def test_model_flops_match_what_xla_counts(activations):
    """The analytic count equals XLA's count of the forward pass's matmul FLOPs."""
    config = T5Config(
        vocab_size=512, emb_dim=64, num_heads=4, head_dim=16, num_encoder_layers=2, num_decoder_layers=3,
        mlp_dim=256, dropout_rate=0.0, mlp_activations=activations,
    )
    module = Transformer(config)
    enc, dec = jnp.ones((2, 48), jnp.int32), jnp.ones((2, 16), jnp.int32)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), enc, dec, dec, enable_dropout=False))

    compiled = jax.jit(lambda p: module.apply(p, enc, dec, dec, enable_dropout=False)).lower(params).compile()
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    ours = 2 * flops.forward_flops_per_example(config, 48, 16)
    # XLA counts every op (softmax, norms, the relative-position one-hot
    # product); the matmuls we count are all but a few percent of it.
    assert 0.85 * xla["flops"] < ours <= xla["flops"], (ours, xla["flops"])
    assert flops.train_flops_per_step(config, 2, 48, 16) == 3 * ours


def test_published_peaks_are_looked_up_by_device_kind():
    @dataclasses.dataclass
    class FakeDevice:
        device_kind: str
        platform: str = "gpu"

    assert flops.published_peak_flops(FakeDevice("NVIDIA H100 80GB HBM3")) == 989.4e12
    assert flops.published_peak_flops(FakeDevice("NVIDIA H100 PCIe")) == 756e12
    assert flops.published_peak_flops(FakeDevice("NVIDIA A100-SXM4-80GB")) == 312e12
    assert flops.published_peak_flops(FakeDevice("TPU v5 lite")) == 197e12
    assert flops.published_peak_flops(FakeDevice("TPU v5p")) == 459e12
    assert flops.published_peak_flops(FakeDevice("Some new chip")) is None


def _lora(config):
    from flan_jax.model.lora import LoraConfig

    return dataclasses.replace(config, lora=LoraConfig(rank=4), frozen_dtype="bfloat16")


def _lora_params(layers):
    """Adapters of the tiny model with `layers`+`layers` layers: 3 attention blocks a layer pair
    (encoder self, decoder self, cross), each with q and v kernels [32, 32] and A [32, 4], B [4, 32]."""
    return 3 * layers * 2 * (32 * 4 + 4 * 32)


def test_plan_with_lora_splits_the_frozen_base_from_the_adapters(tiny_config):
    """The plan counts a bf16 frozen base and float32 adapters apart, and the
    optimizer state it holds is Adafactor's for the adapters alone."""
    from flan_jax import formats, optim, peft
    from flan_jax.bench import plan as bench_plan

    config = _lora(tiny_config)
    plan = bench_plan.plan_flan_jax(config, 2, {"inputs": 16, "targets": 8})
    assert plan.trained_params == _lora_params(2)
    assert plan.frozen_params == sum(x.size for x in jax.tree.leaves(formats.abstract_params(tiny_config)))
    assert plan.frozen_params_bytes == 2 * plan.frozen_params and plan.trained_params_bytes == 4 * plan.trained_params
    assert 0 < plan.trained_params_bytes < plan.frozen_params_bytes
    assert plan.params_bytes == plan.frozen_params_bytes + plan.trained_params_bytes
    adapters = peft.abstract_adapters(config, formats.abstract_params(tiny_config))
    adapter_state = jax.eval_shape(optim.adafactor().init, adapters)
    assert plan.opt_state_bytes == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(adapter_state))
    assert plan.xla_peak_bytes > plan.params_bytes
    assert any("frozen base" in line and "trained adapters" in line for line in plan.lines())


def test_peft_compare_measures_adapters_against_full_finetuning(tiny_config):
    from flan_jax import formats
    from flan_jax.bench import peft as bench_peft

    base = dataclasses.replace(tiny_config, num_encoder_layers=1, num_decoder_layers=1)  # compiles twice: keep it small
    full, adapters = bench_peft.compare_peft(_lora(base), 2, {"inputs": 16, "targets": 8}, steps=1, rounds=1)
    assert full.trained_params == sum(x.size for x in jax.tree.leaves(formats.abstract_params(base)))
    assert adapters.trained_params == _lora_params(1)
    # Steps saved by the Checkpointer: adapters and their state, against everything.
    assert 0 < adapters.checkpoint_bytes < full.checkpoint_bytes
    assert full.step_seconds > 0 and adapters.step_seconds > 0 and adapters.peak_memory_bytes > 0
    assert "adapters / full" in bench_peft.peft_table(full, adapters)[0]
