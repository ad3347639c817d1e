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
rationale and options) to what the row holds them in (`field_value`):

    "prompt"                        a JSON key or CSV/TSV header name
    2                               a 0-based column of a CSV/TSV file without a header line
    "question.stem"                 a dotted path into nested JSON ("choices.0.text" indexes a list)
    "question.choices.text"         across a list: the key of each item (options from objects)
    lambda row: row["a"] + "!"      a function of the row (a dict, or a list of columns)

A list of strings mapped to a text field is joined with `join` (a space by
default): {"rationale": "steps"} with "steps": ["2 + 3 = 5.", "5 * 4 = 20."].
Options map to a list of refs (one option each) or to one ref giving a
list; the answer must be one of the options, verbatim. Rows that do not
fit are skipped and counted in `sources.stats(name)`, with the file and
line of the first few; a file with no usable row stops with one line that
says why (`sources.NoExamplesError`). Chain-of-thought variants are
registered only when a rationale is mapped.

Splits: one file becomes "train" plus a "validation" split held out by a
hash of the question (`sources.hold_out`); or pass {split: path}. Few-shot
exemplars are drawn from "train". The whole file is held in memory. Paths
may be URLs (gs://, s3://, http(s)://, hf://datasets/OWNER/NAME/FILE; see
`files.read_data_file`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flan_jax.errors import UserError
from tasks import files, registry, seqio_tasks, sources
from tasks.templates import TaskSpec, Template

FieldRef = str | int | Callable[[Any], Any]  # A key, dotted path or header name; a column number; a function.
FORMATS = {".jsonl": "jsonl", ".tsv": "tsv", ".csv": "csv"}
_ADVICE = "It was given to register_file_task; check the path."


def field_value(row: sources.Row, ref: FieldRef, field: str = "field") -> Any:
    """What `ref` names in `row`: a key, a column number, a dotted path or a function's result.

    A dotted path ("question.stem", "choices.0.text") is followed only when
    the row has no key spelled so; across a list, a name is taken from each
    of its items ("question.choices.text": every choice's text).
    """
    if callable(ref):
        try:
            return ref(row)
        except Exception as e:  # Whatever the user's function raises, this row does not fit it.
            raise sources.MalformedRow(f"field_map[{field!r}] raised {type(e).__name__}"
                                       + (f": {e}" if str(e) else "")) from None
    try:
        return row[ref]  # A dict by key, a list by column number.
    except (KeyError, IndexError, TypeError):
        if not isinstance(ref, str) or "." not in ref:
            raise sources.MalformedRow(f"no field {ref!r}") from None
    found: Any = row
    for part in ref.split("."):
        found = _step(found, part, ref)
    return found


def _step(found: Any, part: str, ref: str) -> Any:
    """One step of a dotted path: a key, a list index, or a key of every item of a list."""
    try:
        if isinstance(found, list) and part.lstrip("-").isdigit():
            return found[int(part)]
        if isinstance(found, list):
            return [item[part] for item in found]
        return found[part]
    except (KeyError, IndexError, TypeError):
        raise sources.MalformedRow(f"no field {ref!r} (at {part!r})") from None


def _describe(field: str, ref: FieldRef) -> str:
    return f"field_map[{field!r}]" if callable(ref) else repr(ref)


def as_text(found: Any, label: str, join: str = " ") -> str:
    """A field's value as stripped text: numbers too, a list of them joined with `join`; MalformedRow else."""
    found = found.tolist() if hasattr(found, "tolist") else found  # TFDS gives numpy values.
    if isinstance(found, bytes):  # TFDS text features.
        try:
            found = found.decode("utf-8")
        except UnicodeDecodeError:
            raise sources.MalformedRow(f"field {label} is not valid UTF-8") from None
    if isinstance(found, list) and found and all(isinstance(x, (str, bytes, int, float)) for x in found):
        return join.join(as_text(x, label, join) for x in found)
    if isinstance(found, (list, dict)) or found is None:
        raise sources.MalformedRow(f"field {label} is not text")
    return str(found).strip()  # Numbers too: a JSON answer 72 becomes "72".


def map_fields(row: sources.Row, field_map: Mapping[str, FieldRef | Sequence[FieldRef]], *,
               has_rationale: bool, multiple_choice: bool, join: str = " ") -> sources.Example:
    """One row -> {question, answer, rationale[, options]}; raises MalformedRow."""

    def text(field: str) -> str:
        ref = field_map[field]
        return as_text(field_value(row, ref, field), _describe(field, ref), join)

    example = {
        "question": text("question"),
        "answer": text("answer"),
        "rationale": text("rationale") if has_rationale else "",
    }
    sources.require_fields(example, ("question", "answer", "rationale") if has_rationale else ("question", "answer"))
    if multiple_choice:
        refs = field_map["options"]
        if isinstance(refs, (list, tuple)):  # One field per option.
            options = [as_text(field_value(row, ref, "options"), _describe("options", ref), join) for ref in refs]
        else:  # One field (or function) giving the list.
            found = field_value(row, refs, "options")
            found = found.tolist() if hasattr(found, "tolist") else found  # TFDS gives numpy arrays.
            if not isinstance(found, list):
                raise sources.MalformedRow(f"field {_describe('options', refs)} is not a list of options")
            options = [as_text(option, _describe("options", refs), join) for option in found]
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
    join: str = " ",
) -> list[str]:
    """Registers SeqIO tasks `{name}_{variant}` reading one file, local or a URL; returns their names.

    The path may be any URL `files.read_data_file` reads: gs://, s3://,
    http(s)://, hf://datasets/OWNER/NAME/FILE, ...

    Args:
      name: the task name prefix; also the name of the source's `sources.stats`.
      path: one file (split into train and validation), or {split: path}.
      format: "jsonl", "tsv" or "csv"; by default from the file's extension.
      field_map: example field -> row key, column number, dotted path or
        function of the row (module docstring); default {"question":
        "question", "answer": "answer"}.
      spec: templates and few-shot settings; default one template, "{question}".
      variants: which of the spec's variants to register; default all
        (without *_cot unless a rationale is mapped).
      validation_percent: share of a single file held out for validation.
      join: what joins a list of strings mapped to a text field.
    """
    field_map = dict(field_map or {"question": "question", "answer": "answer"})
    spec, variants, has_rationale = _spec_and_variants(name, field_map, spec, variants)
    paths = {"train": path} if isinstance(path, str) else dict(path)
    paths = {split: p if "://" in p else os.path.abspath(p) for split, p in paths.items()}
    has_header = not any(isinstance(ref, int) for refs in field_map.values()
                         for ref in (refs if isinstance(refs, (list, tuple)) else [refs]))

    def parse(row: sources.Row) -> sources.Example:
        return map_fields(row, field_map, has_rationale=has_rationale, multiple_choice=spec.multiple_choice,
                          join=join)

    def read(_: str, stats: sources.SourceStats) -> dict[str, list[sources.Example]]:  # The paths are fixed.
        splits = {}
        for split, file_path in paths.items():
            file_format = format or FORMATS.get(os.path.splitext(file_path)[1].lower())
            if file_format is None:
                raise UserError(f"{name}: cannot tell the format of {file_path}; pass format=")
            cut = file_path.rindex("/") + 1  # "memory://x.jsonl" -> "memory://", "x.jsonl"
            location, file_name = file_path[:cut], file_path[cut:]
            where, data = files.read_data_file(name, location, file_name, _ADVICE)
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
    join: str = " ",
) -> list[str]:
    """Registers SeqIO tasks `{name}_{variant}` from a TFDS dataset; returns their names.

    Args:
      name, field_map, spec, variants, join: as for `register_file_task` (keys are
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
        return map_fields(row, field_map, has_rationale=has_rationale, multiple_choice=spec.multiple_choice,
                          join=join)

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
