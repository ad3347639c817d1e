"""The T5 encoder-decoder: config, Flax modules and HF weight mapping."""

from flan_jax.model.config import T5Config
from flan_jax.model.hf_mapping import params_from_hf_state_dict
from flan_jax.model.network import Decoder, Encoder, Transformer

__all__ = ["T5Config", "Transformer", "Encoder", "Decoder", "params_from_hf_state_dict"]
