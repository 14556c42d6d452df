"""enwik8 / text8 download: checked archives, exact splits, one-line errors (offline: file://)."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from attnkit.cli import main
from attnkit.data import corpora
from attnkit.data.text import read_text
from attnkit.errors import UserError

# every byte value but NUL (text never holds one: read_text refuses it as binary, and enwik8,
# being XML, has none); 1,200 bytes, not all ASCII
TEXT = bytes(range(1, 256)) * 4 + b"<page>caf\xe9</page>" * 10


@pytest.fixture
def fake_corpus(tmp_path, monkeypatch):
    """A 'tiny8' corpus served from a local zip through the same download path."""
    archive = tmp_path / "served" / "tiny8.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("tiny8", TEXT)
    spec = {"url": archive.as_uri(), "member": "tiny8", "bytes": len(TEXT),
            "archive_bytes": archive.stat().st_size,
            "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()}
    monkeypatch.setitem(corpora.CORPORA, "tiny8", spec)
    return spec


def test_download_checks_and_splits_90_5_5(tmp_path, fake_corpus):
    paths = corpora.fetch_corpus("tiny8", tmp_path / "data", progress=False)
    n = len(TEXT)
    cuts = [0, round(0.9 * n), round(0.95 * n), n]
    assert list(paths) == ["train", "valid", "test"]
    for path, lo, hi in zip(paths.values(), cuts[:-1], cuts[1:], strict=True):
        text = read_text(path)  # how the recipes read it
        assert text == TEXT[lo:hi].decode("latin-1") and len(text) == hi - lo  # a byte a char
    files = sorted(p.name for p in (tmp_path / "data" / "tiny8").iterdir())
    assert files == ["test.txt", "tiny8", "tiny8.zip", "train.txt", "valid.txt"]  # no temp file
    # a second call reuses the files (no network needed)
    fake_corpus["url"] = "file:///nonexistent/tiny8.zip"
    assert corpora.fetch_corpus("tiny8", tmp_path / "data", progress=False) == paths


def test_a_corrupt_archive_is_refused_before_extraction(tmp_path, fake_corpus):
    fake_corpus["sha256"] = "0" * 64
    with pytest.raises(UserError, match="fails its SHA-256 check") as err:
        corpora.fetch_corpus("tiny8", tmp_path / "data", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "data" / "tiny8" / "tiny8").exists()
    fake_corpus["archive_bytes"] += 1
    with pytest.raises(UserError, match="expected"):
        corpora.fetch_corpus("tiny8", tmp_path / "data", progress=False)


def test_offline_and_unknown_corpus_are_one_line_cli_errors(tmp_path, fake_corpus, capsys):
    fake_corpus["url"] = (tmp_path / "missing.zip").as_uri()
    assert main(["download", "tiny8", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnkit: error: cannot download") and err.count("\n") == 1
    assert not list((tmp_path / "tiny8").iterdir())  # no partial file left behind
    assert main(["download", "enwik9", "--dir", str(tmp_path)]) == 2
    assert "enwik8" in capsys.readouterr().err  # the suggestion

