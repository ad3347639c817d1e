"""Shared test set-up: quiet TensorFlow, keep it off GPUs, find ../shared,
faster XLA compiles on CPU, and an order for pytest-xdist (tests/run.sh)."""

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import pytest

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
#    rough seconds on a 2-core machine (`bash tests/run.sh --durations=40`);
#    a test not listed counts as its file's default, or 1 s. Only the order
#    changes (worth updating when a slow test is added); a serial run, without
#    xdist, keeps pytest's file order.

EXPECTED_SECONDS = {
    "tests/test_robustness.py::test_each_dropout_rng_impl_trains_and_resumes_exactly": 240,
    "tests/test_cli.py::test_resume_restores_the_saved_input_state": 200,
    "tests/test_cli.py::test_convert_infer_and_finetune_from_any_format": 170,
    "tests/test_robustness.py::test_sigterm_saves_where_it_stopped_and_the_rerun_matches": 130,
    "tests/test_robustness.py::test_sigkill_then_rerun_logs_one_entry_per_step_as_uninterrupted": 130,
    "tests/test_cli.py::test_train_resume_and_infer": 120,
    "tests/test_partitioning.py::test_one_step_is_the_same_on_every_mesh_layout_and_microbatching": 90,
    "tests/test_multiprocess.py::test_two_processes_match_one_and_resume_on_another_mesh": 80,
    "tests/test_robustness.py::test_unreadable_newest_step_is_set_aside_for_infer_eval_and_resume": 65,
    "tests/test_install.py::test_wheel_installs_with_its_gin_configs": 50,
    "tests/test_evaluation.py::test_eval_suites_end_to_end_on_a_tiny_random_model": 70,
    "tests/test_evaluation.py::test_gold_targets_score_100_and_a_constant_answer_its_frequency": 45,
    "tests/test_evaluation.py::test_rank_classification_picks_the_option_transformers_scores_highest": 25,
    "tests/test_bench_train.py::test_bench_train_compares_with_transformers": 35,
    "tests/test_bench_train.py::test_bench_train_runs_without_the_data_stack_and_reports_figures": 30,
    "tests/test_bench_train.py::test_compile_only_plans_xxl_on_an_fsdp_mesh_it_does_not_have": 25,
    "tests/test_model.py::test_fused_attention_matches_the_einsum_path": 30,
    "tests/test_mixing.py::test_same_seed_gives_the_same_batches": 40,
    "tests/test_data_commands.py::test_stats_of_flan_cot": 25,
    "tests/test_formats.py::test_t5x_checkpoints_restore_onto_a_sharded_mesh": 25,
    "tests/test_data_commands.py::test_stats_of_builtin_train": 17,
    "tests/test_packing.py::test_train_iterator_resumes_exactly_with_best_fit": 30,  # with its fixture: 2 pipelines
    "tests/test_cli.py::test_infer_on_missing_run_is_clear": 15,
    "tests/test_model.py::test_remat_and_dropout_under_scan": 15,
    "tests/test_data_commands.py::test_bench_data_runs": 12,
    "tests/test_install.py::test_training_path_does_not_import_torch_or_transformers": 12,
    "tests/test_mixing.py::test_resume_by_skipping_continues_exactly": 12,
    "tests/test_mixing.py::test_resume_from_saved_position_continues_exactly": 9,
    "tests/test_multiprocess.py::test_global_batch_shards_concatenate_to_the_one_host_batch": 8,
    "tests/test_packing.py::test_packed_logits_equal_unpacked": 6,
    "tests/test_collection.py::test_flan2022_shares_follow_the_rates_caps_and_template_types": 25,
    "tests/test_collection.py::test_iteration_is_deterministic_and_resumes_at_a_saved_position": 15,
    "tests/test_collection.py::test_your_own_task_mixes_in_beside_the_collection": 9,
    "tests/test_heldout.py::test_flan_heldout_end_to_end_on_a_tiny_random_model": 45,
    "tests/test_training_eval.py::test_training_evaluates_suites_logs_their_normalized_average_and_keeps_the_best_by_it": 40,
    "tests/test_pallas_attention.py::test_pallas_kernel_and_fused_adafactor_under_fsdp_on_8_devices": 30,
    "tests/test_own_data.py::test_a_partly_bad_file_trains_and_reports_its_skips": 30,
    "tests/test_lora.py::test_sigkill_and_rerun_gives_the_uninterrupted_runs_adapters": 100,
    "tests/test_lora.py::test_lora_alone_halves_the_loss_of_a_held_in_task": 65,
    "tests/test_lora.py::test_training_changes_only_the_adapters_and_saves_only_them": 45,  # with its fixture: a LoRA run
    "tests/test_lora.py::test_two_lora_steps_are_the_same_on_every_mesh_and_microbatching": 40,
    "tests/test_lora.py::test_infer_and_eval_load_the_recorded_base": 30,
    "tests/test_peft_interop.py::test_training_continues_a_peft_adapter_on_the_base_it_records": 35,
    "tests/test_overlap.py::test_training_logs_the_running_exclusion_counts": 16,
    "tests/test_bench_train.py::test_peft_compare_measures_adapters_against_full_finetuning": 15,
    "tests/test_recipe.py::test_flan_t5_small_recipe_trains_five_steps": 65,
    "tests/test_recipe.py::test_a_finetune_takes_the_architecture_and_vocabulary_of_its_hf_checkpoint": 60,
    "tests/test_heldout.py::test_exported_prompts_answered_with_their_gold_targets_score_100_and_a_constant_its_frequency": 60,
    "tests/test_evaluation.py::test_a_model_that_runs_on_into_a_new_question_is_scored_on_its_first_answer_and_stops_early": 15,
    "tests/test_evaluation.py::test_choice_picks_the_option_with_the_highest_first_step_logit_as_transformers_computes_it": 20,
}
# Per file, for tests not listed above.
FILE_DEFAULT_SECONDS = {
    "tests/test_collection.py": 5,
    "tests/test_robustness.py": 40,  # subprocess training runs
    "tests/test_cli.py": 8,  # a subprocess each
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
    "tests/test_lora.py": 8,  # tiny models compiled per test
    "tests/test_recipe.py": 5,
}


def _expected_seconds(item: pytest.Item) -> float:
    nodeid = item.nodeid.split("@")[0]
    for key in (nodeid, nodeid.split("[")[0]):
        if key in EXPECTED_SECONDS:
            return EXPECTED_SECONDS[key]
    return FILE_DEFAULT_SECONDS.get(nodeid.split("::")[0], 1.0)


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
