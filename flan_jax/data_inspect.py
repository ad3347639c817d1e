"""What a sample of examples looks like to training: token lengths, truncation, packing, lengths that pack well.

The figures behind `flan-jax data stats` (tasks/data_report.py
draws the sample from the registered tasks); nothing here depends on tasks/.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from flan_jax import data, errors, packing

DEFAULT_LENGTHS = {"inputs": 1024, "targets": 256}
PERCENTILES = (50, 90, 99)
FEATURES = ("inputs", "targets")


def _percentiles(values: Sequence[int]) -> dict[str, int]:
    values = np.asarray(values)
    out = {f"p{q}": int(np.percentile(values, q, method="inverted_cdf")) for q in PERCENTILES}
    out["max"] = int(values.max())
    return out


def _pack(examples: Sequence[Mapping[str, np.ndarray]], lengths: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Packs token sequences as training does (the packer `get_train_dataset` is configured with); returns all
    rows stacked."""
    signature = {k: tf.TensorSpec([None], tf.int32) for k in FEATURES}
    ds = tf.data.Dataset.from_generator(lambda: ({k: ex[k] for k in FEATURES} for ex in examples),
                                        output_signature=signature)
    packed = data.feature_converter(pack=True)(ds, dict(lengths))
    rows = list(packed.as_numpy_iterator())
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


# Row lengths `suggest_lengths` tries: these inputs lengths, targets in multiples of TARGET_LENGTH_STEP.
INPUT_LENGTH_CANDIDATES = (256, 512, 1024, 2048, 4096)
TARGET_LENGTH_STEP = 64


def suggest_lengths(
    token_lengths: Mapping[str, Sequence[int]],
    fill: float,
    *,
    max_truncated: float = 0.01,
    input_lengths: Sequence[int] = INPUT_LENGTH_CANDIDATES,
) -> dict[str, Any]:
    """Row lengths at which best-fit packing of examples of these token lengths (EOS included) reaches `fill`.

    The fill of a row is the share of its positions, inputs and targets
    together, that hold tokens: padding is what it costs in memory and
    compute. (Each feature alone rarely reaches 90%: rows fill up on one
    feature, usually inputs, before the other.)

    For each of `input_lengths`, target lengths in multiples of
    TARGET_LENGTH_STEP are simulated (`packing.simulate`, lengths only) from
    the shortest that cuts at most `max_truncated` of the examples (short
    rows fill well by cutting examples, which is no gain) up to the first
    that reaches `fill`, or until more target room saves no row (from there
    on the fill only falls).

    Returns {"fill", "max_truncated", "candidates": [{"inputs", "targets",
    "fill": {"total", "inputs", "targets"}, "truncated": {feature: share}}]
    (per inputs length the shortest targets reaching `fill`; shortest rows
    first), "suggestion": the first candidate or None, "closest": the
    best-filling length pair tried when none reaches `fill`}.
    """
    errors.require("fill", fill, errors.Check("a number in (0, 1]", lambda v: errors.POSITIVE_NUMBER.test(v) and v <= 1))
    errors.require("max_truncated", max_truncated, errors.FRACTION)
    lengths = {k: np.asarray(token_lengths[k], dtype=np.int64) for k in FEATURES}
    longest_targets = int(lengths["targets"].max(initial=1))
    tried, reaching = [], []
    for inputs in input_lengths:
        last_rows = None
        for targets in range(TARGET_LENGTH_STEP, max(inputs, longest_targets) + TARGET_LENGTH_STEP, TARGET_LENGTH_STEP):
            caps = {"inputs": inputs, "targets": targets}
            truncated = {k: float(np.mean(lengths[k] > caps[k])) if len(lengths[k]) else 0.0 for k in FEATURES}
            if max(truncated.values()) > max_truncated:
                continue
            sim = packing.simulate(lengths, caps)
            total = sum(sim.fill[k] * caps[k] for k in FEATURES) / sum(caps.values())
            tried.append({"inputs": inputs, "targets": targets, "fill": {"total": total, **sim.fill},
                          "truncated": truncated})
            if total >= fill:
                reaching.append(tried[-1])
                break
            if last_rows is not None and sim.rows >= last_rows:
                break
            last_rows = sim.rows
    reaching.sort(key=lambda c: (c["inputs"] + c["targets"], c["inputs"]))  # Shortest rows first.
    return {
        "fill": fill,
        "max_truncated": max_truncated,
        "candidates": reaching,
        "suggestion": reaching[0] if reaching else None,
        "closest": None if reaching or not tried else max(tried, key=lambda c: c["fill"]["total"]),
    }


def sample_figures(examples: Sequence[Mapping[str, np.ndarray]], token_lengths: Mapping[str, Sequence[int]],
                   task_feature_lengths: Mapping[str, int]) -> dict[str, Any]:
    """{"lengths": percentiles, "truncated": counts, "packing": rows and fill rates} of tokenized `examples`.

    `token_lengths` are the examples' lengths before truncation, EOS included;
    the examples are packed at `task_feature_lengths` as training packs them.
    """
    rows = _pack(examples, task_feature_lengths)
    fill_rates = data.fill_rates(rows)
    return {
        "lengths": {k: _percentiles(v) for k, v in token_lengths.items()},
        "truncated": {k: int(sum(n > task_feature_lengths[k] for n in v)) for k, v in token_lengths.items()},
        "packing": {
            "rows": len(rows["encoder_input_tokens"]),
            "examples_per_row": len(examples) / len(rows["encoder_input_tokens"]),
            "packer": data.configured_packing()[0],
            "fill_rate": {k: fill_rates[f"fill_rate/{k}"] for k in FEATURES},
        },
    }


def print_stats(r: Mapping[str, Any]) -> None:
    """Prints the report `data_report.stats` returns."""
    lengths = r["task_feature_lengths"]
    print(f"{r['name']} ({r['split']}): {r['num_examples']} examples sampled; "
          f"lengths inputs {lengths['inputs']}, targets {lengths['targets']}")
    print(f"\n{'task':<40} {'configured':>10} {'sampled':>9}")
    for task, s in sorted(r["shares"].items(), key=lambda kv: -kv[1]["configured"]):
        print(f"{task:<40} {s['configured']:10.2%} {s['sampled']:9.2%}")
    print(f"\n{'variant':<40} {'configured':>10} {'sampled':>9}")
    for variant, s in sorted(r["variant_shares"].items(), key=lambda kv: -kv[1]["configured"]):
        print(f"{str(variant or '(none)'):<40} {s['configured']:10.2%} {s['sampled']:9.2%}")
    if r.get("export_template_shares"):
        print(f"\n{'Flan Collection export: template type':<40} {'configured':>10} {'sampled':>9}")
        for key, s in r["export_template_shares"].items():
            print(f"{key:<40} {s['configured']:10.2%} {s['sampled']:9.2%}")
    print(f"\n{'tokens (EOS incl.)':<20}" + "".join(f"{p:>7}" for p in [*(f"p{q}" for q in PERCENTILES), "max"])
          + f"{'truncated':>12}")
    for k in FEATURES:
        row = r["lengths"][k]
        share = r["truncated"][k] / r["num_examples"]
        print(f"{k:<20}" + "".join(f"{v:7d}" for v in row.values()) + f"{r['truncated'][k]:6d} ({share:.1%})")
    p = r["packing"]
    print(f"\npacked ({p['packer']}): {p['rows']} rows, {p['examples_per_row']:.2f} examples per row; fill rate "
          f"inputs {p['fill_rate']['inputs']:.1%}, targets {p['fill_rate']['targets']:.1%}")
    if "fill_suggestion" in r:
        _print_fill_suggestion(r["fill_suggestion"])


def _print_fill_suggestion(s: Mapping[str, Any]) -> None:
    def describe(c: Mapping[str, Any]) -> str:
        fill, cut = c["fill"], c["truncated"]
        return (f"inputs {c['inputs']:5d}, targets {c['targets']:5d}: fill {fill['total']:.1%} "
                f"(inputs {fill['inputs']:.1%}, targets {fill['targets']:.1%}); "
                f"truncated inputs {cut['inputs']:.1%}, targets {cut['targets']:.1%}")

    print(f"\nlengths at which best-fit packing fills >= {s['fill']:.0%} of the rows (inputs and targets together) "
          f"and cuts <= {s['max_truncated']:.0%} of the examples; the shortest targets for each inputs length:")
    for c in s["candidates"]:
        print(f"  {describe(c)}")
    if s["suggestion"]:
        print(f"suggested: --inputs_length={s['suggestion']['inputs']} --targets_length={s['suggestion']['targets']}")
    else:
        print("  (none)")
        if s["closest"]:
            print(f"closest: {describe(s['closest'])}")
