"""`flan-jax infer` over many prompts: batched by length, in input order, from and to files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from flan_jax import formats, inference
from flan_jax.errors import UserError
from flan_jax.model import T5Config, Transformer, scan

REPO = Path(__file__).resolve().parent.parent
CONFIG = T5Config(vocab_size=1024, emb_dim=64, num_heads=4, head_dim=16, num_encoder_layers=2, num_decoder_layers=2,
                  mlp_dim=128, mlp_activations=("gelu", "linear"), dropout_rate=0.0, logits_via_embedding=False)
PROMPTS = [
    "Q: I have two apples and three pears. How many fruits do I have?",
    "hi",
    "Sort the words: pear apple fig banana cherry date elderberry grape kiwi lemon mango melon",
    "Q: Is 7 larger than 3?",
    "What comes next: 2, 4, 6, 8?",
]


@pytest.fixture(scope="module")
def model() -> inference.LoadedModel:
    from tasks import vocab

    params = Transformer(CONFIG).init(jax.random.key(0), *[jnp.ones((1, 4), jnp.int32)] * 3)["params"]
    return inference.LoadedModel(Transformer(CONFIG), params, vocab.get_default_vocabulary(), 0, "test")


@pytest.mark.parametrize("method, options", [("greedy", {}), ("beam", {"num_beams": 3, "alpha": 0.6})])
def test_batched_answers_equal_one_at_a_time(model, method, options):
    """Batches of 2 (prompts regrouped by length, the last one padded with empty rows, lengths
    padded to buckets) give each prompt the answer it gets alone, in input order."""
    kwargs = dict(method=method, max_decode_length=12, **options)
    alone = [inference.generate(model, [p], batch_size=1, **kwargs)[0] for p in PROMPTS]
    seen = []
    batched = inference.generate(model, PROMPTS, batch_size=2, progress=seen.append, **kwargs)
    assert batched == alone
    assert seen == [2, 2, 1] and len(set(alone)) > 1  # a random model still answers prompts differently


def test_sampling_is_seeded(model):
    kwargs = dict(method="sample", max_decode_length=12, batch_size=2, top_k=20)
    first = inference.generate(model, PROMPTS, seed=3, **kwargs)
    assert first == inference.generate(model, PROMPTS, seed=3, **kwargs)
    assert first != inference.generate(model, PROMPTS, seed=4, **kwargs)


def test_prompt_files_and_their_errors(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("first prompt\n\n  second, indented\n")
    assert inference.read_prompts(str(text)) == [{"inputs": "first prompt"}, {"inputs": "  second, indented"}]
    cases = {
        '{"inputs": "a"}\n{"inputs": "b"\n': r"bad\.jsonl:2: not JSON",
        '{"inputs": "a"}\n\n["b"]\n': r'bad\.jsonl:3: expected an object with a string "inputs"',
        '{"prompt": "a"}\n': r'bad\.jsonl:1: expected an object with a string "inputs"',
        "\n\n": r"bad\.jsonl holds no prompts",
    }
    for content, message in cases.items():
        (tmp_path / "bad.jsonl").write_text(content)
        with pytest.raises(UserError, match=message):
            inference.read_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(UserError, match="cannot read prompts from .*missing.jsonl"):
        inference.read_prompts(str(tmp_path / "missing.jsonl"))


def test_infer_command_writes_predictions_in_input_order(model, tmp_path):
    from tasks import vocab

    checkpoint = formats.save_flan_jax(str(tmp_path / "run"), CONFIG, model.params, vocab.default_vocabulary_path(), 0)
    records = [{"id": i, "inputs": p} for i, p in enumerate(PROMPTS)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    output = tmp_path / "out" / "predictions.jsonl"

    def infer(*flags: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        return subprocess.run(
            [sys.executable, "-m", "flan_jax.cli", "infer", f"--checkpoint={checkpoint}", "--max_decode_length=12", *flags],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )

    result = infer(f"--input_file={tmp_path / 'prompts.jsonl'}", f"--output={output}", "--batch_size=2")
    assert result.returncode == 0, result.stderr[-3000:]
    written = [json.loads(line) for line in output.read_text().splitlines()]
    expected = inference.generate(model, PROMPTS, max_decode_length=12)
    assert written == [dict(r, prediction=p) for r, p in zip(records, expected)]
    assert f"5 predictions -> {output}" in result.stdout
    # Nothing written is replaced, and a bad flag is named before the model loads.
    again = infer(f"--input_file={tmp_path / 'prompts.jsonl'}", f"--output={output}")
    assert again.returncode != 0 and "exists; refusing to overwrite it" in again.stderr
    assert [json.loads(line) for line in output.read_text().splitlines()] == written
    bad = infer("--batch_size=0", "hello")
    assert bad.returncode != 0 and "--batch_size" in bad.stderr and "Traceback" not in bad.stderr


def test_models_too_large_for_one_device_load_sharded(model, tmp_path):
    """On 8 fake CPU devices with the FSDP preset, `load_model` reads every parameter straight
    onto its shard (an eighth of each kernel per device, layers scanned), and answers and
    scores equal those of the same model on one device."""
    import dataclasses

    from tasks import vocab

    checkpoint = formats.save_flan_jax(str(tmp_path / "run"), dataclasses.replace(CONFIG, scan_layers=True),
                                       scan.stack_layers(model.params), vocab.default_vocabulary_path(), 0)
    script = textwrap.dedent(f"""
        import jax, numpy as np
        jax.config.update("jax_num_cpu_devices", 8)
        from flan_jax import inference, partitioning
        prompts = {PROMPTS!r}
        fsdp = partitioning.Partitioner(mesh_shape=(8, 1), logical_axis_rules=partitioning.FSDP_LOGICAL_AXIS_RULES)
        sharded = inference.load_model("{checkpoint}", partitioner=fsdp)
        single = inference.load_model("{checkpoint}", partitioner=partitioning.Partitioner(devices=jax.devices()[:1]))
        wi = sharded.params["encoder"]["layers"]["mlp"]["wi_0"]["kernel"]  # [layers, embed, mlp]
        assert len(wi.sharding.device_set) == 8 and wi.addressable_shards[0].data.shape == (2, 8, 128), wi.sharding
        assert len(single.params["encoder"]["layers"]["mlp"]["wi_0"]["kernel"].sharding.device_set) == 1
        answers = inference.generate(sharded, prompts, max_decode_length=12, batch_size=8)
        assert answers == inference.generate(single, prompts, max_decode_length=12, batch_size=8), answers
        inputs = np.ones((8, 16), np.int32); targets = np.full((8, 4), 5, np.int32)
        scores = [inference.ModelRunner(m.module, m.partitioner).score(m.params, inputs, targets) for m in (sharded, single)]
        np.testing.assert_allclose(scores[0], scores[1], rtol=1e-5)
        print("OK", answers[:2])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK")
