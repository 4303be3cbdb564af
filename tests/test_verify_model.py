"""`cacheblend verify --model` on the real vLLM CPU engine (SmolLM2), and the master check's
power to fail: the same command with a test-only fault injected (`blend/faults.py`).

- no fault: PASS, exit 0, every blended request reported by the connector;
- `CACHEBLEND_TEST_FAULT=rope` (one chunk's RoPE one position off): FAIL, exit 1;
- `CACHEBLEND_TEST_FAULT=mask` (one recomputed token's causal mask sees one future token):
  FAIL, exit 1.

Each run starts two engines (plain vLLM, then vLLM with the connector), each in its own
process, as a user's run does. fp32 (`--dtype float32`), so fp32's tolerances apply
(mean first-token KL <= 1e-3, near-tie <= 0.01 nats; bf16's are 0.01 and 0.3): vLLM
CPU's bf16 matmuls on a CPU without AVX-512 BF16 took 330 s for the plain engine's 10
prompts here. The fault runs judge 4 prompts (the check's verdict on them is what is
tested, not the 10-prompt minimum).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from blend.faults import ENV

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--seed", "0"]


def _verify(model: str, env: dict, fault: str | None, prompts: int) -> tuple[int, str]:
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                               env.get("PYTHONPATH")]))}
    env.pop(ENV, None)
    if fault:
        env[ENV] = fault
    r = subprocess.run([sys.executable, "-m", "blend.cli", "verify", "--model", model, *ARGS,
                        "--prompts", str(prompts)], capture_output=True, text=True, env=env,
                       timeout=1500, cwd=ROOT)
    print(r.stdout)
    return r.returncode, r.stdout + r.stderr


def _kl(out: str) -> float:
    """The verdict line's KL (the tolerance line before it names the limit, not a figure)."""
    return float(re.search(r"^(?:PASS|FAIL): .*?mean first-token KL ([-+.\deE]+)", out,
                           re.M).group(1))


def test_verify_model_passes(smollm2_path, child_env):
    rc, out = _verify(smollm2_path, child_env, None, 10)
    assert rc == 0 and "PASS: 10 prompts" in out, out[-4000:]
    assert "were not blended" not in out
    assert _kl(out) < 1e-3, out[-3000:]  # fp32: far inside the bf16 tolerance


@pytest.mark.parametrize("fault", ["rope", "mask"])
def test_verify_model_fails_under_a_fault(smollm2_path, child_env, fault):
    """The test that the check can fail: a one-position RoPE error in one chunk, or one
    token's causal mask one key too wide, must not pass."""
    rc, out = _verify(smollm2_path, child_env, fault, 4)
    assert f"{ENV}={fault}" in out
    assert rc == 1 and "FAIL: 4 prompts" in out, out[-4000:]
    assert "engine check did not run" not in out and "were not blended" not in out, out[-4000:]
