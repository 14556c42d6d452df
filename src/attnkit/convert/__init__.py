"""Checkpoint conversion between attnkit and other libraries (Hugging Face: :mod:`.hf`)."""

from attnkit.convert.hf import Pretrained, from_pretrained, save_pretrained

__all__ = ["Pretrained", "from_pretrained", "save_pretrained"]
