"""The Flan Collection export (tasks/collection.py, tasks/flan2022.py): indexing, streaming, sharding, mixing."""

from __future__ import annotations

import collections
import functools
import http.server
import json
import os
import threading

import numpy as np
import pytest
import seqio

import tasks
from flan_jax import data
from flan_jax.errors import UserError
from tasks import collection, collection_bench, collection_index, flan2022, mixing, sources, user_files

tasks.register()  # Every task module's tasks, registered with SeqIO (once per process).

# Rows per (task, template type) of each submixture. Names as in the real export.
COUNTS = {
    "flan": {("glue/cola:2.0.0", "zs_opt"): 60, ("glue/cola:2.0.0", "fs_opt"): 20,
             ("anli/r1:0.1.0", "zs_opt"): 15, ("anli/r1:0.1.0", "zs_noopt"): 30},
    "t0": {("adversarial_qa_dbert", "zs_opt"): 40, ("adversarial_qa_dbert", "fs_noopt"): 12,
           ("quarel_logic_test", "zs_opt"): 8},
    "niv2": {("task020_mctaco_span_based_question", "zs_opt"): 30, ("task1151_swap_words", "zs_opt"): 4,
             ("task1151_swap_words", "fs_opt"): 10},
    "cot": {("cot_gsm8k", "zs_opt"): 25, ("cot_esnli", "fs_opt"): 15},
    "dialog": {("wiki_dialog", "zs_opt"): 20, ("qrecc", "fs_opt"): 6},
}
# The paper's rates with caps scaled down, so that caps bind on rows this few (flan 30, t0 20, niv2 5).
RECIPE = {c: mixing.Collection(x.rate, x.cap // 1000) for c, x in mixing.FLAN_2022.items()}
FORMATS = ("jsonl", "jsonl.gz", "parquet")


def write_export(root: str, formats: dict[str, str]) -> dict[str, list[dict]]:
    """The export of COUNTS under `root`; returns its rows by collection."""
    collection_bench.write_synthetic_export(root, COUNTS, formats, num_shards=2, row_group_size=16)
    return {c: list(collection_bench.synthetic_rows(c, per_kind)) for c, per_kind in COUNTS.items()}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One export per format, and one mixing them (a submixture each)."""
    out = {}
    for fmt in FORMATS:
        root = str(tmp_path_factory.mktemp(fmt.replace(".", "_")))
        out[fmt] = (root, write_export(root, {c: fmt for c in COUNTS}))
    root = str(tmp_path_factory.mktemp("mixed"))
    mixed = dict(zip(COUNTS, ["jsonl", "jsonl.gz", "parquet", "jsonl", "parquet"]))
    out["mixed"] = (root, write_export(root, mixed))
    return out


@pytest.fixture
def registered(exports):
    """Registers flan2022 over an export; afterwards, over what the environment gives again."""
    def register(which: str, **kwargs):
        root, rows = exports[which]
        flan2022.register(root, RECIPE, **kwargs)
        tasks.register(again=True)
        return root, rows

    yield register
    flan2022.register()
    tasks.register(again=True)


def expected_shares() -> dict[tuple[str, str, str], float]:
    """{(collection, task, template): share of flan2022}: rate x equal template types x capped counts."""
    out = {}
    for c, per_kind in COUNTS.items():
        cap = RECIPE[c].cap
        templates = sorted({t for _, t in per_kind})
        for template in templates:
            capped = {task: min(n, cap) for (task, t), n in per_kind.items() if t == template}
            for task, n in capped.items():
                out[(c, task, template)] = RECIPE[c].rate / len(templates) * n / sum(capped.values())
    return out


def _kind(inputs: bytes) -> tuple[str, str, str]:
    c, task, template = inputs.decode().split(" #")[0].split(" ")  # synthetic_rows' prefix.
    return c, task, template


def test_flan2022_shares_follow_the_rates_caps_and_template_types(registered):
    registered("mixed")
    assert mixing.recipes()["flan2022"].missing == ()
    assert seqio.get_mixture_or_task("flan2022").rate_per_task_name == pytest.approx(
        {f"flan2022_{c}": RECIPE[c].rate for c in COUNTS})
    # Every (task, template type) is a task of its own.
    assert "flan2021_glue_cola_2_0_0_zs_opt" in seqio.TaskRegistry.names()
    assert "niv2_task1151_swap_words_fs_opt" in seqio.TaskRegistry.names()

    num = 20_000
    ds = seqio.get_mixture_or_task("flan2022").get_dataset(
        {"inputs": 32, "targets": 8}, split="train", shuffle=True, seed=0, num_epochs=None, copy_pretokenized=True)
    drawn = collections.Counter(_kind(ex["inputs_pretokenized"]) for ex in ds.take(num).as_numpy_iterator())
    expected = expected_shares()
    assert set(drawn) == set(expected)
    for kind, share in expected.items():
        assert abs(drawn[kind] / num - share) < 0.02, (kind, drawn[kind] / num, share)
    by_template = collections.Counter()
    for (c, _, template), n in drawn.items():
        by_template[(c, template)] += n / num
    for (c, template), share in by_template.items():
        templates = {t for _, t in COUNTS[c]}
        assert abs(share - RECIPE[c].rate / len(templates)) < 0.02, (c, template, share)
    # The cap binds: glue/cola zs_opt (60 rows, cap 30) weighs as much as a 30-row task, not twice.
    assert expected[("flan", "glue/cola:2.0.0", "zs_opt")] == pytest.approx(0.4 / 3 * 30 / 45)


def test_your_own_task_mixes_in_beside_the_collection(registered, tmp_path):
    registered("jsonl")
    path = tmp_path / "riddles.jsonl"
    path.write_text("".join(json.dumps({"question": f"riddle {i}?", "answer": f"a{i}"}) + "\n" for i in range(50)))
    names = user_files.register_file_task("mt_riddles", str(path), variants=["zs_noopt"])
    mixing.add_mixture("mt_mine", {"flan2022": 0.8, names[0]: 0.2})
    ds = seqio.get_mixture_or_task("mt_mine").get_dataset(
        {"inputs": 32, "targets": 8}, split="train", shuffle=True, seed=1, num_epochs=None, copy_pretokenized=True)
    drawn = [ex["inputs_pretokenized"].decode() for ex in ds.take(3000).as_numpy_iterator()]
    mine = sum("riddle" in text for text in drawn) / len(drawn)
    assert abs(mine - 0.2) < 0.03
    assert abs(sum(text.startswith("flan ") for text in drawn) / len(drawn) - 0.8 * 0.4) < 0.03


def _read_all(source: collection.StreamSource, shard_info: seqio.ShardInfo | None) -> list[bytes]:
    return [ex["inputs"] for ex in source.get_dataset("train", shuffle=True, seed=5, shard_info=shard_info)
            .as_numpy_iterator()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_each_row_once_and_shards_split_them(exports, fmt, tmp_path, monkeypatch):
    monkeypatch.setenv("FLAN_JAX_CACHE_DIR", str(tmp_path / "cache"))
    root, rows = exports[fmt]
    indexes = collection.find_submixtures(root, progress=False)
    assert set(indexes) == set(COUNTS)
    for c, index in indexes.items():
        assert index.counts == COUNTS[c]  # The counting pass ...
        assert os.path.exists(os.path.join(index.directory, collection_index.INDEX_FILE))  # ... is cached next to the data
        assert collection_index.index_submixture(index.directory) == index  # ... and read back.
        everything = {k: 1.0 for k in index.counts}
        source = collection.StreamSource(index, everything, name=f"mt_{c}")
        all_rows = sorted(row["inputs"].encode() for row in rows[c])
        assert sorted(_read_all(source, None)) == all_rows
        # Two hosts: by unit (2 files, or more row groups); three hosts of a 2-file JSON Lines export: by row.
        for num_shards in (2, 3):
            parts = [_read_all(source, seqio.ShardInfo(i, num_shards)) for i in range(num_shards)]
            assert sorted(sum(parts, [])) == all_rows, num_shards
            assert all(parts), num_shards


def test_an_http_export_is_listed_and_mirrored_once(exports, tmp_path, monkeypatch):
    root, rows = exports["mixed"]
    handler = functools.partial(_QuietHandler, directory=root)  # Directory listings link every file.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("FLAN_JAX_CACHE_DIR", str(tmp_path / "cache"))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        indexes = collection.find_submixtures(url, progress=False)
        assert {c: index.counts for c, index in indexes.items()} == COUNTS
        assert all(index.directory.startswith(str(tmp_path / "cache")) for index in indexes.values())
        for c in ("t0", "niv2"):  # gzip and Parquet
            source = collection.StreamSource(indexes[c], {k: 1.0 for k in COUNTS[c]}, name=f"mt_url_{c}")
            assert sorted(_read_all(source, None)) == sorted(row["inputs"].encode() for row in rows[c])
        mirrored = {p: os.stat(p).st_mtime_ns for i in indexes.values() for p in (s.path for s in i.shards)}
        again = collection.find_submixtures(url, progress=False)  # Kept, not downloaded again.
        assert again == indexes
        assert {p: os.stat(p).st_mtime_ns for p in mirrored} == mirrored
        with pytest.raises(UserError, match="lists none of the submixture directories"):
            collection.find_submixtures(url + "flan2021_submix_original/", progress=False)
    finally:
        server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_iteration_is_deterministic_and_resumes_at_a_saved_position(registered, tmp_path):
    registered("mixed", shuffle_buffer_size=100)
    lengths, batch, resume_at = {"inputs": 64, "targets": 16}, 4, 6
    state_dir = str(tmp_path / "state")
    small = {"seed": 3, "pack_buffer_size": 64}  # Packing blocks of 64 examples: a fast first batch.
    it = data.TrainIterator("flan2022", lengths, batch, **small)
    first = [next(it) for _ in range(resume_at)]
    assert it.write_state(state_dir)
    rest = [next(it) for _ in range(6)]
    del it
    again = data.get_train_dataset("flan2022", lengths, batch, **small).take(resume_at + 6).as_numpy_iterator()
    for a, b in zip(first + rest, again):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    resumed = data.TrainIterator("flan2022", lengths, batch, **small)
    assert resumed.read_state(state_dir) and resumed.position == resume_at
    for a in rest:
        b = next(resumed)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    del resumed


def test_bad_rows_are_skipped_with_file_and_line_and_bad_paths_are_named(tmp_path):
    directory = tmp_path / "cot_submix_original"
    directory.mkdir()
    good = {"inputs": "q", "targets": "a", "task_source": "cot", "task_name": "t", "template_type": "zs_opt"}
    legacy = {"_" + k: v for k, v in good.items()}  # Some copies prefix the fields with "_".
    (directory / "a.jsonl").write_text("\n".join([json.dumps(good), "{not json", json.dumps(legacy),
                                                  json.dumps({**good, "targets": None})]) + "\n")
    index = collection_index.index_submixture(str(directory), progress=False)
    source = collection.StreamSource(index, {("t", "zs_opt"): 1.0}, name="mt_bad_rows")
    sources.reset_stats("mt_bad_rows")
    assert [ex["inputs"] for ex in source.get_dataset("train", shuffle=False).as_numpy_iterator()] == [b"q", b"q"]
    problems = sources.stats("mt_bad_rows").problems
    assert problems[0].endswith("a.jsonl:2: not a JSON object")
    assert problems[1].endswith("a.jsonl:4: no text field(s) targets")
    with pytest.raises(UserError, match="not a directory"):
        collection.find_submixtures(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="none of the submixture directories"):
        collection.find_submixtures(str(directory))
    (tmp_path / "niv2_submix_original").mkdir()
    (tmp_path / "niv2_submix_original" / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match=r"x\.parquet is not a readable Parquet file"):
        collection.find_submixtures(str(tmp_path))
