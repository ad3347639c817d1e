"""The attention kernels' gradient check (flan_jax/bench/attention_check.py)
and how the GPU benchmark matrix (launch/bench_matrix.py) uses it: a variant
whose gradients differ from the reference is never a best combination."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import jax
import pytest

from flan_jax import cli
from flan_jax.bench import attention_check
from flan_jax.model import pallas_attention

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def matrix():
    """launch/bench_matrix.py as a module (a script, not a package: imported by file name)."""
    spec = importlib.util.spec_from_file_location("bench_matrix", REPO / "launch" / "bench_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pallas_kernel_passes_at_tiny_shapes_in_float32():
    result = attention_check.check_attention("pallas", attention_check.TINY, dtypes=("float32",))
    assert result.passed, "\n".join(result.lines())
    assert [c.case for c in result.cases] == [c.name for c in attention_check.CASES]
    biased = [c for c in result.cases if "dtable" in c.errors]
    assert len(biased) == 2  # the bias table's gradient compared in both self-attentions
    assert all("interpreter" in c.route for c in result.cases)  # not claimed as what a GPU runs


def _without_table_gradient(original):
    """`offset_bias` with the same forward and a zero gradient for the table: a broken bias backward."""
    return lambda table, *args: original(jax.lax.stop_gradient(table), *args)


def _timed(variant: str, step_ms: float, loss: float = 2.0) -> dict:
    return {"model": "m", "batch": 2, "variant": variant, "status": "ok", "step_ms": step_ms, "loss": loss,
            "wall_s": 1.0, "compile_s": 1.0, "mfu": 0.5, "peak_memory_gib": 1.0}


def test_a_zeroed_bias_gradient_fails_the_check_and_the_matrix_excludes_it(monkeypatch, matrix):
    monkeypatch.setattr(pallas_attention, "offset_bias", _without_table_gradient(pallas_attention.offset_bias))
    encoder = attention_check.CASES[:1]
    result = attention_check.check_attention("pallas", attention_check.TINY, dtypes=("float32",), cases=encoder)
    assert not result.passed
    errors = result.cases[0].errors
    assert errors["dtable"] > 0.5  # all of the gradient is missing ...
    assert max(errors[k] for k in ("output", "dq", "dk", "dv")) < 1e-4  # ... and nothing else is wrong

    failed = dataclasses.asdict(result)
    passed = {**failed, "passed": True}
    # The broken kernel would be fastest with a loss within 2%: only the check keeps it out.
    records = [_timed("baseline", 100.0), matrix.checked(_timed("pallas", 70.0, loss=2.0002), failed),
               matrix.checked(_timed("cudnn_packed", 90.0), passed)]
    assert records[1]["status"] == matrix.EXCLUDED
    assert matrix.best_combination(records, "m") == ["cudnn_packed"]
    assert "gradients differ from the reference: excluded" in matrix.table(records)
    # A check that did not finish excludes too; a timed variant without a check is never picked.
    timed_out = matrix.checked(_timed("pallas", 70.0), {"passed": False, "status": "failed (timeout)"})
    assert timed_out["status"] == "gradient check failed (timeout): excluded"
    assert matrix.best_combination([_timed("baseline", 100.0), _timed("pallas", 70.0)], "m") == []


def test_cudnn_check_on_a_cpu_says_it_checked_the_fallback(tmp_path):
    """Through the command the matrix runs: JSON out, exit 0, and the route that really ran."""
    out = tmp_path / "check.json"
    cli.main(["bench", "attention_check", "--kernel=cudnn", "--shapes=tiny", f"--json_out={out}"])
    result = json.loads(out.read_text())
    assert result["passed"] and result["backend"] == "cpu"
    assert len(result["cases"]) == len(attention_check.CASES) * len(attention_check.DTYPES)
    assert all(c["route"].startswith("xla fallback, cuDNN not checked") for c in result["cases"])


def test_the_matrix_checks_each_attention_variant_before_timing_it(monkeypatch, matrix, tmp_path):
    """main() with the processes faked: pallas's check fails, so it is not timed, matrix.json
    holds the check, and the best combination (run in phase 2) leaves it out."""
    checks, timed = [], []

    def check(out_dir, model, batch, variant, preset, bindings):
        checks.append(variant)
        return {"passed": variant != "pallas", "wall_s": 1.0, "cases": []}

    def run(out_dir, model, batch, variant, preset, bindings):
        timed.append(variant)
        return _timed(variant, {"baseline": 100.0, "pallas": 50.0}.get(variant, 80.0)) | {"model": model}

    monkeypatch.setattr(matrix, "check_variant", check)
    monkeypatch.setattr(matrix, "run_variant", run)
    for name, value in {"MODELS": "m:2", "XL": "", "VARIANTS": "pallas cudnn_packed unroll2"}.items():
        monkeypatch.setenv(name, value)
    assert matrix.main(tmp_path) == 0
    assert checks == ["pallas", "cudnn_packed"]  # attention variants only
    assert timed == ["baseline", "cudnn_packed", "unroll2", "best(cudnn_packed+unroll2)"]
    saved = {r["variant"]: r for r in json.loads((tmp_path / "matrix.json").read_text())}
    assert saved["pallas"]["status"] == matrix.EXCLUDED and not saved["pallas"]["gradient_check"]["passed"]
    assert saved["cudnn_packed"]["gradient_check"]["passed"]
