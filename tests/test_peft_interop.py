"""LoRA adapters in and out of Hugging Face PEFT, merging, and `flan-jax convert` with adapters."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from conftest import SMALL_MIXTURE
from flax import traverse_util

from flan_jax import cli, formats, peft
from flan_jax.errors import UserError
from flan_jax.formats import hf, hf_peft
from flan_jax.model import T5Config, Transformer
from flan_jax.model.lora import LORA_ATTENTION_MLP, LORA_QUERY_VALUE, LoraConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft_lib = pytest.importorskip("peft")

BASE = T5Config(
    vocab_size=128, emb_dim=32, num_heads=2, head_dim=16, num_encoder_layers=2, num_decoder_layers=3,
    mlp_dim=64, dropout_rate=0.0,
)
LORA = LoraConfig(rank=4, alpha=8.0)


def _hf_model(seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf.config_to_hf(BASE))).eval()
    # transformers 5.x ties lm_head to `shared` even with tie_word_embeddings=False.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(BASE.vocab_size, BASE.emb_dim) * 0.5)
    return model


def _base_params(model, config: T5Config):
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return hf.params_from_hf_state_dict(state, config)


def _batch():
    rng = np.random.default_rng(0)
    enc = rng.integers(2, BASE.vocab_size, (2, 12)).astype(np.int32)
    enc[1, 7:] = 0
    tgt = rng.integers(2, BASE.vocab_size, (2, 6)).astype(np.int32)
    dec = np.concatenate([np.zeros((2, 1), np.int32), tgt[:, :-1]], 1)
    return enc, dec, tgt


def _hf_logits(model) -> np.ndarray:
    enc, dec, _ = _batch()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0), decoder_input_ids=torch.tensor(dec))
    return out.logits.numpy()


def _logits(config: T5Config, params) -> np.ndarray:
    apply = lambda p: Transformer(config).apply({"params": p}, *_batch(), enable_dropout=False)  # noqa: E731
    return np.asarray(_jit_if_scanned(config, apply)(params))


def _jit_if_scanned(config: T5Config, fn):
    """Op by op, nn.scan is slow; unrolled, compiling costs more than it saves on a tiny model."""
    return jax.jit(fn) if config.scan_layers else fn


def _init(config: T5Config, seed: int = 0):
    ones = jnp.ones((1, 4), jnp.int32)
    init = _jit_if_scanned(config, Transformer(config).init)
    return nn.unbox(init(jax.random.key(seed), ones, ones, ones)["params"])


def _randomise_lora_b(params, seed: int = 1):
    """`params` with every lora_b random (it starts at zero), so that the adapters matter."""
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    flat = {
        path: jax.random.normal(next(keys), x.shape) * 0.05 if path[-1] == "lora_b" else x
        for path, x in traverse_util.flatten_dict(params).items()
    }
    return traverse_util.unflatten_dict(flat)


def _lora_model(targets=LORA_QUERY_VALUE, scan_layers: bool = False, seed: int = 0):
    """(HF base model, LoRA config, full flan-jax params: the HF base's weights plus random adapters)."""
    model = _hf_model(seed)
    config = dataclasses.replace(BASE, scan_layers=scan_layers, lora=dataclasses.replace(LORA, targets=targets))
    adapters = _randomise_lora_b(peft.trainable(config, _init(config)))
    return model, config, peft.combine(adapters, _base_params(model, config))


@pytest.mark.parametrize(
    "targets, target_modules",
    [
        (LORA_QUERY_VALUE, ["q", "v"]),
        (LORA_ATTENTION_MLP, ["k", "o", "q", "v", "wi_0", "wi_1", "wo"]),
        # Decoder self-attention alone: no module-name suffix says that, so full module paths.
        (("self_attention/query/kernel$",), [f"decoder.block.{i}.layer.0.SelfAttention.q" for i in range(3)]),
    ],
    ids=["q_v", "attention_mlp", "decoder_self_query"],
)
def test_adapter_written_by_flan_jax_loads_in_peft_with_the_same_logits(targets, target_modules, tmp_path):
    model, config, params = _lora_model(targets)
    ours = _logits(config, params)
    assert np.abs(ours - _logits(peft.base_config(config), peft.split(config, params)[1])).max() > 1e-2

    hf_peft.save_hf_peft(str(tmp_path), config, params, "google/flan-t5-small")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == target_modules
    assert (written["r"], written["lora_alpha"], written["base_model_name_or_path"]) == (4, 8, "google/flan-t5-small")
    loaded = hf_peft_lib.PeftModel.from_pretrained(model, str(tmp_path)).eval()
    np.testing.assert_allclose(_hf_logits(loaded), ours, atol=1e-4)

    # And back: the same adapters, on the same kernels.
    lora, adapters = hf_peft.load_hf_peft(str(tmp_path), BASE)
    assert (lora.rank, lora.scale) == (4, 2.0)
    back = dataclasses.replace(BASE, lora=lora)
    np.testing.assert_allclose(_logits(back, peft.combine(adapters, peft.split(config, params)[1])), ours, atol=1e-6)

    # Read for a scanned model: its patterns create adapters at exactly the stacked paths read.
    scanned = dataclasses.replace(BASE, scan_layers=True)
    lora, adapters = hf_peft.load_hf_peft(str(tmp_path), scanned)
    ones = jnp.ones((1, 4), jnp.int32)
    with_lora = dataclasses.replace(scanned, lora=lora)
    shapes = jax.eval_shape(Transformer(with_lora).init, jax.random.key(0), ones, ones, ones)
    created = traverse_util.flatten_dict(peft.trainable(with_lora, nn.unbox(shapes["params"])))
    assert {k: v.shape for k, v in created.items()} == {k: v.shape for k, v in traverse_util.flatten_dict(adapters).items()}


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_adapter_made_by_peft_reads_into_flan_jax_with_the_same_logits(use_rslora, tmp_path):
    model = _hf_model()
    base = {config.scan_layers: _base_params(model, config) for config in (BASE, dataclasses.replace(BASE, scan_layers=True))}
    peft_config = hf_peft_lib.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM", use_rslora=use_rslora
    )
    adapted = hf_peft_lib.get_peft_model(model, peft_config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    adapted.save_pretrained(str(tmp_path))
    want = _hf_logits(adapted)

    for scan_layers, base_params in base.items():
        config = dataclasses.replace(BASE, scan_layers=scan_layers)
        lora, adapters = hf_peft.load_hf_peft(str(tmp_path), config)
        assert lora.targets == LORA_QUERY_VALUE and lora.rank == 4
        assert lora.scale == pytest.approx(8 / 2 if use_rslora else 8 / 4)
        ours = _logits(dataclasses.replace(config, lora=lora), peft.combine(adapters, base_params))
        np.testing.assert_allclose(ours, want, atol=1e-4)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_merged_adapters_give_the_unmerged_logits(scan_layers):
    # flan-jax's initialisation: logits of a few units (f32 rounding grows with their size).
    config = dataclasses.replace(BASE, scan_layers=scan_layers, lora=dataclasses.replace(LORA, targets=LORA_ATTENTION_MLP))
    params = _randomise_lora_b(_init(config))
    unmerged = _logits(config, params)
    assert np.abs(unmerged - _logits(peft.base_config(config), peft.split(config, params)[1])).max() > 0.5
    merged_config, merged = peft.merge_lora(config, params)
    assert merged_config.lora is None
    assert not any(path[-1].startswith("lora") for path in traverse_util.flatten_dict(merged))
    np.testing.assert_allclose(_logits(merged_config, merged), unmerged, atol=1e-5)


def _convert(*argv: str) -> None:
    cli.main(["convert", *argv])


def test_convert_merges_an_adapter_directory_onto_its_base(tmp_path):
    model, config, params = _lora_model()
    want = _logits(config, params)
    model.save_pretrained(tmp_path / "base")
    hf_peft.save_hf_peft(str(tmp_path / "adapter"), config, params, None)

    _convert(str(tmp_path / "adapter"), str(tmp_path / "hf"), "--to=hf", f"--base={tmp_path / 'base'}")
    merged = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_allclose(_hf_logits(merged), want, atol=1e-4)

    _convert(str(tmp_path / "adapter"), str(tmp_path / "run"), f"--base={tmp_path / 'base'}")
    loaded = formats.load_checkpoint(str(tmp_path / "run"))
    assert loaded.config.lora is None
    np.testing.assert_allclose(_logits(loaded.config, loaded.params), want, atol=1e-5)

    _convert(str(tmp_path / "adapter"), str(tmp_path / "again"), "--to=hf_peft", f"--base={tmp_path / 'base'}")
    first, second = (hf.read_safetensors(str(tmp_path / d / "adapter_model.safetensors")) for d in ("adapter", "again"))
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)

    # For eval and continued training: onto the base in the configured layout; a different LoRA is refused.
    scanned = dataclasses.replace(BASE, scan_layers=True, lora=dataclasses.replace(LORA, dropout=0.1))
    onto = formats.load_checkpoint(str(tmp_path / "adapter"), base=str(tmp_path / "base"), config=scanned)
    assert onto.config == scanned and onto.params["encoder"]["layers"]["attention"]["query"]["lora_a"].shape == (2, 32, 4)
    with pytest.raises(UserError, match=r"differs from the configured LoraConfig .* in rank, targeted kernels$"):
        other = dataclasses.replace(BASE, lora=LoraConfig(rank=8, alpha=16.0, targets=LORA_ATTENTION_MLP))
        formats.load_checkpoint(str(tmp_path / "adapter"), base=str(tmp_path / "base"), config=other)


def test_convert_merges_a_lora_flan_jax_checkpoint_into_a_hf_model(tmp_path):
    _, config, params = _lora_model()
    if not any(path[-1] == "lora_a" for path in traverse_util.flatten_dict(formats.abstract_params(config))):
        pytest.skip("flan-jax checkpoints cannot hold LoRA adapters yet (formats.abstract_params)")
    formats.save_flan_jax(str(tmp_path / "run"), config, params, None, step=3)
    _convert(str(tmp_path / "run"), str(tmp_path / "hf"), "--to=hf")
    merged = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_allclose(_hf_logits(merged), _logits(config, params), atol=1e-4)


def _bad_dir(tmp_path, config_fields=None, extra_tensor=None):
    """A PEFT directory for BASE with the config fields changed and/or one extra tensor."""
    _, config, params = _lora_model()
    hf_peft.save_hf_peft(str(tmp_path), config, params, None)
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **(config_fields or {})}))
    if extra_tensor:
        weights = str(tmp_path / "adapter_model.safetensors")
        tensors = {**hf.read_safetensors(weights), extra_tensor: np.zeros((4, 32), np.float32)}
        safetensors.numpy.save_file(tensors, weights)
    return str(tmp_path)


def _one_line_error(directory: str) -> str:
    with pytest.raises(UserError) as error:
        hf_peft.load_hf_peft(directory, BASE)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_adapter_directories_are_one_line_each(tmp_path):
    unknown = "base_model.model.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.lora_A.weight"
    assert repr(unknown) in _one_line_error(_bad_dir(tmp_path / "unknown", extra_tensor=unknown))
    assert "peft_type 'PREFIX_TUNING'" in _one_line_error(_bad_dir(tmp_path / "prefix", {"peft_type": "PREFIX_TUNING"}))
    assert "use_dora=True is not supported" in _one_line_error(_bad_dir(tmp_path / "dora", {"use_dora": True}))
    assert "r=0" in _one_line_error(_bad_dir(tmp_path / "rank", {"r": 0}))
    wrong_rank = _one_line_error(_bad_dir(tmp_path / "shape", {"r": 8}))
    assert "has shape (4, 32), expected (8, 32)" in wrong_rank
    _, config, params = _lora_model(("^encoder/layers_0/attention/query/kernel$",))
    hf_peft.save_hf_peft(str(tmp_path / "layer0"), config, params, None)
    with pytest.raises(UserError, match=r"adapts attention/query/kernel in only some encoder layers \(not layers \[1\]\)"):
        hf_peft.load_hf_peft(str(tmp_path / "layer0"), dataclasses.replace(BASE, scan_layers=True))
    (tmp_path / "empty").mkdir()
    assert "no adapter_config.json" in _one_line_error(str(tmp_path / "empty"))

    # The command line: an adapter directory needs its base, one line.
    with pytest.raises(SystemExit, match=r"PEFT adapter directory: give its base model too \(--base=PATH\)$"):
        _convert(str(tmp_path / "unknown"), str(tmp_path / "out"), "--to=hf")


def test_training_continues_a_peft_adapter_on_the_base_it_records(tmp_path):
    """init_checkpoint = a PEFT directory: its adapters on its recorded base; with a zero
    learning rate the run's saved adapters are the PEFT ones, exactly."""
    import tasks
    from flan_jax import checkpoints as ckpt_lib
    from flan_jax import optim, trainer

    tasks.register()
    config = dataclasses.replace(BASE, vocab_size=1024, lora=LORA)  # the built-in vocabulary's size
    params = _randomise_lora_b(_init(config))
    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    formats.save_flan_jax(base_dir, peft.base_config(config), peft.split(config, params)[1], None, 0)
    hf_peft.save_hf_peft(adapter_dir, config, params, base_dir)
    run = trainer.TrainConfig(
        model_dir=str(tmp_path / "run"), mixture_or_task_name=SMALL_MIXTURE, num_steps=1, batch_size=2,
        task_feature_lengths={"inputs": 32, "targets": 16}, init_checkpoint=adapter_dir,
    )
    trainer.train(run, model_config=config, optimizer=optim.adafactor(learning_rate=0.0),
                  checkpoint_config=ckpt_lib.CheckpointConfig(best_metric=None), show_progress=False)
    loaded = formats.load_checkpoint(str(tmp_path / "run"))
    assert loaded.config.lora == LORA
    want, got = traverse_util.flatten_dict(params), traverse_util.flatten_dict(jax.device_get(loaded.params))
    assert set(want) == set(got)
    for path in want:
        np.testing.assert_array_equal(got[path], np.asarray(want[path]), err_msg="/".join(path))
