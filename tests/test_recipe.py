"""The paper's recipe per size (gin/runs/flan_t5_*.gin): T5X's loss normalizations,
the Flan 2022 preset's CoT-II / Dialog-II weight, the architecture and vocabulary
a finetune takes from its checkpoint, and runs/flan_t5_small.gin training."""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL_MIXTURE, main_in_process

from flan_jax import losses
from flan_jax.errors import UserError

REPO = Path(__file__).resolve().parent.parent
Z_LOSS = 1e-2  # large enough to matter in the sums


# ------------------------------------------------------------ loss normalization


def _hand_computed(logits, targets, weights, segments, factor) -> float:
    """The loss of T5X's normalizing `factor`, token by token in float64."""
    logits = logits.astype(np.float64)
    log_z = np.log(np.exp(logits).sum(-1))
    token_loss = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0] + Z_LOSS * log_z**2
    summed = float((token_loss * weights).sum())
    if factor is None:
        return summed
    if factor == "NUM_REAL_TARGET_TOKENS":
        return summed / weights.sum()
    if factor == "NUM_TOTAL_TARGET_TOKENS":
        return summed / weights.size
    if factor == "AVERAGE_PER_SEQUENCE":  # the mean over sequences of each one's mean token loss
        means = []
        for row in range(targets.shape[0]):
            for segment in sorted(set(segments[row][weights[row] > 0])):
                tokens = (segments[row] == segment) & (weights[row] > 0)
                means.append(token_loss[row][tokens].mean())
        return float(np.mean(means))
    return summed / factor


def _packed_targets():
    """3 rows of 6 target positions: packed sequences of 2, 3 and 1 tokens (row 0), one of
    5 (row 1), one of 1 then padding (row 2)."""
    segments = np.array([[1, 1, 2, 2, 2, 3], [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]])
    weights = (segments > 0).astype(np.float32)
    targets = np.where(segments > 0, np.arange(18).reshape(3, 6) % 5 + 2, 0)
    return targets, weights, segments


@pytest.mark.parametrize("factor", [
    "NUM_REAL_TARGET_TOKENS", "NUM_TOTAL_TARGET_TOKENS", "AVERAGE_PER_SEQUENCE", 233472.0, None,
])
def test_each_loss_normalization_equals_the_hand_computed_loss(factor):
    targets, weights, segments = _packed_targets()
    logits = np.random.default_rng(0).normal(size=(3, 6, 7)).astype(np.float32)
    loss, metrics = losses.cross_entropy_loss(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), z_loss=Z_LOSS,
        loss_normalizing_factor=factor, segment_ids=jnp.asarray(segments),
    )
    np.testing.assert_allclose(float(loss), _hand_computed(logits, targets, weights, segments, factor), rtol=1e-5)
    assert float(metrics["num_tokens"]) == 12.0  # logging stays per real token whatever the choice


def _within_segment_positions(segments: np.ndarray) -> np.ndarray:
    """Each token's position in its packed segment (0 on padding)."""
    positions = np.zeros_like(segments)
    for row in range(segments.shape[0]):
        for i in range(1, segments.shape[1]):
            same = segments[row, i] > 0 and segments[row, i] == segments[row, i - 1]
            positions[row, i] = positions[row, i - 1] + 1 if same else 0
    return positions


def test_microbatches_normalize_each_choice_over_the_whole_batch(tiny_config):
    """The train step's loss, in 1 or 2 microbatches, is the hand-computed loss of the model's logits."""
    from flan_jax import optim, partitioning
    from flan_jax import step as step_lib
    from flan_jax.model import Transformer

    targets, weights, segments = (np.concatenate([a, a[::-1]]) for a in _packed_targets())  # 6 rows, packed
    encoder_segments = np.array([[1, 1, 1, 2, 2, 3, 3, 0], [1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]])
    encoder_segments = np.concatenate([encoder_segments, encoder_segments[::-1]])
    rng = np.random.default_rng(1)
    positions = _within_segment_positions(segments)
    batch = {k: v.astype(np.int32) for k, v in {
        "encoder_input_tokens": np.where(encoder_segments > 0, rng.integers(2, tiny_config.vocab_size, (6, 8)), 0),
        "encoder_segment_ids": encoder_segments, "encoder_positions": _within_segment_positions(encoder_segments),
        "decoder_input_tokens": np.where(positions == 0, 0, np.pad(targets, ((0, 0), (1, 0)))[:, :-1]),
        "decoder_target_tokens": targets, "decoder_segment_ids": segments, "decoder_positions": positions,
    }.items()}
    batch["decoder_loss_weights"] = weights
    part, tx = partitioning.Partitioner(), optim.adafactor()
    module = Transformer(tiny_config)
    model, params, opt_state = step_lib.initialize(module, tx, part, {"inputs": 8, "targets": 6}, seed=0)
    logits = np.asarray(module.apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], enable_dropout=False,
        **{k: batch[k] for k in ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions",
                                 "decoder_positions")}))
    for factor in ("AVERAGE_PER_SEQUENCE", "NUM_TOTAL_TARGET_TOKENS"):
        want = _hand_computed(logits, targets, weights, segments, factor)
        config = step_lib.LossConfig(z_loss=Z_LOSS, loss_normalizing_factor=factor)
        for microbatches in (1, 2):
            train_step = step_lib.make_train_step(model, tx, part, config, microbatches)
            copies = jax.tree.map(jnp.copy, (params, opt_state))  # the step donates them
            _, _, metrics = train_step(*copies, part.shard_batch(batch), jax.random.key(0), jnp.asarray(0))
            np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5, err_msg=f"{factor}, {microbatches}")


@pytest.mark.parametrize("value", ["num_real_tokens", 0, -1.0, True])
def test_a_bad_normalizing_factor_is_named(value):
    from flan_jax.train_config import TrainConfig

    with pytest.raises(UserError, match="TrainConfig.loss_normalizing_factor=.*expected a positive number, one of"):
        TrainConfig(model_dir="m", mixture_or_task_name="t", num_steps=1, loss_normalizing_factor=value)


# ------------------------------------------------ Flan 2022: CoT-II and Dialog-II


def test_flan_2022_weighs_cot_ii_and_dialog_ii_at_0_3_within_their_submixture(tmp_path):
    """Per template type, the input-inversion tasks ("_ii") get 0.3 / 1.3 of the submixture
    and the rest 1 / 1.3, each group example-proportional (FLAN's flan/v2/mixtures.py)."""
    from tasks import collection_bench, flan2022, mixing, registry

    assert mixing.FLAN_2022["cot"].inverted_rate == mixing.FLAN_2022["dialog"].inverted_rate == 0.3
    assert {c.inverted_rate for name, c in mixing.FLAN_2022.items() if name not in ("cot", "dialog")} == {None}
    counts = {
        "cot": {("cot_gsm8k", "zs_opt"): 30, ("cot_esnli", "zs_opt"): 10, ("cot_gsm8k_ii", "zs_opt"): 20,
                ("cot_esnli", "fs_opt"): 12},  # fs_opt has no inverted task: the rest takes all of it
        "dialog": {("wiki_dialog", "zs_opt"): 8, ("wiki_dialog_ii", "zs_opt"): 8, ("qrecc_ii", "zs_opt"): 24},
    }
    collection_bench.write_synthetic_export(str(tmp_path), counts, {"cot": "jsonl", "dialog": "jsonl"})
    try:
        flan2022.register(str(tmp_path))
        shares = {c: registry.text_tasks()[f"flan2022_{c}"][0].shares() for c in counts}
    finally:
        flan2022.register()
    half = 0.5  # two template types in cot, equally weighted
    want_cot = {("cot_gsm8k", "zs_opt"): half / 1.3 * 30 / 40, ("cot_esnli", "zs_opt"): half / 1.3 * 10 / 40,
                ("cot_gsm8k_ii", "zs_opt"): half * 0.3 / 1.3, ("cot_esnli", "fs_opt"): half}
    want_dialog = {("wiki_dialog", "zs_opt"): 1 / 1.3, ("wiki_dialog_ii", "zs_opt"): 0.3 / 1.3 * 8 / 32,
                   ("qrecc_ii", "zs_opt"): 0.3 / 1.3 * 24 / 32}
    assert shares["cot"] == pytest.approx(want_cot) and shares["dialog"] == pytest.approx(want_dialog)


# ------------------------------------- the architecture and vocabulary of a checkpoint

# Unlike T5Config's defaults in every architecture field a HF config.json states.
HF_TINY = dict(vocab_size=1024, emb_dim=32, num_heads=2, head_dim=16, num_encoder_layers=1, num_decoder_layers=2,
               mlp_dim=48, mlp_activations=("gelu", "linear"), logits_via_embedding=False,
               relative_attention_num_buckets=16, relative_attention_max_distance=64, layer_norm_epsilon=1e-5)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    """A tiny random T5 as a HF directory (config.json, model.safetensors) with the built-in spiece.model."""
    from flan_jax.formats import hf
    from flan_jax.model import T5Config, Transformer
    from tasks import vocab

    config = T5Config(**HF_TINY, dropout_rate=0.0)
    ones = jnp.ones((1, 4), jnp.int32)
    params = nn.unbox(Transformer(config).init(jax.random.key(0), ones, ones, ones, enable_dropout=False)["params"])
    directory = tmp_path_factory.mktemp("hf") / "tiny_t5"
    hf.save_hf_directory(str(directory), jax.device_get(params), config, vocab.default_vocabulary_path())
    return directory


def _train_in_process(argv: list[str]) -> None:
    """`flan-jax train` in this process; gin and the tasks' vocabulary are reset afterwards."""
    import tasks

    try:
        main_in_process(["train", *argv])
    finally:
        tasks.register(again=True)


# No model file: runs/finetune.gin binds no architecture and no vocabulary.
FINETUNE = ["--gin_file=runs/finetune.gin", f"--gin.TrainConfig.mixture_or_task_name='{SMALL_MIXTURE}'",
            "--gin.TrainConfig.task_feature_lengths={'inputs': 32, 'targets': 16}", "--gin.TrainConfig.batch_size=2",
            "--gin.TrainConfig.num_steps=1", "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.eval_every=0",
            "--gin.CheckpointConfig.save_every=1"]


@pytest.mark.parametrize("peft_file", [[], ["--gin_file=peft/lora.gin"]], ids=["full", "lora"])
def test_a_finetune_takes_the_architecture_and_vocabulary_of_its_hf_checkpoint(hf_checkpoint, tmp_path, peft_file,
                                                                               monkeypatch):
    """Full and LoRA finetunes of a HF checkpoint with no model file nor vocabulary binding train
    (before, they stopped with 'lacks the parameter ...' or a vocabulary too large for T5Config)."""
    import seqio

    import gin
    from flan_jax import checkpoint_bindings, formats

    seen = {}
    take = checkpoint_bindings.take_from_checkpoint

    def recording(*args):  # what gin holds once the checkpoint's settings are in, before training
        take(*args)
        seen["T5Config"] = gin.get_bindings("T5Config")
        seen["vocab"] = gin.get_bindings("get_default_vocabulary").get("sentencepiece_model")

    monkeypatch.setattr(checkpoint_bindings, "take_from_checkpoint", recording)
    model_dir = tmp_path / "run"
    _train_in_process([*FINETUNE, *peft_file, f"--gin.TrainConfig.model_dir='{model_dir}'",
                       f"--gin.TrainConfig.init_checkpoint='{hf_checkpoint}'"])
    assert {k: seen["T5Config"][k] for k in HF_TINY} == HF_TINY
    assert seen["vocab"] == str(hf_checkpoint / "spiece.model")
    assert seen["T5Config"]["dropout_rate"] == 0.05  # training choices stay the run file's
    saved = formats.read_architecture(str(model_dir))
    assert {k: getattr(saved.config, k) for k in HF_TINY} == HF_TINY
    assert (model_dir / "spiece.model").read_bytes() == (hf_checkpoint / "spiece.model").read_bytes()
    logged = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["step"] == 1 and np.isfinite(logged[0]["loss"])
    assert (seqio.get_mixture_or_task(SMALL_MIXTURE).output_features["targets"].vocabulary.sentencepiece_model_file
            != str(hf_checkpoint / "spiece.model"))  # the reset registered the default again


def test_bindings_that_disagree_with_the_checkpoint_are_one_line(hf_checkpoint, tmp_path, capfd):
    other = tmp_path / "other.model"
    other.write_bytes(b"another vocabulary")
    spiece = hf_checkpoint / "spiece.model"
    cases = [
        ("--gin.T5Config.num_heads=4",
         f"T5Config.num_heads=4 is bound in gin but {hf_checkpoint} has num_heads 2: pass --gin.T5Config.num_heads=2"),
        ("--gin.T5Config.mlp_activations=('relu',)",
         "T5Config.mlp_activations=('relu',) is bound in gin but"),
        (f"--gin.get_default_vocabulary.sentencepiece_model='{other}'",
         f"get_default_vocabulary.sentencepiece_model='{other}' is bound in gin but {hf_checkpoint} has its own "
         f"vocabulary: pass --gin.get_default_vocabulary.sentencepiece_model='{spiece}'"),
        (f"--vocab={other}", f"--vocab={other} is not the vocabulary of {hf_checkpoint} ({spiece}): drop --vocab"),
    ]
    for flag, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            _train_in_process([*FINETUNE, f"--gin.TrainConfig.model_dir='{tmp_path / 'run'}'",
                               f"--gin.TrainConfig.init_checkpoint='{hf_checkpoint}'", flag])
        line = str(exit_info.value.code)
        assert line.startswith("flan-jax: error: ") and message in line and "\n" not in line, (flag, line)
    assert "Traceback" not in capfd.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_t5x_checkpoint_states_only_what_its_shapes_tell():
    """T5X stores no config: its activations, maximum distance and epsilon are guesses, never held against gin."""
    from flan_jax import formats
    from flan_jax.model import T5Config

    stated = formats.Architecture(T5Config(), formats.SHAPE_FIELDS, None)
    unbound = formats.unbound_architecture(stated, {"mlp_activations": ("silu", "linear"), "num_heads": 6}, "ckpt")
    assert "mlp_activations" not in unbound and "num_heads" not in unbound and unbound["emb_dim"] == 512


# ------------------------------------------------------------ runs/flan_t5_*.gin


def test_flan_t5_small_recipe_trains_five_steps(tmp_path):
    """runs/flan_t5_small.gin as it is, lengths, batch and depth (2+2 of its 8+8 scanned layers) cut by
    flag: T5 v1.1 small's width from scratch, 5 steps, in this process. In float32: XLA:CPU has no
    bfloat16 matmul, and converting costs this test half its time."""
    model_dir = tmp_path / "run"
    _train_in_process([
        "--gin_file=runs/flan_t5_small.gin", f"--gin.TrainConfig.model_dir='{model_dir}'",
        f"--gin.TrainConfig.mixture_or_task_name='{SMALL_MIXTURE}'",
        "--gin.TrainConfig.task_feature_lengths={'inputs': 32, 'targets': 16}", "--gin.TrainConfig.batch_size=2",
        "--gin.TrainConfig.num_steps=5", "--gin.TrainConfig.log_every=5", "--gin.CheckpointConfig.save_every=5",
        "--gin.T5Config.dtype='float32'", "--gin.T5Config.num_encoder_layers=2", "--gin.T5Config.num_decoder_layers=2",
    ])
    logged = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 5 and all(np.isfinite(r["loss"]) for r in logged)
    # The recipe as the run recorded it: the paper's settings, the lengths and batch cut by flag.
    config = (model_dir / "config.gin").read_text()
    for binding in ("TrainConfig.loss_normalizing_factor = 233472", "T5Config.dropout_rate = 0.05",
                    "adafactor.learning_rate = 0.001", "T5Config.emb_dim = 512", "T5Config.mlp_dim = 1024",
                    "T5Config.scan_layers = True", "TrainConfig.batch_size = 2", "TrainConfig.z_loss = 0.0001"):
        assert binding in config, binding
    assert (model_dir / "checkpoints" / "5").is_dir()


@pytest.mark.parametrize("size, steps, partitioning", [
    ("small", 98_000, "data_parallel"), ("base", 84_000, "data_parallel"), ("large", 64_000, "data_parallel"),
    ("xl", 38_000, "fsdp"), ("xxl", 14_000, "fsdp"),
])
def test_each_size_binds_the_papers_recipe(size, steps, partitioning):
    """Every per-size file parses without the data stack (as `bench train` reads it) into the recipe."""
    import gin
    from flan_jax import partitioning as partitioning_lib
    from flan_jax.commands import gin_flags

    try:
        gin_flags.parse(gin_flags.GinFlags([f"runs/flan_t5_{size}.gin"], []), with_data=False)
        bound = gin.get_bindings("TrainConfig")
        assert bound["num_steps"] == steps and bound["batch_size"] == 64
        assert bound["task_feature_lengths"] == {"inputs": 2048, "targets": 512}
        assert bound["loss_normalizing_factor"] == 233472 and bound["z_loss"] == 1e-4
        assert gin.get_bindings("T5Config")["dropout_rate"] == 0.05
        assert gin.get_bindings("adafactor")["learning_rate"] == 1e-3
        rules = getattr(partitioning_lib, f"{partitioning.upper()}_LOGICAL_AXIS_RULES")
        assert gin.get_bindings("Partitioner")["logical_axis_rules"] == rules
    finally:
        gin.clear_config()
