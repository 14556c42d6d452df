"""Reading users' text files robustly: UTF-8 (optionally gzipped), one-line errors.

A missing file, a directory, an empty file, a binary file (NUL bytes near the start), a
corrupt gzip stream or bytes that are not UTF-8 raise :class:`attnkit.errors.UserError`
naming the file (and the line, for bad UTF-8).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

from attnkit.errors import UserError

BINARY_PROBE = 8192  # bytes looked at for a NUL


def _read_bytes(path: Path) -> bytes:
    """The raw (decompressed for ``.gz``) bytes of ``path``, with one-line errors."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"expected a file, got a directory: {path}") from None
    except PermissionError:
        raise UserError(f"permission denied reading {path}") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise UserError(f"{path} is not a valid gzip file: {err}") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err}") from None


def read_text(path: str | Path) -> str:
    """The whole file as a string (UTF-8, a leading BOM dropped; ``.gz`` accepted)."""
    path = Path(path)
    data = _read_bytes(path)
    if not data:
        raise UserError(f"file is empty: {path}")
    if b"\0" in data[:BINARY_PROBE]:  # text never holds NUL bytes; binary formats do
        raise UserError(f"{path} looks binary, not UTF-8 text (NUL bytes in its first "
                        f"{min(len(data), BINARY_PROBE)} bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path} is not valid UTF-8 (line {line}, byte "
                        f"0x{data[err.start]:02x})") from None
    if not text.strip():
        raise UserError(f"file is empty (only whitespace): {path}")
    return text


def read_lines(path: str | Path) -> list[str]:
    """The lines of a file without their line ending (``\\n`` or ``\\r\\n``).

    Empty lines inside the file are kept (parallel files stay aligned); a final newline does
    not make an extra empty line.
    """
    text = read_text(path)
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_parallel(src: str | Path, tgt: str | Path) -> list[tuple[str, str]]:
    """Aligned (source, target) line pairs from two files with the same number of lines."""
    src_lines, tgt_lines = read_lines(src), read_lines(tgt)
    if len(src_lines) != len(tgt_lines):
        raise UserError(f"parallel files differ in length: {src} has {len(src_lines)} lines, "
                        f"{tgt} has {len(tgt_lines)}")
    return list(zip(src_lines, tgt_lines, strict=True))
