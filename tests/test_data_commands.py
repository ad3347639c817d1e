"""`flan-jax data list|show|stats` (tasks/data_report.py) and `bench data`, on real registered tasks."""

from __future__ import annotations

import pytest
from conftest import SMALL_MIXTURE

from flan_jax.bench import data as bench_data
from flan_jax.commands import catalog
from flan_jax.errors import UserError
from tasks import data_report, mixing

SMALL = {"inputs": 256, "targets": 64}


@pytest.fixture(scope="module", autouse=True)
def registered_tasks():
    catalog.load_tasks()

def test_list_groups_tasks_by_family(capsys):
    listed = data_report.list_registered()
    out = capsys.readouterr().out
    train = listed["mixtures"]["builtin_train"]
    assert "builtin_dates" in train["families"]
    assert set(train["variants"]) == {"zs_noopt", "zs_opt", "zs_cot", "fs_noopt", "fs_opt", "fs_cot"}
    assert listed["families"]["builtin_dates"] == ["fs_cot", "fs_noopt", "zs_cot", "zs_noopt"]
    assert listed["mixtures"]["flan2022"]["entries"] == ["flan2022_cot"]
    assert listed["mixtures"]["flan2022"]["missing_collections"] == ["flan", "t0", "niv2", "dialog"]
    assert "builtin_train" in out and "builtin_dates" in out and "fs_cot" in out
    assert "recipe collections not here: flan, t0, niv2, dialog" in out

def test_show_a_task(capsys):
    shown = data_report.show("builtin_dates_zs_cot", n=2)
    out = capsys.readouterr().out
    assert [ex["task"] for ex in shown] == ["builtin_dates_zs_cot"] * 2
    assert shown[0]["inputs"] != shown[1]["inputs"]
    for ex in shown:
        assert ex["inputs"].endswith("Let's think step by step.")
        assert "So the answer is" in ex["targets"]
        assert ex["input_tokens"] > 1 and ex["target_tokens"] > 1
        assert ex["inputs"] in out and ex["targets"] in out

def test_show_a_mixture_by_variant(capsys):
    shown = data_report.show("builtin_train", variant="fs_noopt", n=4, task_feature_lengths=SMALL)
    assert len(shown) == 4
    assert all(mixing.split_variant(ex["task"])[1] == "fs_noopt" for ex in shown)
    assert all(ex["input_tokens"] <= SMALL["inputs"] for ex in shown)  # Few-shot prompts fitted to the length.
    with pytest.raises(UserError, match="no task of variant 'zs_opt'.*fs_cot"):
        data_report.show("builtin_dates_fs_cot", variant="zs_opt")

def test_show_a_family_one_example_per_variant(capsys):
    shown = data_report.show("builtin_dates")
    assert [ex["task"] for ex in shown] == [f"builtin_dates_{v}" for v in ("zs_noopt", "fs_noopt", "zs_cot", "fs_cot")]
    assert shown[2]["inputs"].endswith("Let's think step by step.")
    assert "=== 4/4  builtin_dates_fs_cot" in capsys.readouterr().out
    assert [ex["task"] for ex in data_report.show("builtin_dates", variant="zs_cot", n=2)] == ["builtin_dates_zs_cot"] * 2

def test_unknown_name_is_a_user_error():
    for command in (data_report.show, data_report.stats):
        with pytest.raises(UserError, match="unknown task or mixture 'nope'.*builtin_train"):
            command("nope")
    with pytest.raises(UserError, match="Close to it: builtin_dates"):
        data_report.show("builtin_date")

def _check_stats(result: dict, num_examples: int) -> None:
    assert result["num_examples"] == num_examples
    assert sum(s["sampled"] for s in result["shares"].values()) == pytest.approx(1.0)
    assert sum(s["configured"] for s in result["shares"].values()) == pytest.approx(1.0)
    assert sum(s["configured"] for s in result["variant_shares"].values()) == pytest.approx(1.0)
    for feature, lengths in result["lengths"].items():
        assert 1 <= lengths["p50"] <= lengths["p90"] <= lengths["p99"] <= lengths["max"], feature
        assert 0 <= result["truncated"][feature] <= num_examples
        limit = result["task_feature_lengths"][feature]
        assert (result["truncated"][feature] > 0) == (lengths["max"] > limit)
    packing = result["packing"]
    assert packing["examples_per_row"] >= 1
    for feature, fill in packing["fill_rate"].items():
        assert 0 < fill <= 1, feature

def test_stats_of_builtin_train(capsys):
    result = data_report.stats("builtin_train", num_examples=400, task_feature_lengths={"inputs": 256, "targets": 32},
                                fill=0.8)
    out = capsys.readouterr().out
    _check_stats(result, 400)
    assert result["packing"]["packer"] == "best_fit"
    suggestion = result["fill_suggestion"]["suggestion"]
    assert suggestion["fill"]["total"] >= 0.8 and max(suggestion["truncated"].values()) <= 0.01
    assert f"suggested: --inputs_length={suggestion['inputs']} --targets_length={suggestion['targets']}" in out
    shares = result["shares"]
    assert shares["builtin_dates_zs_cot"]["configured"] == pytest.approx(1 / 6 / 4)  # 6 families, 4 variants.
    assert result["truncated"]["targets"] > 0  # Many chains of thought are longer than 32 tokens.
    assert "fill rate" in out and "builtin_dates_zs_cot" in out and "p99" in out

def test_stats_of_a_task_at_generous_lengths():
    result = data_report.stats("builtin_arithmetic_zs_noopt", num_examples=100,
                                task_feature_lengths={"inputs": 512, "targets": 128})
    _check_stats(result, 100)
    assert result["shares"] == {"builtin_arithmetic_zs_noopt": {"configured": 1.0, "sampled": 1.0}}
    assert result["truncated"] == {"inputs": 0, "targets": 0}
    assert result["packing"]["examples_per_row"] > 5  # Short arithmetic questions pack densely.

def test_bench_data_runs(capsys):
    figures = bench_data.bench_data(SMALL_MIXTURE, {"inputs": 64, "targets": 32}, batch_size=4,
                                     repeats=1, batches_per_repeat=2)
    assert figures["examples_per_sec"] > 0 and figures["tokens_per_sec"] > figures["examples_per_sec"]
    assert 0 < figures["fill_rate/inputs"] <= 1 and 0 < figures["fill_rate/targets"] <= 1
    assert "examples/s" in capsys.readouterr().out

def test_stats_of_flan_cot(flan_cot_data):
    result = data_report.stats("flan_cot", num_examples=300, task_feature_lengths={"inputs": 1024, "targets": 256})
    _check_stats(result, 300)
    assert len(result["shares"]) == 36
    variants = result["variant_shares"]
    assert variants["zs_cot"]["configured"] == pytest.approx(variants["fs_cot"]["configured"])
    for share in variants.values():
        assert abs(share["sampled"] - share["configured"]) < 0.1

def test_show_flan_cot_by_variant(flan_cot_data):
    shown = data_report.show("flan2022", variant="zs_opt", n=2)
    assert all(ex["task"].endswith("_zs_opt") and "OPTIONS:" in ex["inputs"] for ex in shown)
