"""Where the SQuAD dev set comes from: a source whose file is not the official one is refused,
and the next source is tried (the index dropped bigbench 1.0.0's files on 2026-12-07)."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

from bench import squad
from blend.assets import AssetError

DEV = {"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [
    {"id": "q1", "question": "?", "answers": [{"text": "c", "answer_start": 0}]}]}]}]}


def _wheel(path, member: str, data: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)


def _sources(tmp_path, good: bytes):
    """Two wheel sources already in the download folder: one tampered, one right."""
    dl = tmp_path / "downloads"
    dl.mkdir()
    _wheel(dl / "a.whl", "a/dev.json", b'{"tampered": true}')
    _wheel(dl / "b.whl", "b/support/dev-v1.1.json", good)
    sha = hashlib.sha256(good).hexdigest()
    return [("a==1", [], "a.whl", "a/dev.json", sha),
            ("b==1", [], "b.whl", "support/dev-v1.1.json", sha)]


def test_a_tampered_source_is_refused_and_the_next_is_used(tmp_path, monkeypatch):
    good = json.dumps(DEV).encode()
    monkeypatch.setenv("CACHEBLEND_HOME", str(tmp_path))
    monkeypatch.setattr(squad, "SOURCES", _sources(tmp_path, good))
    assert squad.load_squad_dev() == DEV
    assert (tmp_path / "data" / "squaddev_v1.1.json").read_bytes() == good


def test_no_usable_source_says_where_a_copy_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEBLEND_HOME", str(tmp_path))
    monkeypatch.setattr(squad, "SOURCES", _sources(tmp_path, b"x")[:1])
    with pytest.raises(AssetError, match=r"a==1: a/dev.json has sha256 .*squaddev_v1.1.json"):
        squad.load_squad_dev()
    assert not (tmp_path / "data" / "squaddev_v1.1.json").exists()

