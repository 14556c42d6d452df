"""attnkit: the Transformer and the attention family from scratch in PyTorch."""

__version__ = "0.1.0"

__all__ = ["from_pretrained", "load", "save_pretrained"]


def __getattr__(name: str):
    """``attnkit.load`` (a run or a Hugging Face directory), ``attnkit.from_pretrained`` /
    ``attnkit.save_pretrained`` (Hugging Face directories), imported on first use so that
    ``import attnkit`` stays light."""
    if name == "load":
        from attnkit.loading import load
        return load
    if name in __all__:
        from attnkit.convert import hf
        return getattr(hf, name)
    raise AttributeError(f"module 'attnkit' has no attribute {name!r}")
