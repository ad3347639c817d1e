"""From a SeqIO task or mixture to packed, batched numpy arrays.

The path is: registered Task/Mixture -> seqio.EncDecFeatureConverter (packing
optional) -> fixed-size batches. Iteration is deterministic for a given seed,
so a run resumed at step N continues with batch N exactly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import gin
import numpy as np
import seqio
import tensorflow as tf

from flan_jax.errors import UserError


def get_mixture_or_task(name: str) -> seqio.Task | seqio.Mixture:
    """Looks a name up in SeqIO's registries; a UserError lists what exists."""
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        names = sorted(seqio.MixtureRegistry.names()) + sorted(seqio.TaskRegistry.names())
        raise UserError(
            f"unknown task or mixture {name!r}. Registered mixtures: "
            f"{', '.join(sorted(seqio.MixtureRegistry.names())) or '(none)'}; "
            f"{len(names)} names in all (list them with `flan-jax data list`)."
        ) from None


def feature_converter(pack: bool) -> seqio.EncDecFeatureConverter:
    return seqio.EncDecFeatureConverter(pack=pack)


@gin.configurable(denylist=["start_batch"])
def get_train_dataset(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    *,
    split: str = "train",
    seed: int = 0,
    pack: bool = True,
    shuffle: bool = True,
    start_batch: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
) -> tf.data.Dataset:
    """An endless, deterministic dataset of model-feature batches.

    Args:
      mixture_or_task_name: a registered SeqIO task or mixture.
      task_feature_lengths: e.g. {"inputs": 512, "targets": 128}.
      batch_size: examples per batch for this host (global / num_shards).
      split: the split to draw from.
      seed: seeds shuffling and mixture sampling; the same seed gives the same
        batches.
      pack: pack several examples per row (segment ids keep them apart).
      shuffle: shuffle the examples.
      start_batch: batches to skip, to resume at a given step.
      shard_index, num_shards: this host's share of the data.
    """
    get_mixture_or_task(mixture_or_task_name)  # Fail early with a clear message.
    ds = seqio.get_dataset(
        mixture_or_task_name,
        task_feature_lengths=dict(task_feature_lengths),
        feature_converter=feature_converter(pack),
        dataset_split=split,
        shuffle=shuffle,
        num_epochs=None,
        shard_info=seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None,
        seed=seed,
        verbose=False,
    )
    ds = ds.batch(batch_size, drop_remainder=True)
    if start_batch:
        ds = ds.skip(start_batch)
    return ds.prefetch(tf.data.AUTOTUNE)


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    return ds.as_numpy_iterator()


def fill_rates(batch: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Share of non-padding tokens in the encoder and decoder halves of a batch."""
    return {
        "fill_rate/inputs": float(np.mean(batch["encoder_input_tokens"] != 0)),
        "fill_rate/targets": float(np.mean(batch["decoder_target_tokens"] != 0)),
    }


def num_real_tokens(batch: Mapping[str, np.ndarray]) -> int:
    return int(np.sum(batch["encoder_input_tokens"] != 0) + np.sum(batch["decoder_target_tokens"] != 0))


def targets_vocabulary(task: seqio.Task | seqio.Mixture) -> seqio.Vocabulary:
    """The vocabulary of the 'targets' feature; inputs must share it (one embedding)."""
    features = task.output_features
    vocab = features["targets"].vocabulary
    if "inputs" in features and features["inputs"].vocabulary != vocab:
        raise UserError(f"{task.name!r}: inputs and targets use different vocabularies")
    return vocab


def save_vocabulary(vocab: seqio.Vocabulary, directory: str) -> dict:
    """Copies the vocabulary next to a run so checkpoints can be used alone; returns its record."""
    if isinstance(vocab, seqio.SentencePieceVocabulary):
        path = os.path.join(directory, "spiece.model")
        # The original file: `sp_model` already has the extra ids folded in.
        tf.io.gfile.copy(vocab.sentencepiece_model_file, path, overwrite=True)
        return {"type": "sentencepiece", "file": "spiece.model", "extra_ids": vocab.extra_ids}
    if isinstance(vocab, seqio.ByteVocabulary):
        return {"type": "byte", "extra_ids": vocab.extra_ids}
    if isinstance(vocab, seqio.PassThroughVocabulary):
        return {"type": "passthrough", "size": vocab.vocab_size, "eos_id": vocab.eos_id}
    raise UserError(f"cannot save a vocabulary of type {type(vocab).__name__}")


def load_vocabulary(record: Mapping, directory: str) -> seqio.Vocabulary:
    """Inverse of save_vocabulary."""
    kind = record.get("type")
    if kind == "sentencepiece":
        path = os.path.join(directory, record["file"])
        if not os.path.exists(path):
            raise UserError(f"vocabulary file {path} is missing")
        return seqio.SentencePieceVocabulary(path, extra_ids=record.get("extra_ids", 0))
    if kind == "byte":
        return seqio.ByteVocabulary(extra_ids=record.get("extra_ids", 0))
    if kind == "passthrough":
        return seqio.PassThroughVocabulary(record["size"], eos_id=record.get("eos_id", 1))
    raise UserError(f"unknown vocabulary record {dict(record)!r}")
