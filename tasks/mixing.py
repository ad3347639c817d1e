"""Flan-style mixtures over SeqIO: capped example-proportional rates, variant weights, nesting.

SeqIO's rule, which everything here keeps: a mixture samples each entry with
probability rate / (sum of the mixture's rates); an entry that is itself a
mixture gets its rate as its total share, spread over its own tasks by their
rates (`seqio.Mixture.get_rate`). On top of it:

  example_proportional(tasks, cap, variant_weights)
      {task: rate} with rate = weight(variant) * min(examples, cap). The
      number of examples is the task's `num_input_examples(split)`, or the
      source is counted (`num_examples`). It is evaluated when a dataset is
      built, not at registration, so registering reads no data. Without
      weights, each dataset's capped size is split evenly over its variants
      present (weight 1/k): a multiple-choice dataset with six variants
      weighs no more than one with four. Explicit weights multiply as given;
      variants they do not list are left out.
  add_mixture(name, {entry: rate})
      registers a SeqIO mixture; entries name tasks or mixtures (nesting).
  add_recipe(name, collections, FLAN_2022)
      the Flan 2022 recipe: collection `c` becomes the mixture `{name}_{c}`
      (example-proportional, capped at the collection's cap) with share
      `rate(c)` of `{name}`. Collections with no tasks are left out and the
      remaining shares renormalised to sum to 1, with a warning.
  family_mixtures(families)
      the built-in mixtures over the generated families (tasks/family.py):

        builtin_train          train split of every family not held out, all
                               variants. Rates: equal per family, split evenly
                               over its variants (so multiple-choice families,
                               which have six variants instead of four, are
                               not over-sampled).
        builtin_validation_zs  the same families' zero-shot variants, for
                               in-distribution evaluation on the validation split.
        builtin_heldout        every variant of the held-out families, never
                               trained on.
        builtin_eval           held-out plus in-distribution zero-shot: what
                               the smoke run evaluates.

      (`builtin_small`, four tasks covering every kind of variant for quick
      runs and the tests, is registered beside them by tasks/builtin.py.)

`tasks/flan2022.py` applies the recipe to the collections present here.
A task named `{family}_{variant}` (e.g. `flan_cot_gsm8k_fs_cot`) belongs to
`family` (`split_variant`); the variants are those of tasks/templates.py.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

import seqio
import tensorflow as tf

from tasks import registry, templates
from tasks.family import Family, task_name

logger = logging.getLogger(__name__)

TRAIN_MIXTURE = "builtin_train"
HELDOUT_MIXTURE = "builtin_heldout"
VALIDATION_MIXTURE = "builtin_validation_zs"
EVAL_MIXTURE = "builtin_eval"

VARIANTS = tuple(dict.fromkeys(templates.MC_VARIANTS + templates.NOOPT_VARIANTS + templates.OPT_VARIANTS))


def split_variant(task_name: str) -> tuple[str, str | None]:
    """("flan_cot_gsm8k", "fs_cot") for "flan_cot_gsm8k_fs_cot"; (name, None) without a variant suffix."""
    parts = task_name.rsplit("_", 2)
    if len(parts) == 3 and f"{parts[1]}_{parts[2]}" in VARIANTS:
        return parts[0], f"{parts[1]}_{parts[2]}"
    return task_name, None


# --- rates ------------------------------------------------------------------------------


def num_examples(task: seqio.Task | str, split: str = "train") -> int:
    """Input examples of a task's split: SeqIO's count if the source has one, else counted."""
    task = seqio.get_mixture_or_task(task) if isinstance(task, str) else task
    known = task.num_input_examples(split)
    return int(known) if known is not None else _count(task.source, split)


@functools.lru_cache(maxsize=None)
def _count(source: seqio.DataSource, split: str) -> int:
    # Keyed by the source object: a task's variants share one source, so a
    # file is counted once however many variant tasks read it.
    ds = source.get_dataset(split=split, shuffle=False)
    size = int(ds.cardinality())
    if size >= 0:
        return size
    return int(ds.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))


@dataclasses.dataclass(frozen=True)
class CappedRate:
    """A SeqIO rate function: weight * min(number of examples, cap), evaluated when needed."""

    cap: int | None = None
    weight: float = 1.0
    split: str = "train"

    def __call__(self, task: seqio.Task) -> float:
        n = num_examples(task, self.split)
        return self.weight * (n if self.cap is None else min(n, self.cap))


def example_proportional(
    tasks: Iterable[str],
    cap: int | None = None,
    *,
    variant_weights: Mapping[str, float] | None = None,
    split: str = "train",
) -> dict[str, CappedRate]:
    """{task: rate function} for example-proportional mixing with a per-task cap.

    Rate = weight * min(examples of `split`, cap). Without `variant_weights`,
    weight = 1 / (number of the family's variants among `tasks`). With them,
    weight = variant_weights[variant]; tasks whose variant is not listed (or
    has weight 0), and tasks without a variant suffix, are left out.
    """
    tasks = list(dict.fromkeys(tasks))
    per_family = Counter(split_variant(t)[0] for t in tasks)
    rates = {}
    for task in tasks:
        family, variant = split_variant(task)
        if variant_weights is None:
            weight = 1.0 / per_family[family]
        else:
            weight = float(variant_weights.get(variant, 0.0)) if variant else 0.0
        if weight > 0:
            rates[task] = CappedRate(cap, weight, split)
    return rates


# --- registration -----------------------------------------------------------------------


def add_mixture(name: str, entries: Mapping[str, registry.MixtureRate] | Sequence[tuple[str, registry.MixtureRate]]) -> None:
    """Registers a SeqIO mixture of tasks and/or mixtures with the given rates.

    It is recorded in tasks/registry.py, and tasks/seqio_tasks.py registers
    it after the tasks and mixtures it names (so files may add them in any
    order); if every entry is registered already (e.g. in a notebook), it
    is also registered now.
    """
    entries = list(entries.items()) if isinstance(entries, Mapping) else list(entries)
    if not entries:
        raise ValueError(f"mixture {name!r} has no entries")
    registry.add_mixture(name, entries)  # Recorded either way, so re-registering keeps the latest.
    known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    if all(entry in known for entry, _ in entries):
        seqio.MixtureRegistry.remove(name)
        seqio.MixtureRegistry.add(name, entries)


def family_mixtures(families: Iterable[Family]) -> dict[str, list[tuple[str, float]]]:
    """The built-in mixtures over generated families (see the module docstring), by name."""
    train, validation, heldout = [], [], []
    for family in sorted(families, key=lambda f: f.name):
        variants = family.spec.variants
        names = [task_name(family.name, v) for v in variants]
        if family.heldout:
            heldout += [(n, 1.0) for n in names]
        else:
            train += [(n, 1.0 / len(variants)) for n in names]
            validation += [(task_name(family.name, v), 1.0) for v in variants if v in templates.ZERO_SHOT_VARIANTS]
    return {TRAIN_MIXTURE: train, VALIDATION_MIXTURE: validation, HELDOUT_MIXTURE: heldout,
            EVAL_MIXTURE: heldout + validation}


@dataclasses.dataclass(frozen=True)
class Collection:
    """One collection of a recipe: its share of the whole and its per-task example cap.

    `inverted_rate`: where a collection holds input-inversion tasks (the
    export's task names ending in "_ii": FLAN's CoT-II and Dialog-II), they
    form a group of their own at this rate against 1 for the rest, within each
    template type; None mixes them with the rest example-proportionally.
    """

    rate: float
    cap: int | None
    inverted_rate: float | None = None


# The Flan 2022 (Flan-T5) recipe: Flan 2021, T0-SF, Super-Natural
# Instructions v2, chain of thought, dialog. CoT-II and Dialog-II weigh 0.3
# within their submixture, as FLAN's flan/v2/mixtures.py has them.
FLAN_2022: dict[str, Collection] = {
    "flan": Collection(0.4, 30_000),
    "t0": Collection(0.32, 20_000),
    "niv2": Collection(0.2, 5_000),
    "cot": Collection(0.05, 100_000, inverted_rate=0.3),
    "dialog": Collection(0.03, 200_000, inverted_rate=0.3),
}


@dataclasses.dataclass(frozen=True)
class RecipeMixture:
    """What `add_recipe` registered: each present collection's share, and the collections left out."""

    shares: dict[str, float]
    missing: tuple[str, ...]


_RECIPES: dict[str, RecipeMixture] = {}


def add_recipe(
    name: str,
    collections: Mapping[str, Sequence[str]],
    recipe: Mapping[str, Collection] = FLAN_2022,
    *,
    streams: Mapping[str, str] | None = None,
    variant_weights: Mapping[str, float] | None = None,
    split: str = "train",
    warn: bool = True,
) -> RecipeMixture:
    """Registers `name`: the recipe's collections as nested, capped, example-proportional mixtures.

    Args:
      name: the mixture to register; collection `c` is registered as `{name}_{c}`.
      collections: {collection: its task names}; keys must be in `recipe`.
      recipe: {collection: Collection(rate, cap)}, e.g. FLAN_2022.
      streams: {collection: task} for collections already mixed inside one
        task (tasks/collection.py thins a submixture to the recipe's caps);
        the task is taken at the collection's share as it is. A collection
        in both arguments is taken from `streams`.
      variant_weights: passed to `example_proportional` for every collection.
      split: whose example counts set the rates.
      warn: log a warning when collections of the recipe are missing.

    Returns the share of `name` of each collection present (the recipe's
    rates renormalised to sum to 1) and the missing collections.
    """
    streams = dict(streams or {})
    unknown = sorted((set(collections) | set(streams)) - set(recipe))
    if unknown:
        raise ValueError(f"collections {unknown} are not in the recipe; it has {sorted(recipe)}")
    present: dict[str, list[str] | str] = {c: list(tasks) for c, tasks in collections.items() if tasks}
    present.update(streams)
    present = {c: present[c] for c in recipe if c in present}
    if not present:
        raise ValueError(f"recipe {name!r}: none of its collections {sorted(recipe)} has a task")
    missing = tuple(c for c in recipe if c not in present)
    if missing and warn:
        logger.warning("%s: no tasks for collection(s) %s; shares renormalised over %s",
                       name, ", ".join(missing), ", ".join(present))
    total = sum(recipe[c].rate for c in present)
    shares = {c: recipe[c].rate / total for c in present}
    entries = {}
    for c, tasks in present.items():
        if isinstance(tasks, str):
            registry.remove_mixture(f"{name}_{c}")  # What an earlier call may have registered instead.
            entries[tasks] = shares[c]
            continue
        rates = example_proportional(tasks, recipe[c].cap, variant_weights=variant_weights, split=split)
        if not rates:
            raise ValueError(f"recipe {name!r}: variant_weights leave collection {c!r} no task")
        add_mixture(f"{name}_{c}", rates)
        entries[f"{name}_{c}"] = shares[c]
    add_mixture(name, entries)
    _RECIPES[name] = RecipeMixture(shares, missing)
    return _RECIPES[name]


def recipes() -> dict[str, RecipeMixture]:
    """The mixtures registered by `add_recipe`, by name."""
    return dict(_RECIPES)


# --- what a mixture samples -------------------------------------------------------------


def task_rates(name: str) -> dict[str, float]:
    """Each task's rate in a task or mixture, nesting resolved, as seqio computes it (`Mixture.get_rate`)."""
    provider = seqio.get_mixture_or_task(name)
    if isinstance(provider, seqio.Task):
        return {provider.name: 1.0}
    return {task.name: float(provider.get_rate(task)) for task in provider.tasks}


def task_shares(name: str) -> dict[str, float]:
    """Each task's probability of being sampled from a task or mixture; sums to 1."""
    rates = task_rates(name)
    total = sum(rates.values())
    return {task: rate / total for task, rate in rates.items()}


def sample_task_names(rates: str | Mapping[str, float], num_samples: int, seed: int = 0) -> list[str]:
    """The tasks of the first `num_samples` examples a mixture draws, found without reading any data.

    `rates` is a registered name or {task: rate}. seqio mixes with
    `tf.data.Dataset.sample_from_datasets(datasets, rates, seed)` over its
    tasks in name order; this runs that sampler on datasets that yield only
    their task's index, so for a registered mixture it gives the task of each
    example that `get_dataset(..., seed=seed)` yields, without rendering.
    """
    rates = task_rates(rates) if isinstance(rates, str) else dict(rates)
    names = list(rates)
    datasets = [tf.data.Dataset.from_tensors(tf.constant(i, tf.int64)).repeat() for i in range(len(names))]
    sampled = tf.data.Dataset.sample_from_datasets(datasets, list(rates.values()), seed)
    return [names[i] for i in sampled.take(num_samples).as_numpy_iterator()]


def shares_by_variant(shares: Mapping[str, float]) -> dict[str | None, float]:
    """Sums {task: share} by template variant (None for tasks without one)."""
    out: dict[str | None, float] = defaultdict(float)
    for task, share in shares.items():
        out[split_variant(task)[1]] += share
    return dict(out)
