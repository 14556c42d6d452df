"""File names read from a checkpoint's metadata stay inside the checkpoint's folder.

A downloaded model folder is untrusted: its ``model.safetensors.index.json`` could name
``../../other-run/weights.safetensors`` or a symbolic link to a file elsewhere. Every file name
read from metadata goes through :func:`confined` before it is opened.
"""

from __future__ import annotations

from pathlib import Path

from attnkit.errors import UserError


def confined(folder: str | Path, name: object, source: str | Path) -> Path:
    """``folder / name`` for a file ``name`` that the metadata file ``source`` names.

    Refused in one line: a name that is not a non-empty string, and any name that resolves
    (after ``..``, absolute paths and symbolic links of the file or of folders on the way)
    outside ``folder``. The one exception is the Hugging Face hub cache, where
    ``snapshots/<revision>/`` holds links into the repository's ``blobs/`` folder.
    """
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\0" in name:
        raise UserError(f"{source} names a file that is not a file name: {name!r}")
    root = folder.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":  # the hub cache: models--org--name/snapshots/<rev>
        allowed.append(root.parent.parent / "blobs")
    real = (folder / name).resolve()
    if not any(real.is_relative_to(base) for base in allowed):
        raise UserError(f"{source} names {name!r}, which leads outside {folder} (to {real}); "
                        "a checkpoint may only name files in its own folder")
    return folder / name
