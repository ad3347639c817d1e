"""The `flan-jax` command end to end: train, resume, infer, and its error messages."""

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_MIXTURE, main_in_process, run_cli, train_flags

REPO = Path(__file__).resolve().parent.parent

# A few steps of the smoke config on the small mixture, small enough for a test; the
# evaluation at the end is on the same 4 tasks' validation split (not the smoke run's
# 18 evaluation tasks, whose pipelines each run would build).
LOG_AND_SAVE = {"TrainConfig.log_every": 2, "CheckpointConfig.save_every": 2}
SMALL = train_flags({
    **LOG_AND_SAVE,
    "EvalConfig.mixture_or_task_name": SMALL_MIXTURE,
    "EvalConfig.num_examples": 2,
    "EvalConfig.batch_size": 4,
})
# The same without the evaluation, for the runs whose tests look at no evaluation result.
SMALL_WITHOUT_EVAL = train_flags(LOG_AND_SAVE)


@pytest.fixture
def in_process_cli():
    """`flan-jax ARGV` in this process (conftest.main_in_process)."""
    return main_in_process


def _error_line(cli_main, argv: list[str]) -> str:
    """The one line `flan-jax ARGV` ends with: cli.main raises SystemExit with it, which Python prints to
    stderr and exits 1 with (any other exception would end it with a traceback: it fails the test here)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("flan-jax: error:"), message
    return message


# The errors below are cli.main's, checked in this process (a `flan-jax` process would import
# TensorFlow again for each); test_infer_on_missing_run_is_clear checks such a line as the
# command's stderr and exit status.
def test_bad_gin_flag_names_the_key(in_process_cli, capfd, tmp_path):
    message = _error_line(in_process_cli, ["train", *SMALL, f"--gin.TrainConfig.model_dir='{tmp_path}'",
                                           "--gin.TrainConfig.num_stepz=3"])
    assert "num_stepz" in message
    assert "Traceback" not in capfd.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was written


def test_unknown_gin_file_is_named(in_process_cli, capfd):
    message = _error_line(in_process_cli, ["train", "--gin_file=runs/nope.gin"])
    assert "runs/nope.gin" in message and "Traceback" not in capfd.readouterr().err


def test_unknown_task_is_named(in_process_cli, capfd, tmp_path):
    message = _error_line(in_process_cli, [
        "train", *SMALL, f"--gin.TrainConfig.model_dir='{tmp_path}'",
        "--gin.TrainConfig.mixture_or_task_name='no_such_task'",
    ])
    assert "no_such_task" in message
    assert "builtin_train" in message  # lists what exists
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("argv, key", [
    (["train", "--gin_file=runs/smoke.gin", "--gin.TrainConfig.batch_size=-3"], "TrainConfig.batch_size=-3"),
    (["train", "--gin_file=runs/smoke.gin", "--gin.TrainConfig.batch_size='abc'"], "TrainConfig.batch_size='abc'"),
    (["train", "--gin_file=runs/smoke.gin", "--gin.TrainConfig.task_feature_lengths={'inputs': 0, 'targets': 8}"],
     "TrainConfig.task_feature_lengths="),
    (["train", "--gin_file=runs/smoke.gin", "--gin.TrainConfig.num_steps=0"], "TrainConfig.num_steps=0"),
    (["train", "--gin_file=runs/smoke.gin", "--gin.TrainConfig.num_microbatches=0"], "TrainConfig.num_microbatches=0"),
    (["train", "--gin_file=runs/smoke.gin", "--gin.T5Config.num_heads=1.5"], "T5Config.num_heads=1.5"),
    (["bench", "train", "--batch_size=-3"], "--batch_size=-3"),
    (["bench", "decode", "--input_length=0"], "--input_length=0"),
    (["data", "show", "builtin_train", "-n", "0"], "-n=0"),
])
def test_bad_value_is_one_line_naming_the_key(in_process_cli, capfd, argv, key):
    with pytest.raises(SystemExit) as exit_info:
        in_process_cli(argv)
    message = str(exit_info.value.code)
    assert message.startswith(f"flan-jax: error: {key}") and "expected" in message, message
    assert "\n" not in message
    assert "Traceback" not in capfd.readouterr().err


def test_bench_decode_takes_a_gin_model_scanned(in_process_cli, capsys):
    in_process_cli(["bench", "decode", "--gin_file=models/tiny.gin", "--scan_layers", "--dtype=bfloat16", "--no_hf",
                    "--repeats=1", "--batch_size=2", "--input_length=16", "--new_tokens=4"])
    out = capsys.readouterr().out
    assert "'scan_layers': True" in out and "'dtype': 'bfloat16'" in out and "'emb_dim': 128" in out
    assert re.search(r"flan-jax greedy .*: +[\d,]+ tokens/s", out), out


def test_terminal_is_free_of_native_info_lines():
    """TensorFlow >= 2.19 logs INFO lines through absl while it loads, whatever TF_CPP_MIN_LOG_LEVEL says."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-m", "flan_jax.cli", "data", "list"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "builtin_train" in result.stdout
    for line in (result.stdout + result.stderr).splitlines():
        assert not re.match(r"I\d{4} |WARNING: All log messages before absl", line), line


@dataclasses.dataclass
class ResumedRun:
    """`flan-jax train` of SMALL for 4 steps, then resumed to 6 steps: each command's result, and the
    run directory's files as the first command left them."""

    model_dir: Path
    first: subprocess.CompletedProcess
    metrics_after_first: str
    config_after_first: str
    tb_after_first: list[str]
    checkpoints_after_first: list[str]
    longer: subprocess.CompletedProcess | None


def _train_argv(model_dir: Path, steps: int) -> list[str]:
    return ["train", *SMALL, f"--gin.TrainConfig.model_dir='{model_dir}'", f"--gin.TrainConfig.num_steps={steps}"]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> ResumedRun:
    """One run for both tests that need a trained one: test_train_resume_and_infer checks how it was
    made, test_convert_infer_and_finetune_from_any_format starts from its 6 steps (which equal an
    uninterrupted run's: test_robustness.py)."""
    model_dir = tmp_path_factory.mktemp("resumed") / "run"
    first = run_cli(*_train_argv(model_dir, 4))
    if first.returncode != 0:  # the tests report it; nothing more to run
        return ResumedRun(model_dir, first, "", "", [], [], None)
    snapshot = ((model_dir / "metrics.jsonl").read_text(), (model_dir / "config.gin").read_text(),
                sorted(p.name for p in (model_dir / "tb").iterdir()),
                sorted(p.name for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit()))
    return ResumedRun(model_dir, first, *snapshot, run_cli(*_train_argv(model_dir, 6)))


def _contents(directory: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `directory`."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_train_resume_and_infer(resumed_run, in_process_cli, capfd, monkeypatch):
    run = resumed_run
    model_dir, first = run.model_dir, run.first
    assert first.returncode == 0, first.stderr[-3000:]
    assert "evaluation (exact-match accuracy, %)" in first.stdout
    records = [json.loads(line) for line in run.metrics_after_first.splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 4]
    assert all(r["loss"] > 0 and r["tokens_per_sec"] > 0 for r in records if "loss" in r)
    assert any(k.startswith("eval/") and k.endswith("/accuracy") for k in records[-1])
    assert 0 < records[0]["fill_rate/inputs"] <= 1
    config_text = run.config_after_first
    assert "TrainConfig.num_steps = 4" in config_text and "T5Config.emb_dim" in config_text
    assert run.tb_after_first, "no TensorBoard event files"
    assert run.checkpoints_after_first == ["2", "4"]

    longer = run.longer
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "Resumed from" in longer.stdout and "steps           4 -> 6" in longer.stdout
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 4, 6]  # log steps as in one uninterrupted run
    assert (model_dir / "config.gin").read_text() == config_text  # never overwritten
    assert (model_dir / "config_resumed_at_4.gin").exists()

    # The same command again (in this process: the command's own work, without a second start-up
    # of TensorFlow) finds the run complete and overwrites nothing saved.
    files = _contents(model_dir)
    capfd.readouterr()
    in_process_cli(_train_argv(model_dir, 6))
    assert "already complete" in capfd.readouterr().out
    after = _contents(model_dir)
    assert {name: after.get(name) for name in files} == files

    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 plus 3?\n"))  # the prompt on stdin
    in_process_cli(["infer", f"--model_dir={model_dir}", "--max_decode_length=8"])
    out, err = capfd.readouterr()
    assert "> What is 2 plus 3?" in out
    assert "Traceback" not in err


def test_infer_on_missing_run_is_clear(tmp_path):
    result = run_cli("infer", f"--model_dir={tmp_path}", "hello")
    assert result.returncode != 0
    assert str(tmp_path) in result.stderr and "Traceback" not in result.stderr


def test_convert_infer_and_finetune_from_any_format(resumed_run, tmp_path, in_process_cli, capfd):
    """A run -> HF directory -> (infer with beam search; finetune from it) and -> flan-jax copy.

    Converting and answering run in this process (their output is the command's); the finetune is
    a `flan-jax train` of its own, so that its tasks are registered with the checkpoint's vocabulary
    as a fresh command registers them."""
    source = resumed_run.model_dir  # 6 steps of SMALL; read, never written
    trained = resumed_run.longer
    assert trained is not None and trained.returncode == 0, (trained or resumed_run.first).stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (source / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]

    in_process_cli(["convert", str(source), str(tmp_path / "hf"), "--to=hf"])
    assert {"config.json", "model.safetensors", "spiece.model"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    assert "refusing to overwrite" in _error_line(in_process_cli, ["convert", str(source), str(tmp_path / "hf"), "--to=hf"])

    prompt = "Q: What is 3 plus 4?"
    answers = {}
    for name, path, flags in [
        ("run", source, ["--decode=beam", "--num_beams=3"]),
        ("hf", tmp_path / "hf", ["--decode=beam", "--num_beams=3"]),
        ("sample", tmp_path / "hf", ["--decode=sample", "--top_k=5", "--seed=1"]),
    ]:
        capfd.readouterr()
        in_process_cli(["infer", f"--checkpoint={path}", "--max_decode_length=12", *flags, prompt])
        answers[name] = capfd.readouterr().out
        assert answers[name].startswith(f"> {prompt}\n"), answers[name]
    assert answers["run"] == answers["hf"]  # the same network, whichever format it was read from
    assert "Traceback" not in capfd.readouterr().err

    finetuned = tmp_path / "finetuned"
    result = run_cli(
        "train", *SMALL_WITHOUT_EVAL, f"--gin.TrainConfig.model_dir='{finetuned}'", "--gin.TrainConfig.num_steps=1",
        f"--gin.TrainConfig.init_checkpoint='{tmp_path / 'hf'}'",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initialised from hf checkpoint" in result.stdout
    first_loss = json.loads((finetuned / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    # Starts from the trained weights: far below a fresh model's first loss (on the same first batch,
    # which the source run trained on), and no worse than where the source run ended.
    assert first_loss < losses[0] - 1.0 and first_loss < losses[-1] + 0.5, (first_loss, losses)


def test_gin_vocabulary_binding_reregisters_tasks(tmp_path):
    """Finetuning a pretrained T5 swaps in its spiece.model for every task."""
    import shutil

    import seqio

    import gin
    import tasks
    from tasks import vocab

    model = tmp_path / "spiece.model"
    shutil.copy(vocab.default_vocabulary_path(), model)
    gin.parse_config(f"get_default_vocabulary.sentencepiece_model = '{model}'")
    try:
        tasks.register(again=True)
        for name in ("builtin_train", "flan_cot_gsm8k_zs_cot"):
            features = seqio.get_mixture_or_task(name).output_features
            assert features["targets"].vocabulary.sentencepiece_model_file == str(model)
    finally:
        gin.clear_config()
        tasks.register(again=True)
    assert seqio.get_mixture_or_task("builtin_train").output_features["targets"].vocabulary.sentencepiece_model_file != str(model)


def test_a_command_registers_tasks_once(in_process_cli, monkeypatch, capsys):
    """Registration goes through catalog.load_tasks, once per command (after gin, whose bindings shape the tasks)."""
    from flan_jax.commands import catalog

    calls = []
    load_tasks = catalog.load_tasks
    monkeypatch.setattr(catalog, "load_tasks", lambda *args: calls.append(args) or load_tasks(*args))
    in_process_cli(["data", "list"])
    assert "builtin_train" in capsys.readouterr().out
    assert calls == [()]
