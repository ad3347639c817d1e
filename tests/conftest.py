"""Shared test set-up: quiet TensorFlow, keep it off GPUs, find ../shared,
faster XLA compiles on CPU, one compilation cache for every test process,
shared helpers (`flan-jax` subprocesses and their flags, random batches, tiny
runs), the `slow` tier, and an order for pytest-xdist (tests/run.sh)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from flan_jax.commands import process

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("FLAN_JAX_DATA_DIR", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("FLAN_JAX_FIXTURES_DIR", str(REPO.parent / "shared" / "fixtures"))


def _cpu_only() -> bool:
    """True when JAX can only run on the CPU here (no GPU/TPU plugin installed, or JAX_PLATFORMS=cpu)."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return True
    if importlib.metadata.entry_points(group="jax_plugins") or importlib.util.find_spec("libtpu"):
        return False
    try:
        return importlib.util.find_spec("jax_plugins") is None
    except (ImportError, ValueError):
        return True


# The suite's models are tiny, so on the CPU its time goes into XLA compiling
# them: LLVM's optimisation passes take ~40% of it. Without them the programs
# compute the same things (XLA's own graph passes still run; only machine-code
# optimisation is skipped) a little slower, which at these sizes costs far
# less than it saves. Set in the environment, so the `flan-jax` subprocesses
# the tests start inherit it. FLAN_JAX_TEST_XLA_OPT=1 keeps the default level.
XLA_TEST_FLAG = "--xla_backend_optimization_level=0"
if (
    os.environ.get("FLAN_JAX_TEST_XLA_OPT", "0") != "1"
    and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")
    and _cpu_only()
):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_TEST_FLAG}".strip()

# JAX's persistent compilation cache, shared by the test processes (xdist
# workers) and the `flan-jax` subprocesses they start (which inherit the
# environment): they compile the same tiny programs again and again, and all
# but the first load them from disk. Under .cache/ of this checkout, so a clean
# clone starts empty and nothing outside it is touched; entries are keyed by the
# program, the XLA flags and the jax version, so a stale one is never used.
# Programs that compile in 0.1 s or more are kept (jax's default is 1 s; many
# of the suite's tiny models take less, and together those are what the cache
# saves), not most of the thousands of single eager operations below it: each
# write lists the whole cache to evict, which would cost more than they take. A
# maximum size makes jax's LRUCache take a file lock around every read and
# write (without one, two processes writing one entry can let a third read it
# half-written) and evict the least recently used entries past it. Any JAX_*
# setting of the caller's wins; JAX_ENABLE_COMPILATION_CACHE=false turns the
# cache off.
TEST_COMPILATION_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": str(REPO / ".cache" / "jax"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 << 30),
}
for _key, _value in TEST_COMPILATION_CACHE.items():
    os.environ.setdefault(_key, _value)

# Test processes (xdist workers, run_on_8_devices scripts) end as `flan-jax` does: without a
# garbage collection over TensorFlow's and JAX's objects at exit (2-4 s of CPU each).
process.exit_without_collecting()


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """On GPUs, float32 matmuls default to TF32-like precision (logits off by
    ~3e-3 at test sizes); the tests compare float32 results to 1e-4 or better."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="session")
def tiny_config():
    from flan_jax.model import T5Config

    return T5Config(
        vocab_size=128, emb_dim=32, num_heads=2, head_dim=16, num_encoder_layers=2,
        num_decoder_layers=2, mlp_dim=64, dropout_rate=0.0,
    )


class FakeModel:
    """A model that 'generates' fixed token rows, chunk by chunk as `inference.ModelRunner.decode`
    does, and counts the chunks taken (a batch stopped early takes fewer)."""

    def __init__(self, answers: dict, chunk: int = 16) -> None:
        self.answers = answers  # prompt tokens (bytes of the non-padding ids) -> answer token ids
        self.chunk = chunk
        self.chunks_taken = 0

    def decode(self, inputs, max_decode_length: int):
        import numpy as np

        rows = [self.answers[row[row > 0].tobytes()] if row.any() else [] for row in inputs]
        out = np.zeros((len(inputs), max_decode_length), np.int32)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row[:max_decode_length]
        ends = [len(row) if 1 in row else max_decode_length for row in rows]  # decoding goes on until EOS
        for start in range(0, min(max(ends), max_decode_length), self.chunk):
            self.chunks_taken += 1
            yield out[:, start : start + self.chunk]


@pytest.fixture
def fake_model():
    """(examples, answer_of(task, index) -> text, eos=True) -> a FakeModel that answers each of the
    TaskExamples' prompts with `answer_of`'s text (then EOS)."""

    def make(examples, answer_of, eos: bool = True) -> FakeModel:
        answers = {}
        for task in examples:
            for i, ex in enumerate(task.features):
                answer = task.vocabulary.encode(answer_of(task, i)) + ([task.vocabulary.eos_id] if eos else [])
                # The fake tells examples apart by their prompt; a repeated prompt (MMLU has a few) must agree.
                assert answers.setdefault(ex["inputs"].tobytes(), answer) == answer, task.name
        return FakeModel(answers)

    return make


@pytest.fixture
def fake_generate(fake_model):
    """(examples, answer_of, eos=True, **evaluate_tasks options) -> (results, FakeModel): evaluates
    TaskExamples with `fake_model`'s answers."""
    from flan_jax import evaluation

    def run(examples, answer_of, eos: bool = True, **options):
        model = fake_model(examples, answer_of, eos)
        options = {"show_progress": False, **options}
        return evaluation.evaluate_tasks(examples, evaluation.ModelFns(model.decode), **options), model

    return run


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """vocab_size -> (module, random params) of `tiny_config` with that vocabulary size."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from flan_jax.model import Transformer

    def make(vocab_size: int):
        module = Transformer(dataclasses.replace(tiny_config, vocab_size=vocab_size))
        tokens = jnp.ones((1, 8), jnp.int32)
        return module, module.init(jax.random.key(1), tokens, tokens, tokens, enable_dropout=False)["params"]

    return make


@pytest.fixture(scope="session")
def tiny_run(tiny_model):
    """(directory, step) -> a flan-jax run directory made in `directory`: `tiny_model`'s random
    model with the built-in vocabulary, saved as checkpoint `step`."""

    def save(directory: Path, step: int) -> str:
        from flan_jax import formats
        from tasks import vocab

        module, params = tiny_model(vocab.get_default_vocabulary().vocab_size)
        return formats.save_flan_jax(str(directory), module.config, params, vocab.default_vocabulary_path(), step)

    return save


# ------------------------------------------------------------ `flan-jax` subprocesses

# The tests' `flan-jax train` runs: a few steps of gin/runs/smoke.gin on
# `builtin_small` (4 tasks: the pipeline of the smoke run's 28 costs ~10 s
# more to build in every process), short sequences, small batches, and no
# evaluation (the smoke run's final one, on 18 tasks, is a third of such a
# run). A test that needs the full mixture, or evaluation, binds those itself.
SMALL_MIXTURE = "builtin_small"
SMALL_TRAIN = {
    "TrainConfig.mixture_or_task_name": SMALL_MIXTURE,
    "TrainConfig.task_feature_lengths": {"inputs": 64, "targets": 32},
    "TrainConfig.batch_size": 4,
    "TrainConfig.eval_every": 0,
    "EvalConfig.mixture_or_task_name": None,
    "CheckpointConfig.best_metric": None,
}
# A run that interrupted copies are compared against: a checkpoint every 10
# steps (3 kept), metrics every 5.
RESUMABLE_TRAIN = {
    "TrainConfig.log_every": 5,
    "CheckpointConfig.save_every": 10,
    "CheckpointConfig.keep_last": 3,
}


def train_flags(bindings: Mapping[str, object] | None = None, gin_files: Sequence[str] = ()) -> list[str]:
    """`flan-jax train` flags: runs/smoke.gin, then `gin_files`, then SMALL_TRAIN updated by
    `bindings` ({"TrainConfig.num_steps": 4}; values as Python literals)."""
    files = [f"--gin_file={name}" for name in ("runs/smoke.gin", *gin_files)]
    return files + [f"--gin.{key}={value!r}" for key, value in {**SMALL_TRAIN, **(bindings or {})}.items()]


def cli_command(*args: str) -> list[str]:
    """`flan-jax ARGS` as this interpreter runs it from the checkout."""
    return [sys.executable, "-m", "flan_jax.cli", *args]


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment (with the XLA flags and compilation cache set above), TensorFlow
    quiet and output unbuffered, so a log file follows the run."""
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", **extra)


def run_cli(*args: str, stdin: str | None = None, env: Mapping[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `flan-jax ARGS` in the repository root; its output is captured as text."""
    return subprocess.run(cli_command(*args), cwd=REPO, env=dict(env) if env is not None else cli_env(),
                          capture_output=True, text=True, input=stdin, timeout=timeout)


def main_in_process(argv: Sequence[str]) -> None:
    """`flan-jax ARGV` as `flan_jax.cli.main` runs it in this process (TensorFlow and JAX are loaded
    already: no start-up), gin's bindings cleared afterwards. A UserError ends it with SystemExit
    and the one line the command prints; any other exception is the test's failure."""
    import gin
    from flan_jax import cli

    try:
        cli.main(list(argv))
    finally:
        gin.clear_config()


def start_cli(args: Sequence[str], log: Path) -> subprocess.Popen:
    """Starts `flan-jax ARGS` in the repository root, stdout and stderr going to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(cli_command(*args), cwd=REPO, env=cli_env(), stdout=out, stderr=subprocess.STDOUT,
                                text=True)


# ------------------------------------------------------------ 8 fake devices


def random_batch(batch_size: int = 32, input_length: int = 16, target_length: int = 8,
                 vocab_size: int = 128) -> dict:
    """A random train batch (numpy, seed 0) with padding, so rows carry different token counts."""
    import numpy as np

    rng = np.random.default_rng(0)
    tgt = rng.integers(2, vocab_size, (batch_size, target_length)).astype(np.int32)
    tgt[::3, -3:] = 0
    enc = rng.integers(2, vocab_size, (batch_size, input_length)).astype(np.int32)
    enc[::4, -5:] = 0
    return {
        "encoder_input_tokens": enc,
        "decoder_target_tokens": tgt,
        "decoder_input_tokens": np.concatenate([np.zeros((batch_size, 1), np.int32), tgt[:, :-1]], 1),
        "decoder_loss_weights": (tgt > 0).astype(np.float32),
    }


def relative_error(a, b) -> float:
    """|a - b| / |b| (Frobenius norms, in float64)."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# Run before the script: an exit without a last collection (as above), 8 fake
# CPU devices (the device-count flag is appended, keeping the XLA flags this
# file sets), float32 matmuls at full precision, and this directory importable,
# so that the script can `from conftest import ...`.
_EIGHT_DEVICES = f"""
import os, sys
from flan_jax.commands import process
process.exit_without_collecting()
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import jax
jax.config.update("jax_default_matmul_precision", "highest")
assert len(jax.devices()) == 8
"""


def run_on_8_devices(script: str, timeout: float = 900) -> str:
    """Runs a Python `script` in a fresh interpreter with 8 fake CPU devices; fails the test (with
    the ends of its output) if the script fails, else prints its stdout and returns it."""
    result = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES + script], capture_output=True, text=True,
                            timeout=timeout)
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return result.stdout


def pack_row(parts: Sequence, length: int) -> tuple:
    """One packed row [1, length] of token arrays `parts`: (tokens, segment ids, positions), as the packer lays it out."""
    import numpy as np

    tokens, segments, positions = (np.zeros((1, length), np.int32) for _ in range(3))
    start = 0
    for segment, part in enumerate(parts, 1):
        end = start + len(part)
        tokens[0, start:end], segments[0, start:end], positions[0, start:end] = part, segment, np.arange(len(part))
        start = end
    return tokens, segments, positions


@pytest.fixture(scope="module")
def flan_cot_data():
    """Skips a test when the real Flan CoT files are not there."""
    from tasks import sources

    directory = sources.data_dir()
    if not directory or not os.path.isdir(os.path.join(directory, "flan_cot")):
        pytest.skip("no Flan CoT data (set FLAN_JAX_DATA_DIR)")


# ------------------------------------------------------------ pytest-xdist
#
# tests/run.sh runs the suite on 2+ workers (`-n`, `--dist loadgroup`). Two
# things make that fast and safe:
#
# 1. Tests that share an expensive module-scoped fixture (a reference training
#    run, a converted HF model, mixture batches) go to one worker together, so
#    that it is built once: each gets an `xdist_group` named after its module.
#    Autouse and session-scoped fixtures are left out (cheap, or everywhere).
# 2. The slowest tests (and groups) are handed out first, so that no worker
#    is left running a 3-minute test alone at the end. EXPECTED_SECONDS holds
#    rough seconds on a 2-core machine (`bash tests/run.sh` lists the 30
#    slowest); a test not listed counts as its file's default, or 1 s. The
#    order changes, and the `slow` tier (below): worth updating when a slow
#    test is added. A serial run, without xdist, keeps pytest's file order.

EXPECTED_SECONDS = {
    "tests/test_robustness.py::test_each_dropout_rng_impl_trains_and_resumes_exactly": 50,
    "tests/test_cli.py::test_convert_infer_and_finetune_from_any_format": 70,
    "tests/test_robustness.py::test_sigterm_saves_where_it_stopped_and_the_rerun_matches": 100,  # with its fixture: the reference run
    "tests/test_robustness.py::test_sigkill_then_rerun_logs_one_entry_per_step_as_uninterrupted": 60,
    "tests/test_cli.py::test_train_resume_and_infer": 90,  # with its fixture: 2 train commands, one more in-process
    "tests/test_partitioning.py::test_one_step_is_the_same_on_every_mesh_layout_and_microbatching": 140,
    "tests/test_multiprocess.py::test_two_processes_match_one_and_resume_on_another_mesh": 100,
    "tests/test_robustness.py::test_unreadable_newest_step_is_set_aside_for_infer_eval_and_resume": 40,
    "tests/test_install.py::test_wheel_installs_with_its_gin_configs": 50,
    "tests/test_evaluation.py::test_eval_suites_end_to_end_on_a_tiny_random_model": 60,
    "tests/test_evaluation.py::test_gold_targets_score_100_and_a_constant_answer_its_frequency": 45,
    "tests/test_evaluation.py::test_rank_classification_picks_the_option_transformers_scores_highest": 15,
    "tests/test_bench_train.py::test_bench_train_compares_with_transformers": 35,
    "tests/test_bench_train.py::test_bench_train_runs_without_the_data_stack_and_reports_figures": 30,
    "tests/test_bench_train.py::test_compile_only_plans_xxl_on_an_fsdp_mesh_it_does_not_have": 25,
    "tests/test_gpu_check.py::test_cpu_dry_run_writes_its_files_within_its_deadline": 25,  # 4 JAX processes
    "tests/test_model.py::test_fused_attention_matches_the_einsum_path": 25,
    "tests/test_mixing.py::test_same_seed_gives_the_same_batches": 25,
    "tests/test_data_commands.py::test_stats_of_flan_cot": 25,
    "tests/test_formats.py::test_t5x_checkpoints_restore_onto_a_sharded_mesh": 25,
    "tests/test_data_commands.py::test_stats_of_builtin_train": 14,
    "tests/test_packing.py::test_train_iterator_resumes_exactly_with_best_fit": 30,  # with its fixture: 2 pipelines
    "tests/test_cli.py::test_infer_on_missing_run_is_clear": 11,
    "tests/test_model.py::test_remat_and_dropout_under_scan": 15,
    "tests/test_data_commands.py::test_bench_data_runs": 15,
    "tests/test_install.py::test_training_path_does_not_import_torch_or_transformers": 10,
    "tests/test_mixing.py::test_resume_from_saved_position_continues_exactly": 16,
    "tests/test_multiprocess.py::test_global_batch_shards_concatenate_to_the_one_host_batch": 14,
    "tests/test_packing.py::test_packed_logits_equal_unpacked": 6,
    "tests/test_collection.py::test_flan2022_shares_follow_the_rates_caps_and_template_types": 25,
    "tests/test_collection.py::test_iteration_is_deterministic_and_resumes_at_a_saved_position": 19,
    "tests/test_collection.py::test_your_own_task_mixes_in_beside_the_collection": 24,
    "tests/test_heldout.py::test_flan_heldout_end_to_end_on_a_tiny_random_model": 45,
    "tests/test_training_eval.py::test_training_evaluates_suites_logs_their_normalized_average_and_keeps_the_best_by_it": 40,
    "tests/test_pallas_attention.py::test_pallas_kernel_and_fused_adafactor_under_fsdp_on_8_devices": 30,
    "tests/test_own_data.py::test_a_partly_bad_file_trains_and_reports_its_skips": 30,
    "tests/test_lora.py::test_sigkill_and_rerun_gives_the_uninterrupted_runs_adapters": 70,
    "tests/test_lora.py::test_lora_alone_fits_a_held_in_task": 50,
    "tests/test_lora.py::test_training_changes_only_the_adapters_and_saves_only_them": 25,  # with its fixture: a LoRA run
    "tests/test_lora.py::test_two_lora_steps_are_the_same_on_every_mesh_and_microbatching": 55,
    "tests/test_lora.py::test_infer_and_eval_load_the_recorded_base": 15,
    "tests/test_peft_interop.py::test_training_continues_a_peft_adapter_on_the_base_it_records": 35,
    "tests/test_overlap.py::test_training_logs_the_running_exclusion_counts": 16,
    "tests/test_bench_train.py::test_peft_compare_measures_adapters_against_full_finetuning": 15,
    "tests/test_recipe.py::test_flan_t5_small_recipe_trains_five_steps": 45,
    "tests/test_recipe.py::test_a_finetune_takes_the_architecture_and_vocabulary_of_its_hf_checkpoint": 60,
    "tests/test_heldout.py::test_exported_prompts_answered_with_their_gold_targets_score_100_and_a_constant_its_frequency": 50,  # with its fixture
    "tests/test_evaluation.py::test_a_model_that_runs_on_into_a_new_question_is_scored_on_its_first_answer_and_stops_early": 15,
    "tests/test_evaluation.py::test_choice_picks_the_option_with_the_highest_first_step_logit_as_transformers_computes_it": 20,
    # From a run of the fast tier before these were in it (2026-12-07):
    "tests/test_run_dir.py::test_killed_after_a_save_resumes_with_the_same_batches": 80,
    "tests/test_run_dir.py::test_a_run_with_the_old_input_state_directory_resumes": 30,
    "tests/test_run_dir.py::test_without_a_saved_position_the_rerun_reads_and_drops_to_the_same_batches": 55,
    "tests/test_own_data.py::test_a_file_with_no_usable_row_stops_every_command_with_one_line": 25,  # each command
    "tests/test_mixing.py::test_resume_by_skipping_continues_exactly": 20,  # with its fixture
    "tests/test_lora.py::test_resuming_adapters_on_another_base_names_both_fingerprints": 20,  # with its fixture
    "tests/test_packing.py::test_best_fit_packs_denser_than_seqio_on_builtin_train": 30,  # with its fixture
    "tests/test_inference.py::test_infer_command_writes_predictions_in_input_order": 27,
    "tests/test_model.py::test_a_scanned_decoding_step_is_unrolled_and_carries_only_the_self_attention_cache": 27,
    "tests/test_inference.py::test_models_too_large_for_one_device_load_sharded": 25,
    "tests/test_presets.py::test_lora_attention_preset_alone_trains_and_saves_only_attention_adapters": 25,
    "tests/test_t5x_optimizer_state.py::test_finetune_from_a_flan_jax_run_continues_its_optimizer_state": 24,
    "tests/test_t5x_fixture_logits.py::test_logits_match_t5x": 12,  # the first of each checkpoint more, with its fixture
    "tests/test_model.py::test_decode_mode_takes_one_token_per_call": 20,
    "tests/test_accel_options.py::test_fused_adafactor_equals_per_parameter_over_ten_steps": 19,
    "tests/test_robustness.py::test_nonfinite_loss_stops_or_is_skipped": 20,
    "tests/test_peft_interop.py::test_merged_adapters_give_the_unmerged_logits[scanned]": 17,
    "tests/test_peft_interop.py::test_convert_merges_an_adapter_directory_onto_its_base": 16,
    "tests/test_peft_interop.py::test_adapter_written_by_flan_jax_loads_in_peft_with_the_same_logits[q_v]": 15,
    "tests/test_model.py::test_cached_decoding_matches_the_full_forward_pass": 12,
    "tests/test_recipe.py::test_microbatches_normalize_each_choice_over_the_whole_batch": 15,
    "tests/test_inference.py::test_batched_answers_equal_one_at_a_time": 14,
    "tests/test_inference.py::test_sampling_is_seeded": 13,
    "tests/test_cli.py::test_terminal_is_free_of_native_info_lines": 14,
    "tests/test_cli.py::test_bench_decode_takes_a_gin_model_scanned": 12,
    "tests/test_catalog.py::test_data_list_registers_the_tasks_once": 12,
    "tests/test_catalog.py::test_import_tasks_trains_nothing_and_registers_nothing": 12,
    "tests/test_lora.py::test_step_zero_logits_equal_the_base_models": 10,
    "tests/test_collection.py::test_every_format_reads_each_row_once_and_shards_split_them[jsonl]": 12,
    "tests/test_overlap.py::test_bad_names_are_one_line": 11,
    "tests/test_overlap.py::test_flan_cot_against_gsm8k_test": 11,
    "tests/test_t5x_optimizer_state.py::test_finetune_from_t5x_continues_its_adafactor_state": 11,
    "tests/test_accel_options.py::test_unrolled_scan_equals_the_scan": 11,
    "tests/test_accel_options.py::test_every_xla_preset_is_a_flag_this_xla_knows": 9,
    "tests/test_checkpoint_errors.py::test_corrupted_checkpoint_loads_or_is_a_user_error[t5x_legacy]": 10,
    "tests/test_checkpoint_errors.py::test_corrupted_checkpoint_loads_or_is_a_user_error[t5x_orbax]": 9,
    "tests/test_peft_interop.py::test_adapter_written_by_flan_jax_loads_in_peft_with_the_same_logits[attention_mlp]": 15,
    "tests/test_pallas_attention.py::test_whole_model_loss_and_grads_equal_with_the_pallas_kernel": 14,
    "tests/test_heldout.py::test_gold_targets_score_100_and_a_constant_answer_its_frequency": 11,
    "tests/test_own_data.py::test_the_collection_and_user_files_from_a_fake_hub": 10,
    "tests/test_decoding.py::test_sampling": 9,
    "tests/test_collection.py::test_every_format_reads_each_row_once_and_shards_split_them[jsonl.gz]": 9,
}
# Per file, for tests not listed above.
FILE_DEFAULT_SECONDS = {
    "tests/test_collection.py": 5,
    "tests/test_robustness.py": 2,  # (its training runs are listed above)
    "tests/test_cli.py": 2,  # (its subprocess tests are listed above)
    "tests/test_decoding.py": 8,
    "tests/test_trainer.py": 6,
    "tests/test_model.py": 4,
    "tests/test_t5x_fixture_logits.py": 3,
    "tests/test_checkpoint_errors.py": 2,
    "tests/test_t5x_optimizer_state.py": 5,
    "tests/test_inference.py": 12,
    "tests/test_catalog.py": 12,  # fresh interpreters importing the catalog
    "tests/test_own_data.py": 15,  # flan-jax subprocesses
    "tests/test_pallas_attention.py": 8,  # Pallas in interpret mode
    "tests/test_overlap.py": 10,
    "tests/test_peft_interop.py": 8,  # transformers and peft beside flan-jax
    "tests/test_prompt_tuning.py": 6,
    "tests/test_heldout.py": 5,
    "tests/test_accel_options.py": 6,
    "tests/test_lora.py": 2,  # (its training runs are listed above)
    "tests/test_recipe.py": 5,
}


def _expected_seconds(item: pytest.Item) -> float:
    nodeid = item.nodeid.split("@")[0]
    for key in (nodeid, nodeid.split("[")[0]):
        if key in EXPECTED_SECONDS:
            return EXPECTED_SECONDS[key]
    return FILE_DEFAULT_SECONDS.get(nodeid.split("::")[0], 1.0)


# The fast tier, `bash tests/run.sh -m "not slow"`, leaves out the tests marked
# `slow`: those marked `@pytest.mark.slow`, and every test EXPECTED_SECONDS
# lists at SLOW_SECONDS or more (file defaults do not count), so that one table
# says both what a test costs and which tier it is in.
SLOW_SECONDS = 9


def _is_slow(item: pytest.Item) -> bool:
    nodeid = item.nodeid.split("@")[0]
    listed = EXPECTED_SECONDS.get(nodeid, EXPECTED_SECONDS.get(nodeid.split("[")[0], 0))
    return listed >= SLOW_SECONDS


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"slow: a test of {SLOW_SECONDS} s or more (tests/conftest.py); -m 'not slow' is the fast tier")


# Module-scoped but only a check: no reason to keep their tests together.
_CHEAP_SHARED_FIXTURES = {"flan_cot_data"}


def _shares_a_module_fixture(item: pytest.Item) -> bool:
    fixtureinfo = getattr(item, "_fixtureinfo", None)
    if fixtureinfo is None:
        return False
    for name in item.fixturenames:
        fixturedefs = fixtureinfo.name2fixturedefs.get(name)
        if not fixturedefs or name in _CHEAP_SHARED_FIXTURES:
            continue
        fixturedef = fixturedefs[-1]  # the one the test gets
        if fixturedef.scope in ("module", "package", "class") and not getattr(fixturedef, "_autouse", False):
            return True
    return False


def _group_name(item: pytest.Item) -> str | None:
    mark = item.get_closest_marker("xdist_group")
    if mark is None:
        return None
    return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))


def _xdist_group_suffix(item: pytest.Item) -> None:
    """Puts the `@group` suffix on the node id, as xdist's `--dist loadgroup`
    does (its scheduler groups by that suffix), where xdist could not: xdist
    3.8 sets `item._nodeid`, which pytest >= 9.2 no longer reads its node ids
    from. Does nothing where xdist did it, or where pytest changed again."""
    names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")})
    if not names or "@" in item.nodeid:
        return
    try:
        from _pytest.nodeid import coerce_node_id

        item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")
    except (ImportError, AttributeError, TypeError):
        pass


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    for item in items:  # before `-m` selects by marks
        if _is_slow(item) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
    under_xdist = bool(os.environ.get("PYTEST_XDIST_WORKER"))
    if under_xdist:  # before xdist's own hook reads the xdist_group marks
        for item in items:
            if _group_name(item) is None and _shares_a_module_fixture(item):
                item.add_marker(pytest.mark.xdist_group(Path(item.nodeid.split("::")[0]).name))
    result = yield
    if not under_xdist:
        return result
    cost: dict[str, float] = {}  # per unit of scheduling: a group, or one test
    first: dict[str, int] = {}
    unit_of: dict[int, str] = {}
    for index, item in enumerate(items):
        group = _group_name(item)
        unit = f"@{group}" if group is not None else item.nodeid
        unit_of[id(item)] = unit
        cost[unit] = cost.get(unit, 0.0) + _expected_seconds(item)
        first.setdefault(unit, index)
    position = {id(item): index for index, item in enumerate(items)}
    items.sort(key=lambda item: (-cost[unit_of[id(item)]], first[unit_of[id(item)]], position[id(item)]))
    if config.getvalue("dist") == "loadgroup" or getattr(config.option, "loadgroup", False):
        for item in items:
            _xdist_group_suffix(item)
    return result
