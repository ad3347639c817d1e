"""Checkpoint conversion (the body of `flan-jax convert`): any format read by `formats.load_checkpoint`
to flan-jax's or HF's, LoRA adapters merged into the kernels; or the adapters alone as a HF PEFT directory.

Importing this module is cheap: JAX and the formats load when `convert` runs.
"""

from __future__ import annotations

import dataclasses
import os

from flan_jax.errors import UserError

TARGETS = ("flan-jax", "hf", "hf_peft")


@dataclasses.dataclass(frozen=True)
class Converted:
    """What `convert` read and wrote."""

    source_format: str
    step: int
    lora_rank: int | None  # the source's adapters: merged (flan-jax, hf) or written alone (hf_peft)
    vocab_file: str | None  # the vocabulary bundled with the result, None if none was found or given


def convert(src: str, dst: str, *, to: str = "flan-jax", base: str | None = None, step: int | None = None,
            vocab: str | None = None) -> Converted:
    """Writes the checkpoint `src` to `dst` in the format `to` (one of TARGETS).

    `base`: with a HF PEFT adapter directory as `src`, the checkpoint its adapters
    apply to; with `to="hf_peft"`, the base_model_name_or_path written. `step`: of
    a flan-jax run (default: best, else latest). `vocab`: a spiece.model to bundle
    where the source carries none.
    """
    import jax

    from flan_jax import formats, peft
    from flan_jax.formats import hf, hf_peft

    if to not in TARGETS:
        raise UserError(f"to={to!r}: expected one of {', '.join(TARGETS)}")
    adapter_src = formats.detect_format(src) == "hf_peft"
    if base and not adapter_src and to != "hf_peft":
        raise UserError(f"--base: {src} is no PEFT adapter directory and --to is not hf_peft; it has no use here")
    # float32: adapters merge into the base at full precision, whatever dtype training held it in.
    loaded = formats.load_checkpoint(src, step=step, base=base if adapter_src else None, dtype="float32")
    vocab_file = vocab or formats.vocab_file_of(loaded)
    lora_rank = loaded.config.lora.rank if loaded.config.lora else None
    if to == "hf_peft":
        hf_peft.save_hf_peft(dst, loaded.config, jax.device_get(loaded.params), base)
        return Converted(loaded.format, loaded.step, lora_rank, vocab_file)
    # The full formats hold a plain model: fold the adapters into the kernels.
    config, params = peft.merge_lora(loaded.config, loaded.params)
    if to == "hf":
        if os.path.exists(dst) and os.listdir(dst):
            raise UserError(f"{dst} exists and is not empty; refusing to overwrite it")
        if config.prompt_length:
            raise UserError(f"{src}: its {config.prompt_length} prompt vectors have no place in a HF T5 model")
        hf.save_hf_directory(dst, jax.device_get(params), config, vocab_file)
    else:
        formats.save_flan_jax(dst, config, params, vocab_file, loaded.step)
    return Converted(loaded.format, loaded.step, lora_rank, vocab_file)
