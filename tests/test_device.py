"""The dtype helper the demo and the CPU benchmark share (blend/device.py)."""

from __future__ import annotations

import pytest

from blend.device import DTYPES, choose_dtype, cpu_bf16_features, decide_cpu_dtype


def test_cpu_rule():
    none = {"avx512_bf16": False, "amx": False}
    assert decide_cpu_dtype(none).dtype == "float32"
    assert "no native bf16" in decide_cpu_dtype(none).reason
    avx = {"avx512_bf16": True, "amx": False}
    assert decide_cpu_dtype(avx).dtype == "bfloat16"
    amx = {"avx512_bf16": True, "amx": True}
    assert decide_cpu_dtype(amx).dtype == "float32"  # the connector refuses the 'amx' layout
    assert "amx" in decide_cpu_dtype(amx).reason
    assert decide_cpu_dtype(amx, blend=False).dtype == "bfloat16"  # plain vLLM takes bf16


def test_this_machine_matches_its_flags():
    f = cpu_bf16_features()
    with open("/proc/cpuinfo") as fh:
        flags = set(next(ln for ln in fh if ln.startswith("flags")).split(":", 1)[1].split())
    assert f["avx512_bf16"] == ("avx512_bf16" in flags)
    assert f["amx"] == ("amx_tile" in flags)
    assert choose_dtype("cpu").dtype in DTYPES


def test_override(monkeypatch):
    monkeypatch.setenv("CACHEBLEND_DTYPE", "bfloat16")
    assert choose_dtype("cpu").dtype == "bfloat16"
    assert choose_dtype("cpu", "float32").dtype == "float32"  # the argument wins
    monkeypatch.setenv("CACHEBLEND_DTYPE", "fp8")
    with pytest.raises(ValueError, match="allowed float32"):
        choose_dtype("cpu")
    monkeypatch.delenv("CACHEBLEND_DTYPE")
    assert choose_dtype("cuda").dtype == "bfloat16"
