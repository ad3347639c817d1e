"""The PEFT presets of gin/peft/ (issue 29): each works alone, through the
command line's own gin parsing, and a LoraConfig bound without
`T5Config.lora` is one line, not a silent full finetune."""

from __future__ import annotations

import pytest
from conftest import SMALL_MIXTURE

from flan_jax.commands import gin_flags
from flan_jax.errors import UserError
from flan_jax.model import T5Config
from flan_jax.model.lora import LORA_ATTENTION, LORA_ATTENTION_MLP, LORA_QUERY_VALUE

ERROR = ("LoraConfig.targets is bound but T5Config.lora is None: add --gin_file=peft/lora.gin "
         "or bind T5Config.lora = @LoraConfig()")


@pytest.fixture(autouse=True)
def _clean_gin():
    import gin

    gin.clear_config()
    yield
    gin.clear_config()


def _parsed_config(*files: str, bindings: tuple[str, ...] = ()) -> T5Config:
    """The T5Config a command builds after `--gin_file=` each of `files` and `--gin.` each binding."""
    gin_flags.parse(gin_flags.GinFlags(list(files), list(bindings)))
    return T5Config()


@pytest.mark.parametrize("preset, targets", [
    ("peft/lora.gin", LORA_QUERY_VALUE),
    ("peft/lora_attention.gin", LORA_ATTENTION),
    ("peft/lora_attention_mlp.gin", LORA_ATTENTION_MLP),
])
def test_each_lora_preset_alone_gives_lora_with_its_targets(preset, targets):
    import gin

    config = _parsed_config("runs/smoke.gin", preset)
    assert config.lora is not None and config.lora.targets == targets
    assert (config.lora.rank, config.lora.alpha, config.frozen_dtype) == (16, 32, "bfloat16")  # lora.gin's
    assert gin.get_bindings("adafactor")["multiply_by_parameter_scale"] is False


def test_a_targets_preset_after_lora_gin_still_wins():
    config = _parsed_config("peft/lora.gin", "peft/lora_attention.gin")
    assert config.lora.targets == LORA_ATTENTION


def test_prompt_tuning_preset_alone_gives_prompt_slots():
    config = _parsed_config("runs/smoke.gin", "peft/prompt_tuning.gin")
    assert config.prompt_length == 100 and config.lora is None and config.has_adapters


@pytest.mark.parametrize("bindings, message", [
    (("LoraConfig.targets = %flan_jax.model.LORA_ATTENTION",), ERROR),
    (("LoraConfig.rank = 4",), ERROR.replace("targets", "rank", 1)),
])
def test_lora_config_bound_without_t5config_lora_is_one_line(bindings, message):
    with pytest.raises(UserError) as error:
        _parsed_config("runs/smoke.gin", bindings=bindings)
    assert str(error.value) == message


def test_t5config_lora_bound_to_none_on_purpose_passes():
    config = _parsed_config("peft/lora_attention.gin", bindings=("T5Config.lora = None",))
    assert config.lora is None


def test_the_command_line_says_it_in_one_line(tmp_path, capfd):
    from flan_jax import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--gin_file=runs/smoke.gin", "--gin.LoraConfig.targets=('attention/query/kernel$',)",
                  f"--gin.TrainConfig.model_dir='{tmp_path / 'run'}'"])
    assert str(exit_info.value.code) == f"flan-jax: error: {ERROR}"
    assert "Traceback" not in capfd.readouterr().err
    assert not (tmp_path / "run").exists()


def test_lora_attention_preset_alone_trains_and_saves_only_attention_adapters(tmp_path):
    from flax import traverse_util

    from flan_jax import checkpoints as ckpt_lib
    from flan_jax import cli, peft

    run = tmp_path / "run"
    cli.main([
        "train", "--gin_file=runs/smoke.gin", "--gin_file=peft/lora_attention.gin",
        "--gin.T5Config.emb_dim=32", "--gin.T5Config.num_heads=2", "--gin.T5Config.head_dim=16",
        "--gin.T5Config.mlp_dim=64", "--gin.LoraConfig.rank=2",
        f"--gin.TrainConfig.mixture_or_task_name='{SMALL_MIXTURE}'",
        "--gin.TrainConfig.task_feature_lengths={'inputs': 32, 'targets': 16}", "--gin.TrainConfig.batch_size=2",
        "--gin.TrainConfig.num_steps=1", "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.eval_every=0",
        "--gin.EvalConfig.mixture_or_task_name=None", "--gin.CheckpointConfig.save_every=1",
        "--gin.CheckpointConfig.best_metric=None", f"--gin.TrainConfig.model_dir='{run}'",
        "--gin.get_train_dataset.pack_buffer_size=16",
    ])
    checkpoints = ckpt_lib.open_for_reading(run / "checkpoints")
    try:
        params, _ = checkpoints.restore_params(checkpoints.latest_step())
    finally:
        checkpoints.close()
    saved = ["/".join(path) for path in traverse_util.flatten_dict(params)]
    assert saved and all(peft.is_adapter(tuple(name.split("/"))) for name in saved), saved
    adapted = {name.rsplit("/", 1)[0] for name in saved}
    # 2+2 layers: encoder self-attention, decoder self- and cross-attention, four projections each.
    assert len(adapted) == (2 + 2 * 2) * 4 and not any("mlp" in name for name in adapted), sorted(adapted)
    for projection in ("query", "key", "value", "out"):
        assert any(name.endswith(f"/{projection}") for name in adapted), projection
