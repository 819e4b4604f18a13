"""The Llama network, checkpoint import/export (HF and Meta layouts), decoding, and FLOP counts."""

from c2a.config import LlamaConfig
from c2a.model.llama import Llama
from c2a.model.weights import CheckpointError, CheckpointReader, load_pretrained, save_pretrained

__all__ = ["CheckpointError", "CheckpointReader", "Llama", "LlamaConfig", "load_pretrained", "save_pretrained"]
