"""The default vocabulary: a small SentencePiece model trained on the built-in tasks.

Why SentencePiece rather than bytes: pieces are several characters long, so
sequences are shorter and a tiny model trains faster on a CPU; and a
SentencePiece model goes through the same code path (seqio's
SentencePieceVocabulary, pad=0, eos=1, unk=2) as real T5 vocabularies, so
swapping in a released T5 spiece model changes nothing else.

The model is trained once, on every variant of every built-in family
(tasks/builtin.py; tasks added in other files do not change it, and
`byte_fallback` encodes any text), and cached as
`$FLAN_JAX_CACHE_DIR/spm_<hash>.model` (default `~/.cache/flan_jax/`). The
hash covers the corpus and the trainer options, so changing either trains a
new model instead of reusing a stale one. Nothing is trained on import:
only `get_default_vocabulary()` (called by `tasks.register()` when no
vocabulary is given) trains or loads it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tempfile

import gin
import seqio
import sentencepiece as spm

from tasks import builtin, files
from tasks.family import render_example

EXAMPLES_PER_VARIANT = 40
SPM_SEED = 0
# T5's id layout (pad 0, eos 1, unk 2, no bos), which seqio expects.
TRAINER_OPTIONS = {
    "model_type": "unigram",
    # An upper bound (hard_vocab_limit=False): split at whitespace like T5,
    # the small lexicon of the built-in tasks supports only ~650 pieces.
    # `get_default_vocabulary().vocab_size` is the real size.
    "vocab_size": 1024,
    "hard_vocab_limit": False,
    "pad_id": 0,
    "eos_id": 1,
    "unk_id": 2,
    "bos_id": -1,
    "byte_fallback": True,  # Any text encodes, even characters never seen here.
    "split_digits": True,  # One token per digit, so arithmetic is learnable.
    "character_coverage": 1.0,
    # Plain NFKC, not T5's nmt_nfkc: keep newlines and spacing, which the
    # prompts use to separate their parts.
    "normalization_rule_name": "nfkc",
    "remove_extra_whitespaces": False,
    "num_threads": 1,  # With a fixed seed, one thread gives the same model every time.
    "minloglevel": 2,
}


def corpus() -> list[str]:
    """The training sentences: inputs and targets of the first examples of every built-in variant."""
    sentences = []
    for family in builtin.BUILTIN_FAMILIES:
        for variant in family.spec.variants:
            for index in range(EXAMPLES_PER_VARIANT):
                example = family.example("train", index)
                rendered = render_example(family, "train", index, example, variant)
                sentences += [rendered["inputs"], rendered["targets"]]
    return sentences


def model_name(sentences: list[str], options: dict = TRAINER_OPTIONS) -> str:
    """The cache file name: changes whenever the corpus or the options change."""
    digest = hashlib.sha256(json.dumps([sentences, options, SPM_SEED], sort_keys=True).encode()).hexdigest()
    return f"spm_{options['model_type']}{options['vocab_size']}_{digest[:16]}.model"


def train(sentences: list[str], path: str, options: dict = TRAINER_OPTIONS) -> None:
    """Trains a SentencePiece model in memory and writes it to `path` atomically."""
    spm.set_random_generator_seed(SPM_SEED)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **options)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    # Write then rename: a concurrent reader sees no file or a whole one, and
    # two processes racing write identical bytes.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-spm-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.getvalue())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared.
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@functools.lru_cache(maxsize=None)
def default_vocabulary_path() -> str:
    """The cached model's path, training it first if it is not there yet."""
    sentences = corpus()
    path = os.path.join(files.cache_dir(), model_name(sentences))
    if not os.path.exists(path):
        train(sentences, path)
    return path


@gin.configurable
def get_default_vocabulary(sentencepiece_model: str | None = None, extra_ids: int = 0) -> seqio.SentencePieceVocabulary:
    """The vocabulary every task is registered with.

    By default the built-in SentencePiece model. To finetune a pretrained T5,
    bind the checkpoint's own model, e.g.
    `get_default_vocabulary.sentencepiece_model = '/ckpt/spiece.model'`; the
    CLI registers the tasks after parsing gin, so the binding takes effect.
    """
    return seqio.SentencePieceVocabulary(sentencepiece_model or default_vocabulary_path(), extra_ids=extra_ids)
