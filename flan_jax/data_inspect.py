"""`flan-jax data list|show|stats`: what is registered, what its examples look like, how they pack.

Each function prints a report to stdout and returns the same figures as
plain data, for tests and notebooks. Names are looked up with
`data.get_mixture_or_task`, so an unknown name is a UserError that lists
what exists, and the names close to it. `show` also takes a task family
(`flan_cot_gsm8k`: the tasks `flan_cot_gsm8k_{variant}`).
"""

from __future__ import annotations

import collections
import difflib
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from flan_jax import data, errors, packing
from flan_jax.errors import UserError
from tasks import mixing

DEFAULT_LENGTHS = {"inputs": 1024, "targets": 256}
PERCENTILES = (50, 90, 99)
FEATURES = ("inputs", "targets")


def _tasks_of(provider: seqio.Task | seqio.Mixture) -> list[seqio.Task]:
    return [provider] if isinstance(provider, seqio.Task) else list(provider.tasks)


def _wrap(items: Sequence[str], indent: int = 4) -> str:
    return textwrap.fill(" ".join(items), width=100, initial_indent=" " * indent, subsequent_indent=" " * indent)


def _families() -> dict[str, dict[str, str]]:
    """{family: {variant: task}} of the registered tasks named `{family}_{variant}`, in name order."""
    families: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for name in sorted(seqio.TaskRegistry.names()):
        family, variant = mixing.split_variant(name)
        if variant:
            families[family][variant] = name
    return dict(families)


def _family(name: str) -> dict[str, str]:
    """{variant: task} in mixing.VARIANTS order if `name` is a task family (and no task or mixture), else {}."""
    if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
        return {}
    tasks = _families().get(name, {})
    return {variant: tasks[variant] for variant in mixing.VARIANTS if variant in tasks}


def _get(name: str, *, with_families: bool = False) -> seqio.Task | seqio.Mixture:
    """data.get_mixture_or_task, whose error for an unknown name also gives the registered names closest to it."""
    try:
        return data.get_mixture_or_task(name)
    except UserError as e:
        known = [*seqio.MixtureRegistry.names(), *seqio.TaskRegistry.names(), *(_families() if with_families else ())]
        close = difflib.get_close_matches(name, known, n=5)
        if not close:
            raise
        raise UserError(f"{e} Close to it: {', '.join(close)}.") from None


# --- list -------------------------------------------------------------------------------


def list_registered() -> dict[str, Any]:
    """Registered mixtures and tasks; tasks named `{family}_{variant}` are grouped by family.

    Returns {"mixtures": {name: {"tasks", "families", "variants", "entries",
    "missing_collections"}}, "families": {family: [variants]}, "other_tasks": [names]}.
    """
    families = {family: list(tasks) for family, tasks in _families().items()}
    other = [name for name in sorted(seqio.TaskRegistry.names()) if not mixing.split_variant(name)[1]]
    recipes = mixing.recipes()
    mixtures = {}
    for name in sorted(seqio.MixtureRegistry.names()):
        mixture = seqio.get_mixture_or_task(name)
        task_names = [t.name for t in mixture.tasks]
        split = [mixing.split_variant(t) for t in task_names]
        mixtures[name] = {
            "tasks": task_names,
            "families": sorted({family for family, variant in split if variant}),
            "variants": sorted({variant for _, variant in split if variant}),
            "entries": sorted(e for e in mixture.rate_per_task_name if e in seqio.MixtureRegistry.names()),
            "missing_collections": list(recipes[name].missing) if name in recipes else [],
            "collections": _collections(name, recipes[name]) if name in recipes else {},
        }
    result = {"mixtures": mixtures, "families": dict(families), "other_tasks": other}

    print(f"Mixtures ({len(mixtures)}):")
    for name, info in mixtures.items():
        line = f"  {name:<24} {len(info['tasks']):4d} tasks"
        if info["families"]:
            line += f", {len(info['families'])} families; variants {' '.join(info['variants'])}"
        if info["entries"]:
            line += f"; mixes {', '.join(info['entries'])}"
        print(line)
        for c, about in info["collections"].items():
            print(f"  {'':<24} {c:<7} {about['share']:6.1%}  {about['describe']}")
        if info["missing_collections"]:
            print(f"  {'':<24} recipe collections not here: {', '.join(info['missing_collections'])} "
                  "(shares renormalised over the others)")
    print(f"\nTask families ({len(families)}), tasks {{family}}_{{variant}}:")
    width = max((len(f) for f in families), default=0)
    for family, variants in sorted(families.items()):
        print(f"  {family:<{width}}  {' '.join(variants)}")
    if other:
        print(f"\nOther tasks ({len(other)}):")
        by_prefix: dict[str, list[str]] = collections.defaultdict(list)
        for name in other:
            by_prefix[name.split("_", 1)[0]].append(name)
        for prefix, names in sorted(by_prefix.items()):
            print(f"  {prefix} ({len(names)}):")
            print(_wrap(names))
    return result


def _collections(name: str, recipe: mixing.RecipeMixture) -> dict[str, dict[str, Any]]:
    """{collection: share, entry and what it reads} of a recipe mixture; an export's by template type."""
    from tasks import collection

    out = {}
    for c, share in recipe.shares.items():
        entry = f"{name}_{c}"
        about: dict[str, Any] = {"share": share, "entry": entry}
        provider = seqio.get_mixture_or_task(entry)
        source = getattr(provider, "source", None)
        if isinstance(source, collection.StreamSource):
            about.update(source="export", directory=source.index.directory, rows=source.index.rows,
                         kinds=len(source.keep), template_shares=source.template_shares())
            about["describe"] = (f"export {source.index.directory}: {len(source.keep):,} tasks x template types, "
                                 f"{source.index.rows:,} rows; " +
                                 ", ".join(f"{t} {s:.0%}" for t, s in about["template_shares"].items()))
        else:
            tasks = _tasks_of(provider)
            about.update(source="tasks", kinds=len(tasks), describe=f"{len(tasks)} registered tasks ({entry})")
        out[c] = about
    return out


# --- show -------------------------------------------------------------------------------


def _select_tasks(name: str, variant: str | None) -> dict[str, float]:
    """{task: share} of a task, mixture or task family (equal shares), restricted to `variant`;
    a UserError if none is left."""
    if family := _family(name):
        shares = {task: 1.0 for task in family.values()}
    else:
        _get(name, with_families=True)
        shares = mixing.task_shares(name)
    if variant is None:
        return shares
    chosen = {t: s for t, s in shares.items() if mixing.split_variant(t)[1] == variant}
    if not chosen:
        present = sorted({v for t in shares if (v := mixing.split_variant(t)[1])})
        raise UserError(f"{name!r} has no task of variant {variant!r}; its variants: {', '.join(present) or '(none)'}")
    return chosen


def _token_length(text: bytes, feature: seqio.Feature) -> int:
    """Tokens of a rendered string once tokenized, EOS included, before any truncation."""
    return len(feature.vocabulary.encode(text.decode())) + int(feature.add_eos)


def _examples(task: seqio.Task, count: int, lengths: Mapping[str, int], split: str, *,
              shuffle: bool, seed: int) -> list[dict[str, Any]]:
    # A buffer of 1: the source already permutes its whole split when shuffling,
    # and the task's own buffer would render dozens of examples never shown.
    ds = task.get_dataset(lengths, split=split, shuffle=shuffle, shuffle_buffer_size=1, seed=seed,
                          num_epochs=None if shuffle else 1, try_in_mem_cache=False)
    return list(ds.take(count).as_numpy_iterator())


def show(
    name: str,
    variant: str | None = None,
    n: int | None = None,
    split: str = "train",
    task_feature_lengths: Mapping[str, int] = DEFAULT_LENGTHS,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Prints rendered examples of a task, of a mixture's tasks or of a task family's (of `variant`).

    A task or mixture shows `n` examples (default 3); a mixture's come from
    tasks drawn by their shares (`seed`). A task family shows `n` (default 1)
    of each variant: the same first examples through each variant's templates.
    Each task shows its first examples in order. Few-shot prompts are fitted
    to `task_feature_lengths` as in training. Returns [{"task", "inputs",
    "targets", "input_tokens", "target_tokens"}], token counts before truncation.
    """
    shares = _select_tasks(name, variant)
    if _family(name):
        counts = {task: n or 1 for task in shares}
    else:
        p = np.array(list(shares.values())) / sum(shares.values())
        counts = collections.Counter(np.random.default_rng(seed).choice(list(shares), size=n or 3, p=p))
    shown = []
    for task_name, count in counts.items():  # A Counter keeps the order in which tasks were first drawn.
        task = seqio.get_mixture_or_task(task_name)
        features = task.output_features
        for ex in _examples(task, count, task_feature_lengths, split, shuffle=False, seed=seed):
            shown.append({
                "task": task_name,
                "inputs": ex["inputs_pretokenized"].decode(),
                "targets": ex["targets_pretokenized"].decode(),
                "input_tokens": _token_length(ex["inputs_pretokenized"], features["inputs"]),
                "target_tokens": _token_length(ex["targets_pretokenized"], features["targets"]),
            })
    for i, ex in enumerate(shown, 1):
        print(f"=== {i}/{len(shown)}  {ex['task']}  ({split}; inputs {ex['input_tokens']} tokens, "
              f"targets {ex['target_tokens']} tokens) ===")
        print(f"--- inputs ---\n{ex['inputs']}\n--- targets ---\n{ex['targets']}\n")
    return shown


# --- stats ------------------------------------------------------------------------------


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


def stats(
    name: str,
    split: str = "train",
    num_examples: int = 2000,
    task_feature_lengths: Mapping[str, int] = DEFAULT_LENGTHS,
    seed: int = 0,
    fill: float | None = None,
    max_truncated: float = 0.01,
) -> dict[str, Any]:
    """Prints and returns what `num_examples` examples of a task or mixture look like to training.

    The sample: task membership drawn with seqio's sampler at the mixture's
    rates (`mixing.sample_task_names`), then that many examples of each task
    (shuffled). Reported: per-task and per-variant shares (configured and
    sampled); input and target lengths in tokens, EOS included, before
    truncation (p50/p90/p99/max) and how many exceed `task_feature_lengths`;
    packing: the examples packed at those lengths as training packs them
    (`get_train_dataset.packer`), and the share of non-padding tokens (fill
    rate) of the rows. With `fill` (e.g. 0.9), also the row lengths at which
    best-fit packing of the sample would fill that share of the rows
    (`suggest_lengths`, under "fill_suggestion"), simulated on the token
    lengths: few-shot prompts were fitted to `task_feature_lengths`, so at
    other input lengths they would hold more or fewer exemplars.
    """
    _get(name)
    configured = {t: s for t, s in mixing.task_shares(name).items()
                  if split in seqio.get_mixture_or_task(t).splits}  # seqio skips tasks without the split.
    if not configured:
        raise UserError(f"no task of {name!r} has a {split!r} split")
    total = sum(configured.values())
    configured = {t: s / total for t, s in configured.items()}
    order = mixing.sample_task_names(configured, num_examples, seed)
    counts = collections.Counter(order)

    drawn: dict[str, list[dict[str, Any]]] = {}
    for task_name, count in counts.items():
        drawn[task_name] = _examples(seqio.get_mixture_or_task(task_name), count, task_feature_lengths, split,
                                     shuffle=True, seed=seed)
    per_task = {t: iter(examples) for t, examples in drawn.items()}
    sample = [next(per_task[t]) for t in order]  # In the mixture's order, which packing depends on.

    token_lengths: dict[str, list[int]] = {k: [] for k in FEATURES}
    features = data.get_mixture_or_task(name).output_features
    for ex in sample:
        for k in FEATURES:
            token_lengths[k].append(_token_length(ex[f"{k}_pretokenized"], features[k]))
    rows = _pack(sample, task_feature_lengths)
    fill_rates = data.fill_rates(rows)

    sampled = {t: counts[t] / len(order) for t in configured}
    result = {
        "name": name,
        "split": split,
        "num_examples": len(sample),
        "task_feature_lengths": dict(task_feature_lengths),
        "shares": {t: {"configured": configured[t], "sampled": sampled[t]} for t in configured},
        "variant_shares": {
            v: {"configured": c, "sampled": mixing.shares_by_variant(sampled).get(v, 0.0)}
            for v, c in mixing.shares_by_variant(configured).items()
        },
        "lengths": {k: _percentiles(v) for k, v in token_lengths.items()},
        "truncated": {k: int(sum(n > task_feature_lengths[k] for n in v)) for k, v in token_lengths.items()},
        "packing": {
            "rows": len(rows["encoder_input_tokens"]),
            "examples_per_row": len(sample) / len(rows["encoder_input_tokens"]),
            "packer": data.configured_packing()[0],
            "fill_rate": {k: fill_rates[f"fill_rate/{k}"] for k in FEATURES},
        },
    }
    if template_shares := _export_template_shares(configured, sampled, drawn):
        result["export_template_shares"] = template_shares
    if fill is not None:
        result["fill_suggestion"] = suggest_lengths(token_lengths, fill, max_truncated=max_truncated)
    _print_stats(result)
    return result


def _export_template_shares(configured: Mapping[str, float], sampled: Mapping[str, float],
                            drawn: Mapping[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """{"<stream task>/<template type>": configured and sampled shares} for tasks streaming a Flan Collection
    export (one task mixes a whole submixture, so its template types are shown here instead of as tasks)."""
    from tasks import collection

    out = {}
    for task, share in configured.items():
        source = seqio.get_mixture_or_task(task).source
        if not isinstance(source, collection.StreamSource):
            continue
        expected = source.template_shares()
        seen = collections.Counter(ex["template_type"].decode() for ex in drawn.get(task, []))
        for template in expected:
            fraction = seen[template] / max(sum(seen.values()), 1)
            out[f"{task}/{template}"] = {"configured": share * expected[template], "sampled": sampled[task] * fraction}
    return out


def _print_stats(r: Mapping[str, Any]) -> None:
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
