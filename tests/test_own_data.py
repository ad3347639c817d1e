"""Your own data as found in the wild (tasks/user_files.py, tasks/sources.py, tasks/collection.py).

field_map's forms (keys, columns, dotted paths, functions, lists joined);
a file with no usable row stops every command with one line; a partly bad
one trains and reports its skips; files and the Flan Collection read
through fsspec: its in-memory file system, a localhost http server, and a
fake Hugging Face Hub registered under hf:// (tests have no network).
"""

from __future__ import annotations

import functools
import gzip
import importlib
import io
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seqio
from fsspec.implementations.memory import MemoryFileSystem

import tasks
from tasks import collection, collection_index, flan2022, registry, sources, user_files
from tasks.templates import TaskSpec, Template

tasks.register()  # Every task module's tasks, registered with SeqIO (once per process).

REPO = Path(__file__).resolve().parent.parent
CHAIN = {"question": "input", "answer": "target", "rationale": "steps"}  # The issue's chain-of-thought data set.


def _arith_rows(n: int) -> list[dict]:
    return [{"input": f"What is {i} plus {i}?", "target": 2 * i, "steps": [f"{i} + {i}", f"= {2 * i}."]}
            for i in range(n)]


def _load(name: str, path: str, field_map: dict, **kwargs) -> dict[str, list[dict]]:
    """Registers `name` over `path`, reads it, and removes it again; returns {split: examples}."""
    user_files.register_file_task(name, path, field_map=field_map, validation_percent=0, **kwargs)
    try:
        return registry.get_source(name).load()
    finally:
        registry.remove_source(name)


# --- field_map's forms ------------------------------------------------------------------------


def test_jsonl_lists_are_joined_and_dotted_paths_and_functions_reach_into_rows(tmp_path):
    arc = {"id": "q1", "question": {"stem": "Which is warm?", "choices": [{"label": "A", "text": "ice"},
                                                                            {"label": "B", "text": "sun"}]},
           "answerKey": "B", "fact": {"steps": ["The sun shines.", "It is warm."]}, "a.b": "dotted key"}
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps(arc) + "\n" + json.dumps({**arc, "answerKey": "C"}) + "\n")
    field_map = {
        "question": "question.stem",
        "options": "question.choices.text",  # A key of every object of the list.
        "answer": lambda row: next(c["text"] for c in row["question"]["choices"] if c["label"] == row["answerKey"]),
        "rationale": "fact.steps",
    }
    spec = TaskSpec("arc", [Template("{question}")], multiple_choice=True)
    loaded = _load("own_arc", str(path), field_map, spec=spec)
    assert loaded["train"] == [{"question": "Which is warm?", "answer": "sun", "options": ["ice", "sun"],
                                "rationale": "The sun shines. It is warm."}]
    assert sources.stats("own_arc").problems == [f"{path}:2: field_map['answer'] raised StopIteration"]

    # A key spelled with a dot wins over the path; "choices.1.text" indexes; join= joins lists.
    field_map = {"question": "a.b", "answer": "question.choices.1.text", "rationale": "fact.steps"}
    (example,) = _load("own_arc2", str(path), field_map, join="\n")["train"][:1]
    assert (example["question"], example["answer"], example["rationale"]) == (
        "dotted key", "sun", "The sun shines.\nIt is warm.")


def test_the_issues_chain_of_thought_rows_render_with_their_steps(tmp_path):
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _arith_rows(3)))
    names = user_files.register_file_task("own_arith", str(path), field_map=CHAIN,
                                          spec=TaskSpec("own_arith", [Template("Compute {question}")]))
    try:
        ds = seqio.get_mixture_or_task("own_arith_zs_cot").get_dataset(
            {"inputs": 64, "targets": 64}, split="train", shuffle=False)
        texts = {ex["targets_pretokenized"].decode() for ex in ds.as_numpy_iterator()}
        assert "1 + 1 = 2. So the answer is 2." in texts
        assert names[-1] == "own_arith_fs_cot" and sources.stats("own_arith").skipped == 0
    finally:
        registry.remove_source("own_arith")


@pytest.mark.parametrize("fmt", ["tsv", "csv"])
def test_columns_headers_and_functions_on_tsv_and_csv(tmp_path, fmt):
    sep = "\t" if fmt == "tsv" else ","
    # No header: columns by number, and functions of the list of columns.
    path = tmp_path / f"plain.{fmt}"
    path.write_text(sep.join(["2 + 2?", "(4)", "Two and two", "make four."]) + "\n" + "short\n")
    field_map = {"question": 0, "answer": lambda row: row[1].strip("()"), "rationale": lambda row: " ".join(row[2:])}
    assert _load(f"own_plain_{fmt}", str(path), field_map)["train"] == [
        {"question": "2 + 2?", "answer": "4", "rationale": "Two and two make four."}]
    assert sources.stats(f"own_plain_{fmt}").problems == [
        f"{path}:2: field_map['answer'] raised IndexError: list index out of range"]
    # A header line: names, a dotted name used verbatim, and a function of the row's dict.
    path = tmp_path / f"named.{fmt}"
    path.write_text(sep.join(["q.text", "gold"]) + "\n" + sep.join(["3 + 3?", "6"]) + "\n")
    field_map = {"question": "q.text", "answer": lambda row: f"{row['gold']}!"}
    assert _load(f"own_named_{fmt}", str(path), field_map)["train"] == [
        {"question": "3 + 3?", "answer": "6!", "rationale": ""}]


# --- a file with no usable row: one line from every command -----------------------------------

SMALL_TRAIN = [
    "--gin_file=runs/smoke.gin",
    "--gin.TrainConfig.task_feature_lengths={'inputs': 32, 'targets': 16}",
    "--gin.TrainConfig.batch_size=4",
    "--gin.TrainConfig.num_steps=2",
    "--gin.TrainConfig.log_every=1",
    "--gin.TrainConfig.eval_every=0",
    "--gin.EvalConfig.mixture_or_task_name=None",  # (eval's case names its tasks)
    "--gin.EvalConfig.num_examples=4",
    "--gin.EvalConfig.batch_size=4",
    "--gin.CheckpointConfig.save_every=2",
    "--gin.CheckpointConfig.best_metric=None",
    "--gin.get_train_dataset.pack_buffer_size=16",
]
BAD_ROWS = [json.dumps({"input": "no target"}), "{not json", json.dumps({"input": "x", "target": "y", "steps": {"a": 1}})]


@pytest.fixture(scope="module")
def own_files(tmp_path_factory) -> Path:
    """A module registering own_bad (every row unusable) and own_partly (3 of 43 rows), and a gin file importing it."""
    root = tmp_path_factory.mktemp("own")
    rows = [json.dumps(row) for row in _arith_rows(40)]
    (root / "partly.jsonl").write_text("\n".join(rows[:20] + BAD_ROWS + rows[20:]) + "\n")
    (root / "bad.jsonl").write_text("\n".join(BAD_ROWS) + "\n")
    (root / "own_cli_tasks.py").write_text(
        "from tasks.user_files import register_file_task\n"
        f"register_file_task('own_partly', {str(root / 'partly.jsonl')!r}, field_map={CHAIN!r})\n"
        f"register_file_task('own_bad', {str(root / 'bad.jsonl')!r}, field_map={CHAIN!r})\n")
    (root / "own.gin").write_text("import own_cli_tasks\n")
    return root


def _flan_jax(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`flan-jax ARGS --gin_file=own.gin` with the module importable."""
    script = shutil.which("flan-jax", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "flan_jax.cli"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([*command, *args, f"--gin_file={root / 'own.gin'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def partly_bad_run(own_files, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    model_dir = tmp_path_factory.mktemp("run")
    result = _flan_jax(own_files, "train", *SMALL_TRAIN, f"--gin.TrainConfig.model_dir='{model_dir}'",
                       "--gin.TrainConfig.mixture_or_task_name='own_partly_zs_cot'")
    return result, model_dir


def test_a_partly_bad_file_trains_and_reports_its_skips(partly_bad_run, own_files):
    result, model_dir = partly_bad_run
    assert result.returncode == 0, result.stderr[-3000:]
    path = own_files / "partly.jsonl"
    for line, reason in [(21, "no field 'target'"), (22, "not valid JSON"), (23, "field 'steps' is not text")]:
        assert f"own_partly: skipped row {path}:{line}: {reason}" in result.stderr
    assert (model_dir / "checkpoints").is_dir()


@pytest.mark.parametrize("command", [
    ["data", "show", "own_bad_zs_cot"],
    ["data", "stats", "own_bad_fs_cot"],
    ["bench", "data", "--mixture=own_bad_zs_noopt", "--lengths=64,32", "--repeats=1"],
    ["train", *SMALL_TRAIN, "--gin.TrainConfig.mixture_or_task_name='own_bad_fs_cot'"],
    ["eval", *SMALL_TRAIN, "--gin.EvalConfig.mixture_or_task_name='own_bad_zs_noopt'"],
], ids=["data show", "data stats", "bench data", "train", "eval"])
def test_a_file_with_no_usable_row_stops_every_command_with_one_line(command, own_files, partly_bad_run, tmp_path):
    model_dir = partly_bad_run[1] if command[0] == "eval" else tmp_path  # eval reads the partly bad run's checkpoint.
    result = _flan_jax(own_files, *command, f"--gin.TrainConfig.model_dir='{model_dir}'")
    path = own_files / "bad.jsonl"
    expected = (f"flan-jax: error: own_bad: no usable example in {path}: 3 rows read, 3 skipped (first: "
                f"line 1: no field 'target'; line 2: not valid JSON (Expecting property name enclosed in double "
                f"quotes); line 3: field 'steps' is not text)")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "buffer_size" not in result.stderr
    # train's progress bar shares stderr, and is not ended before the error.
    assert sum(line.endswith(expected) for line in re.split(r"[\r\n]+", result.stderr)) == 1, result.stderr[-3000:]
    assert "skipped row" not in result.stderr  # The reasons are in the one line.


# --- fsspec: memory://, a localhost http server, a fake Hub --------------------------------------


def _memory_fs() -> MemoryFileSystem:
    return fsspec.filesystem("memory")


# A small export: {collection: (format, {(task, template type): rows})}.
EXPORT = {
    "flan": ("jsonl", {("glue/cola:2.0.0", "zs_opt"): 30, ("anli/r1:0.1.0", "fs_opt"): 9}),
    "t0": ("jsonl.gz", {("quarel_logic_test", "zs_opt"): 25}),
    "niv2": ("parquet", {("task020_mctaco", "zs_opt"): 10, ("task1151_swap_words", "fs_opt"): 7}),
    "cot": ("jsonl", {("cot_gsm8k", "zs_opt"): 8}),
    "dialog": ("parquet", {("qrecc", "fs_opt"): 6}),
}
COUNTS = {c: counts for c, (_, counts) in EXPORT.items()}


def _export_rows(c: str) -> list[dict]:
    return [{"inputs": f"{c} {task} {template} #{i}", "targets": f"a{i}", "task_source": c, "task_name": task,
             "template_type": template} for (task, template), n in COUNTS[c].items() for i in range(n)]


def _write_export(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """EXPORT under `root` of `fs`, two shards per submixture (Parquet: row groups of 4 rows)."""
    for c, (fmt, _) in EXPORT.items():
        rows = _export_rows(c)
        for shard in range(2):
            path, part = f"{root}/{collection.SUBMIXTURES[c][0]}/part-{shard}.{fmt}", rows[shard::2]
            if fmt == "parquet":
                buffer = io.BytesIO()
                pq.write_table(pa.Table.from_pylist(part), buffer, row_group_size=4)
                fs.pipe(path, buffer.getvalue())
            else:
                data = "".join(json.dumps(row) + "\n" for row in part).encode()
                fs.pipe(path, gzip.compress(data) if fmt.endswith(".gz") else data)


@pytest.fixture
def memory_export(tmp_path, monkeypatch) -> Iterator[str]:
    """EXPORT at memory://export; small blocks, so JSON Lines files have several."""
    monkeypatch.setattr(collection_index, "BLOCK_LINES", 4)
    monkeypatch.setenv("FLAN_JAX_CACHE_DIR", str(tmp_path / "cache"))
    _write_export(_memory_fs(), "/export")
    yield "memory://export"
    _memory_fs().rm("/export", recursive=True)


def _inputs(source: collection.StreamSource, shard_info: seqio.ShardInfo | None = None) -> list[bytes]:
    return [ex["inputs"] for ex in source.get_dataset("train", seed=3, shard_info=shard_info).as_numpy_iterator()]


def test_the_collection_streams_from_memory_in_blocks_and_shards_split_them(memory_export):
    indexes = collection.find_submixtures(memory_export, progress=False)
    assert {c: index.counts for c, index in indexes.items()} == COUNTS
    assert collection_index.index_submixture(indexes["flan"].directory) == indexes["flan"]  # Cached (in the cache directory).
    for c in ("flan", "t0", "niv2"):  # JSON Lines, gzip (both in blocks of 4 lines), Parquet.
        rows = sorted(row["inputs"].encode() for row in _export_rows(c))
        source = collection.StreamSource(indexes[c], {k: 1.0 for k in COUNTS[c]}, name=f"own_mem_{c}")
        assert len(indexes[c].units()) > 2
        assert sorted(_inputs(source)) == rows
        parts = [_inputs(source, seqio.ShardInfo(i, 3)) for i in range(3)]
        assert sorted(sum(parts, [])) == rows and all(parts)


def test_bad_rows_in_a_block_keep_their_line_numbers(monkeypatch):
    monkeypatch.setattr(collection_index, "BLOCK_LINES", 2)
    good = {"inputs": "q", "targets": "a", "task_source": "cot", "task_name": "t", "template_type": "zs_opt"}
    lines = [json.dumps(good)] * 3 + ["{not json", json.dumps(good), json.dumps({**good, "targets": None})]
    _memory_fs().pipe("/bad_rows/cot_submix_original/a.jsonl", ("\n".join(lines) + "\n").encode())
    index = collection_index.index_submixture("memory://bad_rows/cot_submix_original", progress=False)
    source = collection.StreamSource(index, {("t", "zs_opt"): 1.0}, name="own_mem_bad_rows")
    sources.reset_stats("own_mem_bad_rows")
    assert _inputs(source) == [b"q"] * 4
    assert sorted(p.rsplit(":", 2)[1] for p in sources.stats("own_mem_bad_rows").problems) == ["4", "6"]
    _memory_fs().rm("/bad_rows", recursive=True)


def test_user_files_from_memory_and_from_an_http_server_kept_in_the_cache(tmp_path, monkeypatch):
    rows = "".join(json.dumps(row) + "\n" for row in _arith_rows(5))
    _memory_fs().pipe("/own/arith.jsonl", rows.encode())
    from_memory = _load("own_mem", "memory://own/arith.jsonl", CHAIN)
    assert len(from_memory["train"]) == 5 and from_memory["train"][1]["rationale"] == "1 + 1 = 2."

    served = tmp_path / "served"
    served.mkdir()
    (served / "arith.jsonl").write_text(rows)
    monkeypatch.setenv("FLAN_JAX_CACHE_DIR", str(tmp_path / "cache"))
    with _serve(served) as url:
        assert _load("own_http", f"{url}/arith.jsonl", CHAIN) == from_memory
        with pytest.raises(sources.MissingDataError, match=f"could not download {url}/nope.jsonl .*404"):
            _load("own_http_missing", f"{url}/nope.jsonl", CHAIN)
    assert _load("own_http", f"{url}/arith.jsonl", CHAIN) == from_memory  # From fsspec's cache: no server now.


class _FakeHub(MemoryFileSystem):
    """hf:// without the network: an in-memory store of its own, paths "datasets/OWNER/NAME/..."."""

    protocol = ("hf",)
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol("memory://" + path.removeprefix("hf://"))


@pytest.fixture
def fake_hub() -> Iterator[_FakeHub]:
    fsspec.register_implementation("hf", _FakeHub, clobber=True)
    yield _FakeHub()
    _FakeHub.store.clear()
    # Forget the fake: the next hf:// is huggingface_hub's again (imported on first use, as before).
    importlib.import_module("fsspec.registry")._registry.pop("hf", None)


def test_the_collection_and_user_files_from_a_fake_hub(fake_hub, monkeypatch, tmp_path):
    monkeypatch.setenv("FLAN_JAX_CACHE_DIR", str(tmp_path / "cache"))
    _write_export(fake_hub, "hf://datasets/someone")  # One dataset repository per submixture.
    monkeypatch.setenv(collection.COLLECTION_DIR_ENV, "hf://datasets/someone")
    try:
        flan2022.register()
        tasks.register(again=True)
        assert {c: index.counts for c, index in flan2022.submixtures().items()} == COUNTS
        ds = seqio.get_mixture_or_task("flan2022").get_dataset(
            {"inputs": 32, "targets": 8}, split="train", shuffle=True, seed=0, num_epochs=None, copy_pretokenized=True)
        drawn = {ex["inputs_pretokenized"].decode().split(" ")[0] for ex in ds.take(300).as_numpy_iterator()}
        assert drawn == set(COUNTS)
    finally:
        monkeypatch.delenv(collection.COLLECTION_DIR_ENV)
        flan2022.register()
        tasks.register(again=True)

    fake_hub.pipe("hf://datasets/someone/arith/data/train.jsonl",
                  "".join(json.dumps(row) + "\n" for row in _arith_rows(4)).encode())
    loaded = _load("own_hub", "hf://datasets/someone/arith/data/train.jsonl", CHAIN)
    assert [ex["answer"] for ex in loaded["train"]] == ["0", "2", "4", "6"]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _serve:
    """Serves `directory` on 127.0.0.1 in a thread while in the block; stops by itself after 120 s."""

    def __init__(self, directory: Path) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(directory)))
        self.timer = threading.Timer(120, self.server.shutdown)

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.timer.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()
