"""The reports of `flan-jax data list|show|stats`, over the tasks and mixtures registered from tasks/.

Each function prints a report to stdout and returns the same figures as
plain data, for tests and notebooks. Names are looked up with
`data.get_mixture_or_task`, so an unknown name is a UserError that lists
what exists, and the names close to it. `show` also takes a task family
(`flan_cot_gsm8k`: the tasks `flan_cot_gsm8k_{variant}`). What does not
depend on tasks/ (token-length and packing figures, suggested lengths) is
in flan_jax/data_inspect.py.
"""

from __future__ import annotations

import collections
import difflib
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import seqio

from flan_jax import data, data_inspect
from flan_jax.data_inspect import DEFAULT_LENGTHS
from flan_jax.errors import UserError
from tasks import collection, mixing


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
    (`data_inspect.suggest_lengths`, under "fill_suggestion"), simulated on
    the token lengths: few-shot prompts were fitted to `task_feature_lengths`,
    so at other input lengths they would hold more or fewer exemplars.
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

    features = data.get_mixture_or_task(name).output_features
    token_lengths = {k: [_token_length(ex[f"{k}_pretokenized"], features[k]) for ex in sample]
                     for k in data_inspect.FEATURES}
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
        **data_inspect.sample_figures(sample, token_lengths, task_feature_lengths),
    }
    if template_shares := _export_template_shares(configured, sampled, drawn):
        result["export_template_shares"] = template_shares
    if fill is not None:
        result["fill_suggestion"] = data_inspect.suggest_lengths(token_lengths, fill, max_truncated=max_truncated)
    data_inspect.print_stats(result)
    return result


def _export_template_shares(configured: Mapping[str, float], sampled: Mapping[str, float],
                            drawn: Mapping[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """{"<stream task>/<template type>": configured and sampled shares} for tasks streaming a Flan Collection
    export (one task mixes a whole submixture, so its template types are shown here instead of as tasks)."""
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

