"""The declared vLLM range: how each kind of version starts, and the wheel checker.

Start-up is tested by faking the installed version string (no engine); the checker by
zipping the installed vLLM's own source into a wheel-shaped file, once as is and once with
an injected fault.
"""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path

import pytest

import blend.patches as p
from blend.patches import check_wheel, table

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def start(monkeypatch, caplog):
    """`install_import_hook()` under a faked vLLM version, arming nothing; returns (ok, logs)."""
    logger = logging.getLogger("blend")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG, logger="blend")
    monkeypatch.setattr(p, "_arm", lambda points: None)
    monkeypatch.setattr(p, "patches_disabled", lambda: False)

    def run(version: str) -> tuple[bool, list[logging.LogRecord]]:
        monkeypatch.setattr(p, "_armed", False)
        monkeypatch.setattr(p, "_refusal", None)
        monkeypatch.setattr(p, "vllm_version", lambda: version)
        caplog.clear()
        return p.install_import_hook(), [r for r in caplog.records if r.levelno >= logging.WARNING]

    yield run
    logger.removeHandler(caplog.handler)


@pytest.mark.parametrize("version", ["0.26.0", "0.32.0+cpu", "0.33.0"])
def test_a_run_version_starts_silently(start, version):
    ok, warnings = start(version)
    assert ok and warnings == []
    assert p.refusal() is None


@pytest.mark.parametrize("version", ["0.27.1", "0.29.0", "0.31.0"])
def test_a_checked_version_warns_and_names_verify(start, version):
    ok, warnings = start(version)
    assert ok
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    msg = warnings[0].getMessage()
    assert "cacheblend verify --model PATH" in msg and version in msg and "not run" in msg
    row = [r for r in p.verify_patches() if r.name == "vllm version"]
    assert row and row[0].state == "NOT RUN" and row[0].ok


def test_a_refused_version_in_range_fails_with_its_reason(start, monkeypatch):
    reason = "SchedulerOutput.has_sync_kv_loads is never set (vllm/v1/core/sched/scheduler.py)"
    monkeypatch.setitem(table.REFUSED, "0.30", reason)
    monkeypatch.delitem(table.CHECKED, "0.30")
    monkeypatch.delitem(table.SUPPORTED, "0.30")
    monkeypatch.delitem(table.TABLE, "0.30")
    ok, warnings = start("0.30.0")
    assert not ok
    assert reason in p.refusal() and "refuses vLLM 0.30.0" in p.refusal()
    assert [r.levelno for r in warnings] == [logging.ERROR]
    from blend.connector import _check_vllm

    with pytest.raises(RuntimeError, match=re.escape(reason)):
        _check_vllm()


@pytest.mark.parametrize("version", ["0.25.1", "0.34.0", "0.11.0"])
def test_a_version_outside_the_range_is_refused(start, version):
    assert not table.in_range(version)
    ok, _ = start(version)
    assert not ok
    msg = p.refusal()
    assert f"does not support vLLM {version}" in msg and "0.26 to 0.33" in msg
    assert "BLEND_DISABLE_PATCHES" in msg


def test_every_minor_in_the_range_has_one_status_and_patch_points():
    lo, hi = (int(x.split(".")[1]) for x in table.RANGE)
    for minor in range(lo, hi + 1):
        key = f"0.{minor}"
        assert sum(key in t for t in (table.RUN, table.CHECKED, table.REFUSED)) == 1, key
        assert key in table.POINTS, key
    assert set(table.SUPPORTED) == set(table.RUN) | set(table.CHECKED)


def test_setup_and_docs_declare_the_same_range():
    lo, hi = table.RANGE
    nxt = f"0.{int(hi.split('.')[1]) + 1}"
    assert f'"vllm>={lo},<{nxt}"' in (REPO / "setup.py").read_text()
    support = (REPO / "docs" / "support.md").read_text()
    for key in table.POINTS:
        assert re.search(rf"^\| {re.escape(key)}\b", support, re.M), f"no row for {key}"


# ---------------------------------------------------------------- the wheel checker
def _installed_vllm() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vLLM is not installed")
    return Path(spec.origin).parent


def _fake_wheel(tmp_path: Path, edit: dict[str, tuple[str, str]] | None = None) -> Path:
    """The installed vLLM's .py files as a wheel zip; `edit` maps file -> (old, new) text."""
    root = _installed_vllm()
    version = p.vllm_version()
    whl = tmp_path / f"vllm-{version}-cp38-abi3-linux_x86_64.whl"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as z:
        for f in root.rglob("*.py"):
            rel = "vllm/" + f.relative_to(root).as_posix()
            text = f.read_text(encoding="utf-8", errors="replace")
            if edit and rel in edit:
                old, new = edit[rel]
                assert old in text, (rel, old)
                text = text.replace(old, new)
            z.writestr(rel, text)
        z.writestr(f"vllm-{version}.dist-info/METADATA", f"Name: vllm\nVersion: {version}\n")
    return whl


_BASE = "vllm/distributed/kv_transfer/kv_connector/v1/base.py"


def test_checker_passes_the_installed_vllm(tmp_path, capsys):
    whl = _fake_wheel(tmp_path)
    assert check_wheel.main([str(whl)]) == 0
    out = capsys.readouterr().out
    assert "MISSING" not in out and "CHANGED" not in out
    assert re.search(r"^OK +patch point prompt spans: ", out, re.M)


def test_checker_flags_a_missing_method_and_a_renamed_parameter(tmp_path, capsys):
    whl = _fake_wheel(tmp_path, {
        _BASE: ("def get_num_new_matched_tokens(", "def get_num_new_matched_tokenz("),
        "vllm/v1/core/sched/output.py": ("resumed_req_ids", "resumed_ids"),
    })
    assert check_wheel.main([str(whl)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^MISSING +override KVConnectorBase_V1\.get_num_new_matched_tokens ", out, re.M)
    assert re.search(r"^MISSING +abstract KVConnectorBase_V1\.get_num_new_matched_tokenz ", out, re.M)
    assert re.search(r"^MISSING +scheduler metadata: CachedRequestData\.resumed_req_ids +\[vllm/v1/"
                     r"core/sched/output\.py\]", out, re.M)


def test_checker_flags_a_changed_signature(tmp_path, capsys):
    mod = "vllm/entrypoints/common/offline.py"
    if not (_installed_vllm() / "entrypoints" / "common" / "offline.py").exists():
        pytest.skip("this vLLM keeps the offline mixin elsewhere")
    whl = _fake_wheel(tmp_path, {
        _BASE: ('request: "Request",\n        num_computed_tokens: int,\n    ) -> tuple[int | None',
                'request: "Request",\n        num_local_tokens: int,\n    ) -> tuple[int | None'),
        mod: ("def _params_to_seq(", "def _params_as_seq("),
    })
    assert check_wheel.main([str(whl)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^CHANGED +override KVConnectorBase_V1\.get_num_new_matched_tokens: vLLM "
                     r"\(request, num_local_tokens\) vs ours \(request, num_computed_tokens\)",
                     out, re.M)
    assert re.search(r"^MISSING +prompt spans: OfflineInferenceMixin\._params_to_seq", out, re.M)
