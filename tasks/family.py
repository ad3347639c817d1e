"""The catalog's data model: what a task's examples are and how one is rendered.

A `Source` is where a task's raw examples come from: a name, a `TaskSpec`
(its templates, tasks/templates.py), its splits, and the examples of each
split, deterministic in (split, index). A `Family` is a `Source` generated
by code: a `TaskSpec` plus a function that draws one example from a random
generator (tasks/builtin.py). `render_example` turns one raw example into
{"inputs", "targets"} for a variant (zs_noopt, fs_cot, ...); `postprocess`
reads the final answer back out of a model's output or a target.

Examples are deterministic in (family, split, index). Train examples whose
question also occurs in the validation split are redrawn, so the splits are
disjoint even where a family's space of questions is small.

Nothing here knows about SeqIO or the registry: tasks/registry.py stores
sources and families, tasks/seqio_tasks.py turns them into SeqIO tasks.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from tasks import templates

SPLITS = ("train", "validation")
TASK_PREFIX = "builtin_"
RENDER_SEED = 0  # Seeds template and exemplar choice; fixed so a task's data never changes.

Example = dict[str, Any]


class Source(Protocol):
    """What a task's pipeline needs from where its examples come from."""

    name: str
    spec: templates.TaskSpec
    splits: tuple[str, ...]

    def split_size(self, split: str) -> int: ...

    def example(self, split: str, index: int) -> Example: ...

    def exemplars(self, split: str, index: int, example: Mapping[str, Any], seed: int) -> list[Example]:
        """Few-shot exemplars for example `index` of `split`, never the example itself."""
        ...


@dataclasses.dataclass(frozen=True)
class Family:
    """A task family: how to render its examples and how to generate them."""

    spec: templates.TaskSpec
    generate: Callable[[random.Random], Example]
    train_size: int = 10_000
    validation_size: int = 100
    heldout: bool = False

    splits = SPLITS

    @property
    def name(self) -> str:
        return self.spec.name

    def split_size(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"family {self.name!r} has no split {split!r}; it has {SPLITS}")
        return self.train_size if split == "train" else self.validation_size

    def example(self, split: str, index: int) -> Example:
        """Example `index` of `split`; the same arguments always give the same example."""
        if not 0 <= index < self.split_size(split):
            raise IndexError(f"{self.name}/{split} has no example {index}")
        # A str seed is hashed with sha512, so it is stable across processes.
        rng = random.Random(f"{self.name}/{split}/{index}")
        example = self.generate(rng)
        if split == "train":
            while example["question"] in _validation_questions(self):
                example = self.generate(rng)
        return example

    def exemplars(self, split: str, index: int, example: Mapping[str, Any], seed: int) -> list[Example]:
        """`spec.num_shots` train examples drawn at random, never the query itself."""
        return templates.pick_exemplars(
            self.name, split, index, seed, example,
            train_example=functools.partial(self.example, "train"),
            num_train=self.train_size, count=self.spec.num_shots,
        )


@functools.lru_cache(maxsize=None)
def _validation_questions(family: Family) -> frozenset[str]:
    return frozenset(family.example("validation", i)["question"] for i in range(family.validation_size))


def task_name(family_name: str, variant: str) -> str:
    """The SeqIO task of one variant of a family, e.g. 'builtin_dates_zs_cot'."""
    return f"{TASK_PREFIX}{family_name}_{variant}"


def render_example(source: Source, split: str, index: int, example: Mapping[str, Any], variant: str, *,
                   seed: int = RENDER_SEED, max_input_length: int | None = None,
                   length_fn: Callable[[str], int] = len) -> dict[str, str] | None:
    """Renders example `index` of `split` as `variant`: picks the template and exemplars, then renders.

    None means the example is dropped (see `templates.render`).
    """
    spec = source.spec
    exemplars = source.exemplars(split, index, example, seed) if variant.startswith("fs_") else []
    return templates.render(
        spec, example, variant,
        template_index=templates.pick_template(spec.name, split, index, seed, len(spec.templates)),
        exemplars=exemplars, max_input_length=max_input_length, length_fn=length_fn,
    )


def postprocess(output: str | bytes, example: Mapping[str, Any] | None = None, is_target: bool = False) -> str:
    """SeqIO postprocess_fn: the final answer, for predictions and targets alike."""
    del example, is_target  # Same extraction either way, so exact match compares answers.
    return templates.extract_answer(output)
