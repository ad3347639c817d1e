"""Your own data as Flan-style SeqIO tasks: a JSONL/TSV/CSV file, or a TFDS dataset.

A library, not a task: call `register_file_task` or `register_tfds_task`
from your code, or from a module of your own in tasks/ (every module there
is imported by `tasks.register()`, so its tasks exist wherever tasks do):

    from tasks.templates import TaskSpec, Template
    from tasks.user_files import register_file_task

    register_file_task(
        "riddles", "/data/riddles.jsonl",
        field_map={"question": "prompt", "answer": "solution", "rationale": "why"},
        spec=TaskSpec("riddles", [Template("{question}"), Template("Riddle: {question}")]),
    )
    # -> riddles_zs_noopt, riddles_fs_noopt, riddles_zs_cot, riddles_fs_cot

`field_map` maps the example's fields (question, answer, and optionally
rationale and options) to the row's keys: JSON keys, CSV/TSV header names,
or 0-based column numbers for a CSV/TSV file without a header line. Options
map to a list of keys (one option each) or to one key holding a JSON list;
the answer must be one of the options, verbatim. Rows that do not fit are
skipped and counted in `sources.stats(name)`, with the file and line of the
first few. Chain-of-thought variants are registered only when a rationale
is mapped.

Splits: one file becomes "train" plus a "validation" split held out by a
hash of the question (`sources.hold_out`); or pass {split: path}. Few-shot
exemplars are drawn from "train". The whole file is held in memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from flan_jax.errors import UserError
from tasks import registry, seqio_tasks, sources
from tasks.templates import TaskSpec, Template

FieldRef = str | int  # A key or header name, or a column number.
FORMATS = {".jsonl": "jsonl", ".tsv": "tsv", ".csv": "csv"}
_ADVICE = "It was given to register_file_task; check the path."


def map_fields(row: sources.Row, field_map: Mapping[str, FieldRef | Sequence[FieldRef]], *,
               has_rationale: bool, multiple_choice: bool) -> sources.Example:
    """One row -> {question, answer, rationale[, options]}; raises MalformedRow."""

    def value(ref: FieldRef) -> Any:
        try:
            return row[ref]  # A dict by key, a list by column number.
        except (KeyError, IndexError, TypeError):
            raise sources.MalformedRow(f"no field {ref!r}") from None

    def as_text(found: Any, ref: FieldRef) -> str:
        if isinstance(found, bytes):  # TFDS text features.
            try:
                found = found.decode("utf-8")
            except UnicodeDecodeError:
                raise sources.MalformedRow(f"field {ref!r} is not valid UTF-8") from None
        if isinstance(found, (list, dict)):
            raise sources.MalformedRow(f"field {ref!r} is not text")
        return str(found).strip()  # Numbers too: a JSON answer 72 becomes "72".

    example = {
        "question": as_text(value(field_map["question"]), field_map["question"]),
        "answer": as_text(value(field_map["answer"]), field_map["answer"]),
        "rationale": as_text(value(field_map["rationale"]), field_map["rationale"]) if has_rationale else "",
    }
    sources.require_fields(example, ("question", "answer", "rationale") if has_rationale else ("question", "answer"))
    if multiple_choice:
        refs = field_map["options"]
        if isinstance(refs, (str, int)):  # One field holding the list.
            found = value(refs)
            found = found.tolist() if hasattr(found, "tolist") else found  # TFDS gives numpy arrays.
            if not isinstance(found, list):
                raise sources.MalformedRow(f"field {refs!r} is not a list of options")
            options = [as_text(option, refs) for option in found]
        else:  # One field per option.
            options = [as_text(value(ref), ref) for ref in refs]
        if example["answer"] not in options:
            raise sources.MalformedRow(f"answer {example['answer']!r} is none of the options {options}")
        example["options"] = options
    return example


def _spec_and_variants(name: str, field_map: Mapping[str, Any], spec: TaskSpec | None,
                       variants: Sequence[str] | None) -> tuple[TaskSpec, list[str], bool]:
    missing = {"question", "answer"} - set(field_map)
    if missing:
        raise ValueError(f"{name}: field_map needs {sorted(missing)}")
    spec = spec or TaskSpec(name, [Template("{question}")], multiple_choice="options" in field_map)
    if spec.multiple_choice != ("options" in field_map):
        raise ValueError(f"{name}: a multiple-choice spec needs field_map['options'], and only it")
    has_rationale = "rationale" in field_map
    if variants is None:
        variants = [v for v in spec.variants if has_rationale or not v.endswith("_cot")]
    return spec, list(variants), has_rationale


def _register(source: sources.LoadedSource, name: str, variants: Sequence[str]) -> list[str]:
    names = registry.add_source(source, {f"{name}_{variant}": variant for variant in variants})
    seqio_tasks.refresh()  # Visible at once when the tasks are registered already (a notebook).
    return names


def register_file_task(
    name: str,
    path: str | Mapping[str, str],
    *,
    format: str | None = None,  # noqa: A002 (the word users expect)
    field_map: Mapping[str, FieldRef | Sequence[FieldRef]] | None = None,
    spec: TaskSpec | None = None,
    variants: Sequence[str] | None = None,
    validation_percent: int = sources.VALIDATION_PERCENT,
) -> list[str]:
    """Registers SeqIO tasks `{name}_{variant}` reading a local, gs:// or http(s) file; returns their names.

    Args:
      name: the task name prefix; also the name of the source's `sources.stats`.
      path: one file (split into train and validation), or {split: path}.
      format: "jsonl", "tsv" or "csv"; by default from the file's extension.
      field_map: example field -> row key or column number (module docstring);
        default {"question": "question", "answer": "answer"}.
      spec: templates and few-shot settings; default one template, "{question}".
      variants: which of the spec's variants to register; default all
        (without *_cot unless a rationale is mapped).
      validation_percent: share of a single file held out for validation.
    """
    field_map = dict(field_map or {"question": "question", "answer": "answer"})
    spec, variants, has_rationale = _spec_and_variants(name, field_map, spec, variants)
    paths = {"train": path} if isinstance(path, str) else dict(path)
    paths = {split: p if "://" in p else os.path.abspath(p) for split, p in paths.items()}
    has_header = not any(isinstance(ref, int) for refs in field_map.values()
                         for ref in (refs if isinstance(refs, (list, tuple)) else [refs]))

    def parse(row: sources.Row) -> sources.Example:
        return map_fields(row, field_map, has_rationale=has_rationale, multiple_choice=spec.multiple_choice)

    def read(_: str, stats: sources.SourceStats) -> dict[str, list[sources.Example]]:  # The paths are fixed.
        splits = {}
        for split, file_path in paths.items():
            file_format = format or FORMATS.get(os.path.splitext(file_path)[1].lower())
            if file_format is None:
                raise UserError(f"{name}: cannot tell the format of {file_path}; pass format=")
            location, file_name = file_path.rsplit("/", 1)
            where, data = sources.read_data_file(name, location, file_name, _ADVICE)
            splits[split] = sources.parse_file(data, where, file_format, parse, stats, header=has_header)
        if set(paths) == {"train"}:
            return sources.hold_out(splits["train"], validation_percent)
        return splits

    splits = ("train", "validation") if set(paths) == {"train"} else tuple(paths)
    source = sources.LoadedSource(name, spec, splits, locate=lambda: ",".join(paths.values()), read=read)
    return _register(source, name, variants)


def register_tfds_task(
    name: str,
    tfds_name: str,
    field_map: Mapping[str, FieldRef | Sequence[FieldRef]],
    *,
    spec: TaskSpec | None = None,
    splits: Mapping[str, str] | None = None,
    data_dir: str | None = None,
    variants: Sequence[str] | None = None,
) -> list[str]:
    """Registers SeqIO tasks `{name}_{variant}` from a TFDS dataset; returns their names.

    Args:
      name, field_map, spec, variants: as for `register_file_task` (keys are
        the dataset's feature names).
      tfds_name: e.g. "my_dataset" or "my_dataset/config:1.0.0".
      splits: our split -> TFDS split, which may slice
        (default {"train": "train", "validation": "validation"}; e.g.
        {"train": "train[:98%]", "validation": "train[98%:]"}).
      data_dir: TFDS's data directory (default TFDS's own).
    """
    import tensorflow_datasets as tfds  # Only users of TFDS pay for importing it.

    field_map = dict(field_map)
    spec, variants, has_rationale = _spec_and_variants(name, field_map, spec, variants)
    split_map = dict(splits or {"train": "train", "validation": "validation"})

    def parse(row: sources.Row) -> sources.Example:
        return map_fields(row, field_map, has_rationale=has_rationale, multiple_choice=spec.multiple_choice)

    def read(_: str, stats: sources.SourceStats) -> dict[str, list[sources.Example]]:
        loaded = {}
        for split, tfds_split in split_map.items():
            try:
                dataset = tfds.load(tfds_name, split=tfds_split, data_dir=data_dir)
            except tfds.core.registered.DatasetNotFoundError as e:
                first_line = str(e).splitlines()[0]  # TFDS goes on to list every dataset it knows.
                raise sources.MissingDataError(f"{name}: {first_line} (tfds.load, data_dir={data_dir})") from None
            rows = ((f"{tfds_name}[{tfds_split}]:{i}", row) for i, row in enumerate(tfds.as_numpy(dataset)))
            loaded[split] = sources.parse_rows(rows, parse, stats)
        return loaded

    source = sources.LoadedSource(name, spec, tuple(split_map), locate=lambda: data_dir or "", read=read)
    return _register(source, name, variants)
