"""Training-time evaluation on held-out suites and per template variant (EvalConfig.suites)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_MIXTURE

from flan_jax import evaluation, training_eval

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("FLAN_JAX_DATA_DIR", "/nonexistent"))


def _result(accuracy: float) -> evaluation.TaskResult:
    return evaluation.TaskResult("t", "generate", 2, {"accuracy": accuracy}, 0, 0, [])


def test_task_metrics_are_averaged_over_all_tasks_and_per_template_variant():
    results = {"a_zs_noopt": _result(10.0), "b_zs_noopt": _result(30.0), "a_fs_cot": _result(50.0),
               "mmlu_anatomy": _result(70.0)}
    flat = training_eval.task_averages(results)
    assert flat["eval/a_fs_cot/accuracy"] == 50.0
    assert flat["eval/average_accuracy"] == 40.0
    assert flat["eval/variant/zs_noopt/accuracy"] == 20.0
    assert flat["eval/variant/fs_cot/accuracy"] == 50.0
    assert not any("variant/" in k and "mmlu" in k for k in flat)
    assert sorted(k for k in flat if "/variant/" in k) == ["eval/variant/fs_cot/accuracy",
                                                          "eval/variant/zs_noopt/accuracy"]


def test_eval_config_takes_a_lone_suite_name_and_checks_its_limit():
    assert evaluation.EvalConfig(suites="gsm8k_cot, mgsm_cot").suites == ("gsm8k_cot", "mgsm_cot")
    assert evaluation.EvalConfig(suites=("flan_heldout",)).enabled
    assert not evaluation.EvalConfig().enabled
    with pytest.raises(evaluation.UserError, match="suite_num_examples"):
        evaluation.EvalConfig(suite_num_examples=0)


@pytest.mark.skipif(not (DATA / "gsm8k").is_dir(), reason=f"no GSM8K data in {DATA}")
def test_training_evaluates_suites_logs_their_normalized_average_and_keeps_the_best_by_it(tmp_path):
    model_dir = tmp_path / "run"
    flags = [
        "--gin_file=runs/smoke.gin",
        f"--gin.TrainConfig.mixture_or_task_name='{SMALL_MIXTURE}'",
        f"--gin.EvalConfig.mixture_or_task_name='{SMALL_MIXTURE}'",  # its validation split, not 18 tasks'
        "--gin.TrainConfig.task_feature_lengths={'inputs': 64, 'targets': 32}",
        "--gin.TrainConfig.batch_size=4", "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.eval_every=1",
        "--gin.TrainConfig.num_steps=2", f"--gin.TrainConfig.model_dir='{model_dir}'",
        "--gin.EvalConfig.num_examples=2", "--gin.EvalConfig.batch_size=4",
        "--gin.EvalConfig.suites=('gsm8k_cot',)", "--gin.EvalConfig.suite_num_examples=2",
        "--gin.EvalConfig.suite_decode_length=32",  # GSM8K's default is 256; the tiny model never stops
        "--gin.CheckpointConfig.save_every=1", "--gin.CheckpointConfig.keep_last=1",
        "--gin.CheckpointConfig.best_metric='eval/normalized_average'",
    ]
    result = subprocess.run([sys.executable, "-m", "flan_jax.cli", "train", *flags], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r for r in map(json.loads, (model_dir / "metrics.jsonl").read_text().splitlines())
             if "eval/normalized_average" in r]
    assert [r["step"] for r in evals] == [1, 2]
    for record in evals:
        assert 0.0 <= record["eval/gsm8k_cot/score"] <= 100.0
        assert record["eval/normalized_average"] == record["eval/gsm8k_cot/normalized"]
        assert "eval/average_accuracy" in record  # the mixture's evaluation beside the suite
        assert any(k.startswith("eval/variant/") and k.endswith("/accuracy") for k in record)
    # Each save handed orbax the suite's average for best_metric (a missing metric fails the save).
    saved = sorted(p.name for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and set(saved) <= {"1", "2"}
    assert "normalized average" in result.stdout
