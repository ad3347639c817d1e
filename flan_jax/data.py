"""From a SeqIO task or mixture to packed, batched numpy arrays.

The path is: registered Task/Mixture -> seqio.EncDecFeatureConverter (packing
optional) -> fixed-size batches. Packing is best-fit by default (flan_jax/packing.py:
denser rows than seqio's sequential packer); `get_train_dataset.packer = "seqio"`
selects seqio's own. Iteration is deterministic for a given seed,
so a run resumed at step N continues with batch N exactly.

Resuming at batch N by skipping costs as long as producing N batches did:
rendering and tokenizing happen in Python, so on a long run that is hours.
`TrainIterator` saves the tf.data iterator itself (shuffle buffers, mixing
sampler, packing state) in each checkpoint step and restores it in seconds;
it falls back to skipping when no saved position matches.

Several hosts feed one global batch in one of two ways (`input_sharding`):

  "source"        each host reads its own shard of the examples (SeqIO
                  `ShardInfo`) and packs and batches them alone. Input work
                  and memory per host do not grow with the host count: the
                  default, for real runs. The batches depend on the host
                  count, though: the same seed on 1 and on 2 hosts gives
                  different (equally valid) batches.
  "global_batch"  every host builds the whole global batch from the unsharded
                  source, exactly as a single host would, and keeps its own
                  block of rows. Each host repeats all the input work, but the
                  global batches are identical for any host count and mesh, so
                  a run can move between topologies and be compared exactly
                  (tests/test_multiprocess.py). For small runs and debugging.

With one host (num_shards == 1) both build the same pipeline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any, Protocol

import gin
import numpy as np
import seqio
import tensorflow as tf

from flan_jax import errors, packing
from flan_jax.train_config import INPUT_SHARDINGS
from flan_jax.errors import UserError

logger = logging.getLogger(__name__)
STATE_SPEC = "spec.json"  # Beside a saved input position: its data settings (and the position).


class ExampleFilter(Protocol):
    """Drops training examples as the pipeline reads them (tasks/overlap.py's `OverlapExclusion`)."""

    def installed(self) -> contextlib.AbstractContextManager[None]:
        """Active while a training pipeline is built: the task datasets take the filter then."""

    def metrics(self) -> dict[str, float]:
        """The running counts, logged with each training log step."""

    def report(self) -> dict[str, Any]:
        """What it dropped, written into the run directory at the end of the run (`RunDir`)."""


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




PACKERS = ("best_fit", "seqio")
DEFAULT_PACKER = "best_fit"


def check_packer(packer: str, key: str = "get_train_dataset.packer") -> str:
    """`packer` if it is one of PACKERS, else a UserError naming `key` and the accepted values."""
    errors.require(key, packer, errors.one_of(*PACKERS))
    return packer


def configured_packing() -> tuple[str, int]:
    """(packer, buffer size) as `get_train_dataset` is configured in gin, for code that packs outside training."""
    bindings = gin.get_bindings(get_train_dataset)
    return (check_packer(bindings.get("packer", DEFAULT_PACKER)),
            bindings.get("pack_buffer_size", packing.DEFAULT_BUFFER_SIZE))


def feature_converter(
    pack: bool, packer: str | None = None, buffer_size: int | None = None
) -> seqio.EncDecFeatureConverter:
    """seqio's encoder-decoder converter; with `pack`, packing by `packer` ("best_fit": packing.py, over
    blocks of `buffer_size` examples; "seqio": seqio's sequential packer). None: as get_train_dataset is
    configured."""
    configured, configured_size = configured_packing()
    packer = configured if packer is None else check_packer(packer, "packer")
    if pack and packer == "best_fit":
        return packing.BestFitEncDecFeatureConverter(pack=True, buffer_size=buffer_size or configured_size)
    return seqio.EncDecFeatureConverter(pack=pack)


# ------------------------------------------------------------ prompt slots

# Prompt tuning (T5Config.prompt_length = P) puts P slot tokens in front of
# every encoder input, and the model writes the learned prompt over their
# embeddings (flan_jax/model/prompt.py). So their id only has to be a real
# token (nonzero: 0 is padding, which masks attention) that every vocabulary
# has: EOS, 1 in SentencePiece, byte and pass-through vocabularies alike.
PROMPT_SLOT_ID = 1


def check_prompt_room(prompt_length: int, input_length: int, key: str) -> None:
    """A UserError unless inputs of `input_length` tokens (the setting `key`) hold the prompt slots and some text."""
    if prompt_length >= input_length:
        raise UserError(
            f"{key}={input_length} leaves no room for text after the {prompt_length} prompt slots "
            "(T5Config.prompt_length): the input length includes them"
        )


def text_lengths(task_feature_lengths: Mapping[str, int], prompt_length: int) -> dict[str, int]:
    """The lengths a task renders and trims its examples to, so that with the
    prompt slots in front they fit `task_feature_lengths`: the inputs' less
    `prompt_length` (few-shot tasks drop exemplars to fit it, as they would
    without slots)."""
    check_prompt_room(prompt_length, task_feature_lengths["inputs"], "task_feature_lengths['inputs']")
    return {**task_feature_lengths, "inputs": task_feature_lengths["inputs"] - prompt_length}


def prepend_prompt_slots(tokens: Any, prompt_length: int) -> Any:
    """Token ids (1-D: a tf.Tensor inside tf.data, else numpy) after `prompt_length` slots."""
    if isinstance(tokens, tf.Tensor):
        return tf.concat([tf.fill([prompt_length], tf.constant(PROMPT_SLOT_ID, tokens.dtype)), tokens], 0)
    tokens = np.asarray(tokens)
    return np.concatenate([np.full(prompt_length, PROMPT_SLOT_ID, tokens.dtype), tokens])


def add_prompt_slots(ds: tf.data.Dataset, prompt_length: int) -> tf.data.Dataset:
    """A SeqIO task's dataset (made at `text_lengths`) with `prompt_length`
    slots in front of every example's "inputs"; unchanged without prompt
    tuning (prompt_length 0)."""
    if not prompt_length:
        return ds
    return ds.map(lambda ex: {**ex, "inputs": prepend_prompt_slots(ex["inputs"], prompt_length)})


@gin.configurable(denylist=["start_batch", "prompt_length", "example_filter"])
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
    input_sharding: str = "source",
    packer: str = DEFAULT_PACKER,
    pack_buffer_size: int = packing.DEFAULT_BUFFER_SIZE,
    prompt_length: int = 0,
    example_filter: ExampleFilter | None = None,
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
      input_sharding: how that share is made (see the module doc): "source"
        reads shard `shard_index` of `num_shards` of the examples;
        "global_batch" builds global batches of `batch_size * num_shards`
        rows from all examples and keeps the `shard_index`-th block of
        `batch_size` consecutive rows of each.
      packer: with `pack`, "best_fit" (flan_jax/packing.py: best-fit-decreasing
        over blocks of `pack_buffer_size` examples; denser) or "seqio" (seqio's
        sequential packer).
      pack_buffer_size: examples packed together by "best_fit": more pack
        denser, but take more memory and make saved input states larger.
      prompt_length: the model's T5Config.prompt_length: that many prompt
        slots start every example's inputs, before packing, within the
        inputs length (`text_lengths`, `add_prompt_slots`).
      example_filter: drops training examples before they are rendered
        (say, those overlapping evaluation: `TrainConfig.exclude_overlap_with`).
    """
    check_packer(packer)
    errors.require("get_train_dataset.pack_buffer_size", pack_buffer_size, errors.POSITIVE_INT)
    if input_sharding not in INPUT_SHARDINGS:
        raise UserError(f"input_sharding={input_sharding!r}: expected one of {', '.join(map(repr, INPUT_SHARDINGS))}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index={shard_index} is not in [0, num_shards={num_shards})")
    task = get_mixture_or_task(mixture_or_task_name)  # Fail early with a clear message.
    shard_source = num_shards > 1 and input_sharding == "source"
    # seqio.get_dataset's two stages, with the prompt slots added between the
    # task's (tokenized, trimmed) examples and the packing feature converter.
    with example_filter.installed() if example_filter else contextlib.nullcontext():
        ds = task.get_dataset(
            text_lengths(task_feature_lengths, prompt_length),
            split=split,
            use_cached=False,
            shuffle=shuffle,
            seed=seed,
            shard_info=seqio.ShardInfo(shard_index, num_shards) if shard_source else None,
            num_epochs=None,
            trim_output_features=True,
        )
    ds = add_prompt_slots(ds, prompt_length)
    ds = feature_converter(pack, packer, pack_buffer_size)(ds, task_feature_lengths=dict(task_feature_lengths))
    if num_shards > 1 and input_sharding == "global_batch":
        ds = ds.batch(batch_size * num_shards, drop_remainder=True)
        begin, end = shard_index * batch_size, (shard_index + 1) * batch_size
        ds = ds.map(lambda batch: {k: v[begin:end] for k, v in batch.items()})
    else:
        ds = ds.batch(batch_size, drop_remainder=True)
    if start_batch:
        ds = ds.skip(start_batch)
    return ds.prefetch(tf.data.AUTOTUNE)


class TrainIterator:
    """Numpy batches of `get_train_dataset`, whose exact position can be saved and restored.

    `position` counts the batches returned. `write_state(directory)` saves
    the tf.data iterator there (the trainer puts it in the checkpoint step,
    flan_jax/input_checkpoint.py); `read_state(directory)` restores a state
    written with the same arguments, and `skip_to(n)` reads and drops
    batches up to `n` when nothing was restored (exact too, only slow).
    Either way the next batch is batch n of an uninterrupted run. The
    pipeline is built at first use, so making one costs nothing.

    A saved state holds every buffer of the pipeline (shuffle buffers, the
    packer's pending examples, prefetched batches): tens of MB at long
    sequence lengths, a few seconds to write, during which training waits.
    """

    def __init__(self, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], batch_size: int,
                 *, example_filter: ExampleFilter | None = None, **dataset_kwargs: Any) -> None:
        """`dataset_kwargs` go to `get_train_dataset` (split, seed, pack, shuffle, shard_index, num_shards,
        input_sharding, packer, pack_buffer_size, prompt_length)."""
        # What must match for a saved state to be restored into this pipeline.
        packer, pack_buffer_size = configured_packing()  # Also when set in gin, not here.
        self._spec = json.loads(json.dumps({
            "mixture_or_task_name": mixture_or_task_name, "task_feature_lengths": dict(task_feature_lengths),
            "batch_size": batch_size, "packer": packer, "pack_buffer_size": pack_buffer_size, **dataset_kwargs,
        }))
        self._build = lambda: get_train_dataset(mixture_or_task_name, task_feature_lengths, batch_size,
                                                example_filter=example_filter, **dataset_kwargs)
        self._iterator: Any = None
        self._saveable = True
        self.position = 0

    def _started(self) -> Any:
        # Never skip inside the dataset: the graph must be the same whether
        # the state was restored or not, or a later save could not be restored.
        if self._iterator is None:
            self._iterator = iter(self._build())
            self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
        return self._iterator

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._started())
        self.position += 1
        return {k: v.numpy() for k, v in batch.items()}

    def write_state(self, directory: str) -> bool:
        """Saves the position into `directory` (created); False when this pipeline cannot be saved."""
        if not self._saveable:
            return False
        self._started()
        tf.io.gfile.makedirs(directory)
        try:
            self._checkpoint.write(os.path.join(directory, "iterator"))
        except (tf.errors.OpError, ValueError) as e:
            # A pipeline with an op tf.data cannot save (e.g. from_generator): resuming will skip instead.
            logger.warning("cannot save the input position (%s); a resume will skip batches instead", e)
            self._saveable = False
            return False
        with tf.io.gfile.GFile(os.path.join(directory, STATE_SPEC), "w") as f:  # Written last: marks it complete.
            json.dump({"position": self.position, "spec": self._spec}, f)
        return True

    def read_state(self, directory: str, position: int | None = None) -> bool:
        """Restores the state `write_state` saved in `directory`; False (and the position
        unchanged) when there is none or it is for other data settings.

        `position`: that of a state saved by flan-jax before 0.2 in MODEL_DIR/input_state/
        (process_<i>/<step>/), whose spec.json holds the settings alone.
        """
        spec_file = os.path.join(directory, STATE_SPEC)
        if not tf.io.gfile.exists(spec_file):
            return False
        with tf.io.gfile.GFile(spec_file) as f:
            saved = json.load(f)
        if position is not None:
            saved = {"position": position, "spec": saved}
        if saved["spec"] != self._spec:
            logger.warning("the input position saved in %s is for other data settings; skipping instead", directory)
            return False
        self._started()
        self._checkpoint.read(os.path.join(directory, "iterator")).assert_consumed()
        self.position = saved["position"]
        return True

    def skip_to(self, batch: int) -> None:
        """Reads and drops batches until `batch` is next (nothing to do after a matching `read_state`)."""
        if self.position > batch:
            raise ValueError(f"the input pipeline is at batch {self.position}, past batch {batch}")
        if self.position < batch:
            logger.warning("no saved input position for batch %d: reading and dropping %d batches",
                           batch, batch - self.position)
        while self.position < batch:
            next(self._started())
            self.position += 1


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


def save_vocabulary(vocab: seqio.Vocabulary, directory: str, *, write: bool = True) -> dict:
    """Copies the vocabulary next to a run so checkpoints can be used alone; returns its record.

    `write=False` only returns the record (the other hosts of a multi-host run).
    """
    if isinstance(vocab, seqio.SentencePieceVocabulary):
        path = os.path.join(directory, "spiece.model")
        # The original file: `sp_model` already has the extra ids folded in.
        if write:
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
