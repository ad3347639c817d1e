"""The T5 encoder-decoder: config and Flax modules."""

from flan_jax.model.config import T5Config
from flan_jax.model.lora import LoraConfig
from flan_jax.model.network import Decoder, Encoder, Transformer

__all__ = ["T5Config", "LoraConfig", "Transformer", "Encoder", "Decoder"]
