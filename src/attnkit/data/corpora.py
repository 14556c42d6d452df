"""Standard character-level corpora for users: enwik8 and text8, downloaded and checked.

enwik8 is the first 10^8 bytes of an English Wikipedia XML dump (Hutter Prize); text8 is Matt
Mahoney's cleaned version (lowercase letters and single spaces). Both unzip to exactly 10^8
bytes and are split 90M / 5M / 5M for train / valid / test, as Transformer-XL (Dai et al. 2019)
and adaptive span (Sukhbaatar et al. 2019) report them. enwik8 bytes become Latin-1 characters,
so one character is one byte, the unit the papers' bits per character count.

Every download is checked before it is used: the archive's size and, where a published value
exists, its SHA-256 (enwik8.zip's is the one the Hugging Face ``enwik8`` dataset records for the
same URL; no SHA-256 of text8.zip is published that we could confirm, so text8 is checked by
the archive's and the text's sizes). Files appear only complete: downloads, extractions and
splits go to temporary names, each renamed when done.
"""

from __future__ import annotations

import hashlib
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from attnkit.errors import UserError
from attnkit.rundir import atomic_path

CORPORA: dict[str, dict] = {
    "enwik8": {"url": "http://mattmahoney.net/dc/enwik8.zip", "member": "enwik8",
               "archive_bytes": 36_445_475,
               "sha256": "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
               "bytes": 100_000_000},
    "text8": {"url": "http://mattmahoney.net/dc/text8.zip", "member": "text8",
              "archive_bytes": 31_344_016, "sha256": "", "bytes": 100_000_000},
}
SPLITS = {"train": (0.0, 0.9), "valid": (0.9, 0.95), "test": (0.95, 1.0)}


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, dest: Path, progress: bool) -> None:
    """``url`` to ``dest`` (atomically), with a progress bar; a one-line error."""
    from tqdm import tqdm

    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(dest) as tmp, \
                open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                      disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as err:
        raise UserError(f"cannot download {url}: {getattr(err, 'reason', err)}") from None


def check_archive(name: str, archive: Path) -> None:
    """Size and (when published) SHA-256 of a corpus archive, or a one-line UserError."""
    spec = CORPORA[name]
    size = archive.stat().st_size
    if size != spec["archive_bytes"]:
        raise UserError(f"{archive} has {size:,} bytes, expected {spec['archive_bytes']:,}: "
                        "delete it and retry")
    if spec["sha256"] and sha256(archive) != spec["sha256"]:
        raise UserError(f"{archive} fails its SHA-256 check: delete it and retry")


def fetch_corpus(name: str, directory: str | Path = "data", progress: bool = True
                 ) -> dict[str, str]:
    """Download (once), check and split enwik8 or text8 into ``directory/name``; returns the
    paths of ``train.txt``, ``valid.txt`` and ``test.txt``. An archive or text already there is
    checked and reused; without a network the error is one line."""
    from attnkit.config import unknown

    if name not in CORPORA:
        raise unknown("corpus", name, CORPORA)
    spec, root = CORPORA[name], Path(directory) / name
    root.mkdir(parents=True, exist_ok=True)
    raw, archive = root / spec["member"], root / f"{name}.zip"
    if not raw.is_file():
        if not archive.is_file():
            _download(spec["url"], archive, progress)
        check_archive(name, archive)
        try:
            with zipfile.ZipFile(archive) as z, z.open(spec["member"]) as src, \
                    atomic_path(raw) as tmp, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as err:
            raise UserError(f"{archive} is not a valid {name} archive ({err}): delete it and "
                            "retry") from None
    size = raw.stat().st_size
    if size != spec["bytes"]:
        raise UserError(f"{raw} has {size:,} bytes, expected {spec['bytes']:,}: delete it")
    data, out = raw.read_bytes(), {}
    for split, (lo, hi) in SPLITS.items():
        path = root / f"{split}.txt"
        if not path.is_file():
            with atomic_path(path) as tmp:
                # bytes as Latin-1 characters: one token per byte, as the papers count enwik8
                part = data[round(lo * size): round(hi * size)]
                tmp.write_bytes(part.decode("latin-1").encode("utf-8"))
        out[split] = str(path)
    return out
