"""The patches plugin: entry point, import hook, version keying, env switches, `cacheblend verify`.

Each case that depends on import order or environment runs in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PY = sys.executable


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    e = {**os.environ, **env}
    return subprocess.run([PY, "-c", code], capture_output=True, text=True, env=e, timeout=300)


def test_entry_point_is_installed():
    import importlib.metadata as md

    eps = [ep for ep in md.entry_points(group="vllm.general_plugins") if ep.name == "cacheblend"]
    assert eps and eps[0].value == "blend.patches.vllm_plugin:register"
    assert callable(eps[0].load())


def test_import_hook_patches_vllm_imported_after_blend():
    code = (
        "import sys, blend\n"
        "assert 'vllm' not in sys.modules, 'import blend must not import vLLM'\n"
        "from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory as F\n"
        "from vllm.config import KVTransferConfig\n"
        "c = F.get_connector_class(KVTransferConfig(kv_connector='BlendConnector', kv_role='kv_both'))\n"
        "print(c.__module__, c.__name__)\n"
        "import vllm.v1.worker.cpu_model_runner as m\n"
        "print(m.CPUModelRunner.load_model.__blend_capture__)\n"
    )
    r = _run(code, BLEND_DISABLE_PATCHES="")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "blend.connector BlendConnector" in r.stdout and "True" in r.stdout


def test_plugin_register_after_vllm_import_and_module_path_form():
    code = (
        "from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory as F\n"
        "from vllm.config import KVTransferConfig\n"
        "from blend.patches.vllm_plugin import register\n"
        "register(); register()  # idempotent\n"
        "cfg = KVTransferConfig(kv_connector='BlendConnector', kv_connector_module_path='blend.connector',"
        " kv_role='kv_both')\n"
        "print(F.get_connector_class(cfg).__name__, 'BlendConnector' in F._registry)\n"
    )
    r = _run(code, BLEND_DISABLE_PATCHES="")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "BlendConnector True" in r.stdout


def test_disable_switch_turns_everything_off():
    code = (
        "import blend\n"
        "from blend.patches import verify_patches\n"
        "from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory as F\n"
        "import vllm.v1.worker.cpu_model_runner as m\n"
        "print('registered', 'BlendConnector' in F._registry)\n"
        "print('wrapped', hasattr(m.CPUModelRunner.load_model, '__blend_capture__'))\n"
        "print([s.line() for s in verify_patches()])\n"
    )
    r = _run(code, BLEND_DISABLE_PATCHES="1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "registered False" in r.stdout and "wrapped False" in r.stdout
    assert "DISABLED" in r.stdout


def test_verbose_logs_every_patch_point():
    code = "import blend.patches as p\np.verify_patches(import_modules=True)\n"
    r = _run(code, BLEND_PATCH_VERBOSE="1", BLEND_DISABLE_PATCHES="")
    assert r.returncode == 0, r.stderr[-2000:]
    log = r.stderr
    for target in ("KVConnectorFactory", "CPUModelRunner.load_model", "GPUModelRunner.load_model",
                   "OfflineInferenceMixin._add_completion_requests"):
        assert "[Blend.Patch] armed" in log and target in log, target
    assert log.count("[Blend.Patch] patched") >= 4


def test_each_version_patches_its_own_offline_module():
    from blend.patches.table import points_for

    def spans(v):
        return {p.module for p in points_for(v) if p.kind == "prompt_spans"}

    assert spans("0.26.0") == {"vllm.entrypoints.offline_utils"}  # read in the 0.26.0 wheel
    assert spans("0.32.0") == spans("0.33.0") == {"vllm.entrypoints.common.offline"}
    runners = {p.module for p in points_for("0.26.0") if p.kind == "capture"}
    assert "vllm.v1.worker.gpu.model_runner" in runners  # 0.26's default GPU runner (V2)


def test_unsupported_version_is_refused_by_name(monkeypatch):
    import blend.patches as p
    from blend.patches.table import SUPPORTED, points_for

    assert points_for("0.32.0") and points_for("0.33.1+cu130")
    assert points_for("0.11.0") is None
    monkeypatch.setattr(p, "vllm_version", lambda: "0.11.0")
    rows = p.verify_patches()
    assert rows[0].state == "UNSUPPORTED"
    for v in SUPPORTED:
        assert v in rows[0].detail
    assert "BLEND_DISABLE_PATCHES" in rows[0].detail


def test_cli_verify_prints_each_patch_point(tmp_path):
    exe = os.path.join(os.path.dirname(PY), "cacheblend")
    r = subprocess.run([exe, "verify", "--store", f"local:{tmp_path}"], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "BLEND_DISABLE_PATCHES": ""})
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "=== cacheblend patch verification ==="
    assert lines[1] == "1. plugin entry point: LOADED (blend.patches.vllm_plugin:register)"
    assert lines[2] == "2. connector registered: BlendConnector"
    assert lines[3].startswith("3. model capture: INSTALLED (") and "CPUModelRunner" in lines[3]
    assert lines[-1] == f"5. store: local:{tmp_path} reachable"


def test_cli_verify_fails_on_unreachable_store(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    exe = os.path.join(os.path.dirname(PY), "cacheblend")
    r = subprocess.run([exe, "verify", "--store", f"local:{blocker}/kv"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1
    assert "UNREACHABLE" in r.stdout


@pytest.mark.parametrize("argv", [["precompute", "--model", "x", "/nonexistent/chunk.txt"],
                                  ["nonsense"]])
def test_cli_bad_input_exits_nonzero(argv):
    from blend.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
