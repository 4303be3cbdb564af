#!/usr/bin/env bash
# Qwen2.5-Coder-1.5B-Instruct on the GPU machine. Run ON the device from the repo
# root, after `tools/gpu/device.sh ... install` (it needs gguf + transformers from /tmp/site):
#
#   bash tools/gpu/model_device.sh stash      # carried .gpu_model/pK pieces -> /root/gmodel;
#                                             # carried .gpu_data -> $CACHEBLEND_HOME/data
#   bash tools/gpu/model_device.sh assemble   # only reassemble + check the GGUF
#   bash tools/gpu/model_device.sh install    # reassemble, check sha256 (pieces and whole),
#                                             # dequantize to bf16 with blend.assets into
#                                             # $CACHEBLEND_HOME/models/Qwen2.5-Coder-1.5B-Instruct
#   bash tools/gpu/model_device.sh quality [ARGS...]   # bench/quality_gpu.py -> $OUT
#
# Subcommands run in order (`model_device.sh stash install`); every step is idempotent: a
# finished install is skipped on a warm machine. Pieces come from tools/gpu/pack_model.sh.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
SITE=${SITE:-/tmp/site}
GMODEL=${GMODEL:-/root/gmodel}
NAME=Qwen2.5-Coder-1.5B-Instruct
export CACHEBLEND_HOME=${CACHEBLEND_HOME:-/root/cbhome}
export VLLM_USE_FLASHINFER_SAMPLER=0 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$GMODEL" "$CACHEBLEND_HOME/downloads" "$CACHEBLEND_HOME/data"
[ -f setup.py ] && [ -d blend ] || { echo "run from the repo root" >&2; exit 2; }
left() { local l=$(( ${CALL_BUDGET:-580} - SECONDS )); [ "$l" -lt 60 ] && l=60; echo "$l"; }
log() { echo "[model $(date +%H:%M:%S)] $*" | tee -a "$OUT/model_install.txt"; }
MODEL_DIR=$CACHEBLEND_HOME/models/$NAME
GGUF=$CACHEBLEND_HOME/downloads/$NAME.gguf

stash() {
  local n=0 f
  for f in .gpu_model/p*/gmodel_* .gpu_model/p*/manifest.txt; do
    [ -e "$f" ] || continue
    mv -f "$f" "$GMODEL/" && n=$((n + 1))
  done
  local xzf name want have
  for xzf in .gpu_data/*.json.xz; do  # the QA dev sets, each checked against the manifest
    [ -f "$xzf" ] || continue
    name=$(basename "$xzf" .xz)
    python3 -c "import lzma, sys, shutil; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
      "$xzf" "$CACHEBLEND_HOME/data/$name.tmp" \
      && want=$(awk -v n="$name" '$2 == n {print $1}' .gpu_data/manifest.txt) \
      && have=$(sha256sum < "$CACHEBLEND_HOME/data/$name.tmp" | cut -d' ' -f1) \
      && [ -n "$want" ] && [ "$want" = "$have" ] \
      && mv "$CACHEBLEND_HOME/data/$name.tmp" "$CACHEBLEND_HOME/data/$name" \
      && log "stash: $name -> $CACHEBLEND_HOME/data (sha256 ok)" || log "stash: $name FAILED its check"
  done
  log "stash: moved $n file(s); in $GMODEL: $(cd "$GMODEL" && ls gmodel_* 2>/dev/null | tr '\n' ' ')"
}

assemble() {  # pieces -> GGUF, every piece and the whole checked against the manifest
  local want_sha want_n have
  [ -f "$GGUF.ok" ] && { log "gguf: already assembled ($GGUF)"; return 0; }
  [ -f "$GMODEL/manifest.txt" ] || { log "gguf: no manifest in $GMODEL: carry .gpu_model/p1..pN first"; return 1; }
  want_n=$(awk '/^pieces /{print $2}' "$GMODEL/manifest.txt")
  want_sha=$(awk '/^sha256 /{print $2}' "$GMODEL/manifest.txt")
  have=$(ls "$GMODEL"/gmodel_* 2>/dev/null | wc -l)
  if [ "$have" != "$want_n" ]; then
    log "gguf: $have of $want_n pieces in $GMODEL; missing: $(for i in $(seq 0 $((want_n - 1))); do \
        f=$(printf gmodel_%02d "$i"); [ -e "$GMODEL/$f" ] || printf '%s (carry .gpu_model/p%d) ' "$f" $((i + 1)); done)"
    return 1
  fi
  (cd "$GMODEL" && grep ' gmodel_' manifest.txt | sha256sum -c --quiet -) || { log "gguf: a piece fails its sha256"; return 1; }
  cat "$GMODEL"/gmodel_* > "$GGUF.tmp" || return 1
  have=$(sha256sum "$GGUF.tmp" | cut -d' ' -f1)
  [ "$have" = "$want_sha" ] || { log "gguf: sha256 $have, expected $want_sha"; rm -f "$GGUF.tmp"; return 1; }
  mv "$GGUF.tmp" "$GGUF" && touch "$GGUF.ok"
  rm -f "$GMODEL"/gmodel_*  # the GGUF holds them now
  log "gguf: $GGUF $(stat -c %s "$GGUF") bytes, sha256 ok"
}

install() {
  local t0=$SECONDS
  [ -f "$MODEL_DIR/MANIFEST.json" ] && { log "install: $MODEL_DIR already there"; return 0; }
  assemble || { log "install FAILED"; return 1; }
  python3 -c "import gguf" 2>/dev/null || PYTHONPATH=$SITE python3 -c "import gguf" 2>/dev/null \
    || { log "install: gguf missing: run tools/gpu/device.sh install first"; return 1; }
  log "install: dequantizing to bf16 (blend.assets; probe on the CPU)"
  # blend from the repo (it names this model), gguf + vLLM's transformers pins from $SITE.
  PYTHONPATH=$PWD:$SITE timeout "$(left)" python3 -P -m blend.assets "$NAME" >>"$OUT/model_install.txt" 2>&1 \
    || { log "install: blend.assets failed (see model_install.txt)"; return 1; }
  log "install: ok in $((SECONDS - t0)) s: $MODEL_DIR ($(du -sh "$MODEL_DIR" | cut -f1)); probe: \
$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['probe_answer'])" "$MODEL_DIR/MANIFEST.json")"
}

quality() {  # bench/quality_gpu.py inside this call's budget; runs add up while the machine is warm
  [ -f "$MODEL_DIR/MANIFEST.json" ] || { log "quality: no model: run install first"; return 1; }
  [ -f "$SITE/.project_hash" ] || { log "quality: run tools/gpu/device.sh install first"; return 1; }
  local h
  h=$(cat setup.py pyproject.toml $(find blend patches triton_kernels -name '*.py' | sort) | sha256sum | cut -c1-16)
  if [ "$(cat "$SITE/.project_hash")" != "$h" ]; then  # as device.sh install_project does
    log "quality: project changed; reinstalling into $SITE ($h)"
    rm -rf build ./*.egg-info/ 2>/dev/null
    python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" . \
      >>"$OUT/model_install.txt" 2>&1 || { log "quality: project install failed"; return 1; }
    rm -rf build
    echo "$h" > "$SITE/.project_hash"
  fi
  log "quality: bench/quality_gpu.py $*"
  PYTHONPATH=$SITE:$PWD timeout "$(left)" python3 -P -m bench.quality_gpu --model "$MODEL_DIR" --out "$OUT" \
    --budget-s "$(( $(left) - 20 ))" "$@" 2>&1 | tee "$OUT/quality_gpu.txt" \
    | grep -vE "^(INFO|DEBUG|WARNING) [0-9]|^\(EngineCore"
  local rc=${PIPESTATUS[0]}
  log "quality: rc=$rc"
  return "$rc"
}

[ $# -gt 0 ] || { sed -n '2,14p' "$0"; exit 2; }
rc=0
while [ $# -gt 0 ]; do
  cmd=$1; shift
  case "$cmd" in
    stash) stash ;;
    assemble) assemble || exit 1 ;;
    install) install || exit 1 ;;
    quality) quality "$@" || rc=1; break ;;
    *) echo "unknown subcommand $cmd (stash|assemble|install|quality)" >&2; exit 2 ;;
  esac
done
exit "$rc"
