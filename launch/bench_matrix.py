"""`bash launch/bench_gpu.sh --matrix OUT_DIR`: every accelerator variant of
issue 19 in one timed GPU run, to settle the defaults.

Phase 1 runs the baseline and each variant alone for each model in MODELS
(default base, batch 32, and large, 16, at 1024/256: bf16 and dropout 0.1
come from the model gin files), in the order `phase1_order` gives, as far
as the budget allows (groups a later model did not measure take the first
model's pick); phase 2 runs each model's best combination
(per group of exclusive variants, the fastest that beat the baseline by more
than 1% with a last-step loss within 2% of the baseline's) and XL with
large's best. Before an attention variant is timed, `flan-jax bench
attention_check` compares its output and gradients (dq, dk, dv, bias table)
with the einsum reference at that model's shapes (a wrong backward pass can
leave the loss within 2%); a variant that fails is not timed, and no best
combination takes it. Each run is its own `flan-jax bench train` process (XLA
flags apply at start-up, and a crash or hang costs one run), with a time
limit, never past what is left of BUDGET_S; phase 1 stops early to leave
phase 2 its time, and no run or check starts once the budget is spent, so
the whole stays within BUDGET_S. After every run OUT_DIR/matrix.json is
rewritten (a time-out loses nothing); the end prints a table.

Environment: MODELS ("model:batch ..."), XL ("model:batch", "" for none),
LENGTHS (inputs,targets), STEPS, BUDGET_S (default 470), RUN_TIMEOUT_S
(default 150), CHECK_TIMEOUT_S (the gradient check's, default 120), VARIANTS
(names to run, default all). RUNS_DIR: where each run's NAME.json and
NAME.log go (default OUT_DIR); LOGS_TAR: a .tar.gz of RUNS_DIR rewritten
after every run; REUSE_CHECKS=1: a gradient check whose JSON is already in
RUNS_DIR (e.g. from launch/gpu_check.sh) is read, not run again. Only the
standard library here; the runs need jax, flax, optax, orbax and gin-config.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flan_jax import xla_presets  # noqa: E402  (no JAX import: presets are only flags)

# name: (group of mutually exclusive variants, XLA preset, gin bindings). In priority order.
VARIANTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "pallas": ("attention", "", ("T5Config.attention_kernel='pallas'",)),
    "fused_adafactor": ("optimizer", "", ("adafactor.fused_stacked=True",)),
    "cudnn_packed": ("attention", "", ("T5Config.attention_kernel='cudnn'",)),
    "unroll2": ("unroll", "", ("T5Config.scan_unroll=2",)),
    "while_double_buffer": ("while", "while_double_buffer", ()),
    "lhs": ("lhs", "lhs", ()),
    "no_triton_gemm": ("triton_gemm", "no_triton_gemm", ()),
    "no_command_buffer": ("command_buffer", "no_command_buffer", ()),
    "no_remat_pass": ("remat_pass", "no_remat_pass", ()),
    "unroll_full": ("unroll", "", ("T5Config.scan_unroll=1000",)),
}
# What the profile says differs most between models (attention; large's optimizer).
EVERY_MODEL = ("pallas", "fused_adafactor")
BETTER_BY = 0.01  # a variant joins the best combination if it beats the baseline's step by more than this
# Every run takes the same steps on the same batch from the same weights, so a
# last-step loss this far (relative) from the baseline's flags a wrong variant.
LOSS_TOLERANCE = 0.02
CHECKED_GROUP = "attention"  # variants whose gradients are checked before they are timed
EXCLUDED = "gradients differ from the reference: excluded"
MIN_RUN_S = 1.0  # a run or check is not started with less of the budget left than this
_deadline = math.inf  # time.perf_counter() at which BUDGET_S is spent (main sets it)


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _subprocess(
    what: list[str], name: str, out_dir: Path, preset: str, timeout_env: str, timeout: str
) -> tuple[int | str, float, Path]:
    """`flan-jax WHAT... --json_out=OUT_DIR/NAME.json`, its output in NAME.log: (exit code,
    "timeout" or "budget spent", seconds, the JSON's path). Its time limit is `timeout_env`'s
    (else `timeout`) seconds, or what is left of the budget if less."""
    json_path = out_dir / f"{name}.json"
    limit = min(float(_env(timeout_env, timeout)), _deadline - time.perf_counter())
    if limit < MIN_RUN_S:
        return "budget spent", 0.0, json_path
    command = [sys.executable, "-m", "flan_jax.cli", *what, f"--json_out={json_path}"]
    env = xla_presets.with_flags(dict(os.environ), preset)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    json_path.unlink(missing_ok=True)
    with open(out_dir / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(command, check=False, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, round(time.perf_counter() - start, 1), json_path


def _log_tail(out_dir: Path, name: str) -> str:
    log = out_dir / f"{name}.log"
    if not log.exists():  # not started
        return ""
    return (log.read_text(errors="replace").strip().splitlines()[-1:] or [""])[0][:500]


def archive(runs_dir: Path, tar_path: Path) -> None:
    """Every file of `runs_dir` into the .tar.gz `tar_path`, replaced in one step (a kill leaves the last one)."""
    partial = tar_path.with_name(f".{tar_path.name}.partial")
    with tarfile.open(partial, "w:gz") as tar:
        for path in sorted(runs_dir.iterdir()):
            if path.is_file():
                tar.add(path, arcname=path.name)
    os.replace(partial, tar_path)


def reusable_check(out_dir: Path, model: str, variant: str) -> bool:
    """True if REUSE_CHECKS=1 and the variant's check on `model` is already in `out_dir`."""
    return _env("REUSE_CHECKS", "") == "1" and (out_dir / f"{model}_{variant}_check.json").exists()


def check_variant(out_dir: Path, model: str, batch: int, variant: str, preset: str, bindings: list[str]) -> dict:
    """`flan-jax bench attention_check` on the variant's kernel at the model's shapes:
    {"passed", "wall_s", and the check's cases or its failure}."""
    name = f"{model}_{variant}_check"
    print(f"== {model} batch {batch}: {variant}: gradients against the reference", flush=True)
    if reusable_check(out_dir, model, variant):
        check = {**json.loads((out_dir / f"{name}.json").read_text()), "reused": True}
        print(f"   {'agree' if check['passed'] else 'DIFFER'} (the check already in {out_dir})", flush=True)
        return check
    what = ["bench", "attention_check", f"--gin_file=models/{model}.gin", f"--batch_size={batch}",
            f"--lengths={_env('LENGTHS', '1024,256')}", *(f"--gin.{b}" for b in bindings)]
    rc, wall_s, json_path = _subprocess(what, name, out_dir, preset, "CHECK_TIMEOUT_S", "120")
    if rc not in (0, 1) or not json_path.exists():  # 1: it ran and the gradients differ
        print(f"   check failed ({rc}): {_log_tail(out_dir, name)[:200]}", flush=True)
        return {"passed": False, "wall_s": wall_s, "status": f"failed ({rc})", "error": _log_tail(out_dir, name)}
    check = {**json.loads(json_path.read_text()), "wall_s": wall_s}
    routes = sorted({c["route"] for c in check["cases"]})
    print(f"   {'agree' if check['passed'] else 'DIFFER'} ({wall_s} s; ran as {'; '.join(routes)})", flush=True)
    return check


def checked(record: dict, check: dict) -> dict:
    """`record` with its gradient check; if that did not pass, status EXCLUDED (or
    why the check did not finish) and the variant is not timed."""
    if check["passed"]:
        return {**record, "gradient_check": check}
    status = f"gradient check {check['status']}: excluded" if "status" in check else EXCLUDED
    return {**record, "gradient_check": check, "status": status}


def run_variant(out_dir: Path, model: str, batch: int, variant: str, preset: str, bindings: list[str]) -> dict:
    """One `flan-jax bench train` process; its figures, or its failure."""
    name = f"{model}_{variant}"
    what = ["bench", "train", f"--gin_file=models/{model}.gin", f"--batch_size={batch}",
            f"--lengths={_env('LENGTHS', '1024,256')}", f"--steps={_env('STEPS', '6')}", *(f"--gin.{b}" for b in bindings)]
    record = {"model": model, "batch": batch, "variant": variant, "xla_preset": preset, "bindings": bindings}
    print(f"== {model} batch {batch}: {variant}", flush=True)
    rc, record["wall_s"], json_path = _subprocess(what, name, out_dir, preset, "RUN_TIMEOUT_S", "150")
    if rc != 0 or not json_path.exists():
        tail = _log_tail(out_dir, name)
        print(f"   failed ({rc}): {tail[:200]}", flush=True)
        return {**record, "status": f"failed ({rc})", "error": tail}
    result = json.loads(json_path.read_text())[0]
    record.update(
        status="ok", compile_s=round(result["compile_seconds"], 1), step_ms=round(result["step_seconds"] * 1e3, 1),
        mfu=round(result["mfu"], 4), tokens_per_sec=round(result["tokens_per_sec"]),
        peak_memory_gib=result["peak_memory_bytes"] and round(result["peak_memory_bytes"] / 2**30, 1),
        loss=result["loss"],
    )
    print(f"   compile {record['compile_s']} s, step {record['step_ms']} ms, MFU {record['mfu']:.1%}", flush=True)
    return record


def loss_agrees(record: dict, baseline: dict) -> bool:
    return abs(record["loss"] - baseline["loss"]) <= LOSS_TOLERANCE * abs(baseline["loss"])


def gradients_agree(record: dict) -> bool:
    """True unless the variant is one whose gradients are checked and its check did not pass."""
    if VARIANTS.get(record["variant"], ("",))[0] != CHECKED_GROUP:
        return True
    return record.get("gradient_check", {}).get("passed") is True


def phase1_order(names: list[str], models: list[tuple[str, int]]) -> list[tuple[str, tuple[str, int]]]:
    """(variant, model) pairs, most telling first: the EVERY_MODEL variants on every
    model, then the others on the first model, then on the rest (what the budget allows)."""
    first = [(v, m) for v in names if v in EVERY_MODEL for m in models]
    others = [v for v in names if v not in EVERY_MODEL]
    return first + [(v, m) for group in (models[:1], models[1:]) for v in others for m in group]


def best_combination(records: list[dict], model: str) -> list[str]:
    """Per group, the fastest variant beating `model`'s baseline by more than
    BETTER_BY with a loss that agrees with the baseline's (and, for attention,
    gradients that agree with the reference's)."""
    ok = {r["variant"]: r for r in records if r["model"] == model and r["status"] == "ok"}
    if "baseline" not in ok:
        return []
    limit = ok["baseline"]["step_ms"] * (1 - BETTER_BY)
    picks: dict[str, dict] = {}
    for variant, r in ok.items():
        if variant in VARIANTS and r["step_ms"] < limit and loss_agrees(r, ok["baseline"]) and gradients_agree(r):
            group = VARIANTS[variant][0]
            if group not in picks or r["step_ms"] < picks[group]["step_ms"]:
                picks[group] = r
    return sorted(r["variant"] for r in picks.values())


def combined(variants: list[str]) -> tuple[str, list[str]]:
    """(XLA preset, gin bindings) of several variants together."""
    presets = [VARIANTS[v][1] for v in variants if VARIANTS[v][1]]
    return "+".join(presets), [b for v in variants for b in VARIANTS[v][2]]


def table(records: list[dict]) -> str:
    lines = ["| model, batch | variant | compile s | step ms | MFU | vs baseline | peak GiB | loss |", "| --- " * 8 + "|"]
    base = {r["model"]: r for r in records if r["variant"] == "baseline" and r["status"] == "ok"}
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['model']}, {r['batch']} | {r['variant']} | {r['status']} | | | | | |")
            continue
        ratio, loss = "", f"{r['loss']:.4f}"
        if r["model"] in base:
            ratio = f"{base[r['model']]['step_ms'] / r['step_ms']:.2f}x"
            loss += "" if loss_agrees(r, base[r["model"]]) else " (differs from the baseline's: excluded)"
        if not gradients_agree(r):
            loss += " (gradients not checked against the reference: excluded)"
        lines.append(f"| {r['model']}, {r['batch']} | {r['variant']} | {r['compile_s']} | {r['step_ms']} | "
                     f"{r['mfu']:.1%} | {ratio} | {r['peak_memory_gib']} | {loss} |")
    return "\n".join(lines)


def main(out_dir: Path) -> int:
    global _deadline
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(_env("RUNS_DIR", str(out_dir)))
    runs_dir.mkdir(parents=True, exist_ok=True)
    logs_tar = _env("LOGS_TAR", "")
    models = [(m, int(b)) for m, b in (s.split(":") for s in _env("MODELS", "flan_t5_base:32 flan_t5_large:16").split())]
    xl = _env("XL", "flan_t5_xl:8")
    names = _env("VARIANTS", " ".join(VARIANTS)).split()
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        sys.exit(f"VARIANTS: unknown {unknown}; known: {' '.join(VARIANTS)}")
    budget = float(_env("BUDGET_S", "470"))
    start = time.perf_counter()
    _deadline = start + budget
    records: list[dict] = []

    def record(r: dict) -> None:
        records.append(r)
        (out_dir / "matrix.json").write_text(json.dumps(records, indent=1))
        if logs_tar:
            archive(runs_dir, Path(logs_tar))

    def mean_run_s() -> float:
        walls = [r["wall_s"] for r in records if "wall_s" in r] or [60.0]  # variants excluded untimed have none
        return sum(walls) / len(walls)

    def mean_check_s() -> float:
        walls = [r["gradient_check"]["wall_s"] for r in records
                 if "wall_s" in r.get("gradient_check", {})] or [60.0]  # a reused check has none
        return sum(walls) / len(walls)

    phase2_runs = len(models) + bool(xl)
    for model, batch in models:
        record(run_variant(runs_dir, model, batch, "baseline", "", []))
    for variant, (model, batch) in phase1_order(names, models):
        group, preset, bindings = VARIANTS[variant]
        checks = group == CHECKED_GROUP
        left = budget - (time.perf_counter() - start)
        check_s = mean_check_s() if checks and not reusable_check(runs_dir, model, variant) else 0
        if left < mean_run_s() * (1 + phase2_runs) + check_s:
            print(f"== skipping {variant} on {model}: {left:.0f} s left is kept for the best combinations", flush=True)
            continue
        if not checks:
            record(run_variant(runs_dir, model, batch, variant, preset, list(bindings)))
            continue
        check = check_variant(runs_dir, model, batch, variant, preset, list(bindings))
        if not check["passed"]:
            untimed = {"model": model, "batch": batch, "variant": variant, "xla_preset": preset, "bindings": list(bindings)}
            record(checked(untimed, check))
            continue
        record(checked(run_variant(runs_dir, model, batch, variant, preset, list(bindings)), check))
    picks: dict[str, list[str]] = {}
    for model, _ in models:  # groups a later model did not measure take the first model's pick
        measured = {VARIANTS[r["variant"]][0] for r in records if r["model"] == model and r["variant"] in VARIANTS}
        inherited = [v for v in picks.get(models[0][0], []) if VARIANTS[v][0] not in measured]
        picks[model] = sorted(best_combination(records, model) + inherited)
    finals = [(model, batch, picks[model]) for model, batch in models]
    if xl:
        model, batch = xl.split(":")
        finals.append((model, int(batch), picks[models[-1][0]]))
    for model, batch, variants in finals:
        if _deadline - time.perf_counter() < MIN_RUN_S:
            print(f"== budget spent: {model} best not run", flush=True)
            continue
        preset, bindings = combined(variants)
        name = "best(" + "+".join(variants) + ")" if variants else "best(baseline)"
        alone = variants[0] if len(variants) == 1 else "baseline" if not variants else None
        if any(r["model"] == model and r["variant"] == alone for r in records):
            continue  # already measured
        record(run_variant(runs_dir, model, batch, name, preset, bindings))
    print(f"\n{table(records)}\n\nbest per model: {json.dumps(picks)}; {time.perf_counter() - start:.0f} s in all")
    return 0 if any(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python launch/bench_matrix.py OUT_DIR")
    sys.exit(main(Path(sys.argv[1])))
