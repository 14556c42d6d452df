"""attnkit: the Transformer and the attention family from scratch in PyTorch."""

__version__ = "0.1.0"
