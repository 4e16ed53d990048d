"""Flax decoders (GPT-2, Llama family) that read and write Hugging Face checkpoints."""

from jaxlora.models.config import ModelConfig
from jaxlora.models.decoder import Decoder, init_cache
from jaxlora.models.hub import from_pretrained, init, is_repo_id, resolve, save_pretrained
from jaxlora.models.loss import chunked_cross_entropy

__all__ = ["Decoder", "ModelConfig", "chunked_cross_entropy", "from_pretrained", "init",
           "init_cache", "is_repo_id", "resolve", "save_pretrained"]
