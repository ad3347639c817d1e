"""Gin bindings a finetune takes from its pretrained checkpoint: the architecture and the vocabulary.

`take_from_checkpoint` binds what gin leaves unbound (T5Config's
architecture fields, the SentencePiece model) from the checkpoint
(`formats.read_architecture`), so a HF or T5X checkpoint finetunes without a
matching model gin file; a binding that disagrees with the checkpoint is a
UserError naming both values and the flag that fixes it.
"""

from __future__ import annotations

import os

import gin

from flan_jax import formats
from flan_jax.errors import UserError

VOCAB_BINDING = "get_default_vocabulary.sentencepiece_model"


def take_from_checkpoint(path: str | None, vocab: str | None = None) -> None:
    """Binds in gin what it leaves unbound from the pretrained checkpoint at `path`: the
    architecture (T5Config) and the vocabulary (the checkpoint's spiece.model, else
    `vocab`, the --vocab flag). A binding or --vocab that disagrees with the
    checkpoint is a UserError naming both and the flag that fixes it."""
    ckpt_vocab = None
    if path:
        architecture = formats.read_architecture(path)
        for field, value in formats.unbound_architecture(architecture, gin.get_bindings("T5Config"), path).items():
            gin.bind_parameter(f"T5Config.{field}", value)
        ckpt_vocab = architecture.vocab_file
    bound = gin.get_bindings("get_default_vocabulary").get("sentencepiece_model")
    if ckpt_vocab and vocab and not _same_file(ckpt_vocab, vocab):
        raise UserError(f"--vocab={vocab} is not the vocabulary of {path} ({ckpt_vocab}): drop --vocab")
    if ckpt_vocab and bound and not _same_file(ckpt_vocab, bound):
        raise UserError(f"{VOCAB_BINDING}={bound!r} is bound in gin but {path} has its own vocabulary: pass "
                        f"--gin.{VOCAB_BINDING}={ckpt_vocab!r} (or bind none, to take the checkpoint's)")
    if vocab and bound and not _same_file(vocab, bound):
        raise UserError(f"--vocab={vocab} and {VOCAB_BINDING}={bound!r} (gin) differ: give one of them")
    wanted = ckpt_vocab or vocab
    if wanted and not bound:
        gin.bind_parameter(VOCAB_BINDING, wanted)


def _same_file(a: str, b: str) -> bool:
    """The same path or, for local files, the same bytes (a copy of a checkpoint's spiece.model agrees with it)."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read() == fb.read()
    except OSError:
        return False
