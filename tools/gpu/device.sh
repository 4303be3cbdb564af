#!/usr/bin/env bash
# GPU harness, run ON the lent GPU machine from the repo root (see docs/gpu.md).
#
#   bash tools/gpu/device.sh [--vllm 0.26|0.33] SUBCOMMAND...   (default 0.26: the image's torch 2.11;
#                                                  # 0.33 brings torch 2.14, triton 3.8, NCCL 2.30)
#   bash tools/gpu/device.sh stash                 # move the carried .gpu/<version>/pN part to /root/gparts-<version>
#   bash tools/gpu/device.sh install               # unpack parts; vLLM + deps + gguf + project into
#                                                  # /tmp/site-<version>; SmolLM2 bf16 from the carried GGUF
#   bash tools/gpu/device.sh units                 # kernel + loader GPU tests -> $OUT/gpu_unit_tests.txt
#   bash tools/gpu/device.sh tests                 # tests/test_vllm_gpu.py -> $OUT/vllm_gpu_tests.txt
#   bash tools/gpu/device.sh graphs                # tests/test_vllm_gpu_graphs.py (cuda_graphs in vLLM)
#                                                  # -> $OUT/vllm_gpu_graphs_tests.txt
#   bash tools/gpu/device.sh bench [ARGS...]       # bench/ttft_vllm_gpu.py -> $OUT/ttft_vllm_gpu.json
#   bash tools/gpu/device.sh profile [ARGS...]     # bench/profile_vllm_gpu.py -> $OUT/profile_vllm_gpu.json
#   bash tools/gpu/device.sh serve [ARGS...]       # bench/serve_rag.py (vllm serve plain vs blended under
#                                                  # load) -> $OUT/serve_rag.json, .png, .txt; with
#                                                  # --pyspy-rate R also $OUT/pyspy_*.txt. Runs add up in
#                                                  # $CACHEBLEND_HOME/serve_rag while the machine is warm.
#   bash tools/gpu/device.sh all                   # install + tests + bench (needs > 10 min: split it)
# Several subcommands run in order: `device.sh stash install tests`. Every step is idempotent:
# on a warm machine a done install is skipped (the project itself is reinstalled only when its
# sources changed). Afterwards `source /root/gpu-env.sh` gives the environment by hand.
# Files in $OUT (default /tmp/out): install.txt env.txt vllm_gpu_tests.txt ttft_vllm_gpu.json
# ttft_vllm_gpu.txt ttft_vllm_gpu.workers.log (6 files; at most 8 come back).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
SERIES=${VLLM_SERIES:-0.33}  # the current release; --vllm 0.26 for the image-torch build
if [ "${1:-}" = --vllm ]; then SERIES=$(echo "${2:?--vllm needs a version}" | cut -d. -f1,2); shift 2; fi
case "$SERIES" in 0.26|0.33) ;; *) echo "device.sh: no recipe for vLLM $SERIES (0.26, 0.33)" >&2; exit 2 ;; esac
GPARTS=${GPARTS:-/root/gparts-$SERIES}
export SITE=${SITE:-/tmp/site-$SERIES}  # serve_rag.py looks for py-spy in $SITE/bin
PAYLOAD=${PAYLOAD:-/root/gpayload-$SERIES}
export CACHEBLEND_HOME=${CACHEBLEND_HOME:-/root/cbhome}
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0
export TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$GPARTS" "$SITE" "$CACHEBLEND_HOME"
[ -f setup.py ] && [ -d blend ] || { echo "run from the repo root" >&2; exit 2; }
# A device call may run 600 s: stop our own work before that, so that $OUT still comes back.
left() { local l=$(( ${CALL_BUDGET:-580} - SECONDS )); [ "$l" -lt 60 ] && l=60; echo "$l"; }
log() { echo "[device $(date +%H:%M:%S) vllm $SERIES] $*" | tee -a "$OUT/install.txt"; }

stash() {
  local n=0 f
  for f in .gpu/"$SERIES"/p*/gpart_* .gpu/"$SERIES"/p*/manifest.txt; do
    [ -e "$f" ] || continue
    mv -f "$f" "$GPARTS/" && n=$((n + 1))
  done
  log "stash: moved $n file(s); in $GPARTS: $(cd "$GPARTS" && ls gpart_* 2>/dev/null | tr '\n' ' ')"
}

payload() {  # assemble + check + unpack the parts (once)
  [ -f "$PAYLOAD/.done" ] && { log "payload: already unpacked in $PAYLOAD"; return 0; }
  stash
  [ -f "$GPARTS/manifest.txt" ] || { log "payload: no manifest in $GPARTS: carry .gpu/p1..pN first"; return 1; }
  local want have
  want=$(awk '/^parts /{print $2}' "$GPARTS/manifest.txt")
  have=$(ls "$GPARTS"/gpart_* 2>/dev/null | wc -l)
  if [ "$have" != "$want" ]; then
    log "payload: $have of $want parts in $GPARTS; missing: $(for i in $(seq 0 $((want - 1))); do \
        f=$(printf gpart_%02d "$i"); [ -e "$GPARTS/$f" ] || printf '%s (carry .gpu/%s/p%d) ' "$f" "$SERIES" $((i + 1)); done)"
    return 1
  fi
  (cd "$GPARTS" && grep ' gpart_' manifest.txt | sha256sum -c --quiet -) || { log "payload: checksum mismatch"; return 1; }
  rm -rf "$PAYLOAD.tmp" && mkdir -p "$PAYLOAD.tmp"
  log "payload: unpacking $want parts"
  cat "$GPARTS"/gpart_* | python3 -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|*').extractall(sys.argv[1], filter='tar')" "$PAYLOAD.tmp" \
    || { log "payload: unpack failed"; return 1; }
  rm -rf "$PAYLOAD" && mv "$PAYLOAD.tmp" "$PAYLOAD" && touch "$PAYLOAD/.done"
}

install_vllm() {
  [ -f "$SITE/.vllm_done" ] && { log "vllm: already in $SITE"; return 0; }
  payload || return 1
  log "vllm: into $SITE"
  if [ -d "$PAYLOAD/site" ]; then cp -a "$PAYLOAD"/site/. "$SITE"/ || return 1; fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$PAYLOAD"/wheels/*.whl >>"$OUT/install.txt" 2>&1 || { log "vllm: pip install of the wheels failed"; return 1; }
  local w mod
  for w in "$PAYLOAD"/opt/*.whl; do  # only where the machine lacks the module (it has accelerate)
    mod=$(basename "$w" | cut -d- -f1)
    if python3 -c "import $mod" 2>/dev/null; then log "opt: $mod present, not installed"; continue; fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$w" \
      >>"$OUT/install.txt" 2>&1 || { log "opt: $w failed"; return 1; }
    log "opt: installed $(basename "$w")"
  done
  # The first thing that breaks when a carried torch meets the image's CUDA libraries (a missing
  # symbol, an old NCCL) breaks here, with its message in install.txt.
  python3 -P -c "import torch, vllm, gguf; x = torch.ones(64, 64, device='cuda', dtype=torch.bfloat16); \
print('vllm', vllm.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda, (x @ x).sum().item())" \
    >>"$OUT/install.txt" 2>&1 || { log "vllm: import or first CUDA op failed:"; tail -3 "$OUT/install.txt"; return 1; }
  touch "$SITE/.vllm_done"
}

install_project() {  # reinstalled whenever the sources changed (the tree travels with every call)
  local h
  h=$(cat setup.py pyproject.toml $(find blend patches triton_kernels -name '*.py' | sort) | sha256sum | cut -c1-16)
  [ "$(cat "$SITE/.project_hash" 2>/dev/null)" = "$h" ] && { log "project: up to date ($h)"; return 0; }
  log "project: installing ($h)"
  rm -rf build ./*.egg-info/ 2>/dev/null
  python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" . \
    >>"$OUT/install.txt" 2>&1 || { log "project: pip install failed"; return 1; }
  rm -rf build
  echo "$h" > "$SITE/.project_hash"
}

install_model() {  # SmolLM2 bf16 folder, made by blend.assets from the carried GGUF
  local dl="$CACHEBLEND_HOME/downloads"
  mkdir -p "$dl"
  if [ ! -f "$CACHEBLEND_HOME/models/SmolLM2-135M-Instruct/MANIFEST.json" ]; then
    [ -f "$dl/SmolLM2-135M-Instruct.gguf" ] || cp "$PAYLOAD/models/SmolLM2-135M-Instruct.gguf" "$dl/" || return 1
    log "model: dequantizing SmolLM2 (blend.assets)"
  fi
  python3 -P -m blend.assets >>"$OUT/install.txt" 2>&1 || { log "model: blend.assets failed"; return 1; }
  log "model: $CACHEBLEND_HOME/models/SmolLM2-135M-Instruct"
}

write_env() {
  cat > /root/gpu-env.sh <<ENV
export PYTHONPATH=$SITE VLLM_SERIES=$SERIES VLLM_USE_FLASHINFER_SAMPLER=0 CACHEBLEND_HOME=$CACHEBLEND_HOME TOKENIZERS_PARALLELISM=false
ENV
  { echo "== $(date -u)"; nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv
    python3 -P -c "import torch, triton, transformers, vllm, blend; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__, 'blend', blend.__file__)"
    python3 -P -m pip list 2>/dev/null | grep -i -E "^(torch|triton|nvidia-|cuda-|flashinfer)"
    python3 -P -m blend.cli verify 2>&1 | tail -20; } >>"$OUT/env.txt" 2>&1
}

install() {
  local t0=$SECONDS
  install_vllm && install_project && install_model || { log "install FAILED"; return 1; }
  write_env
  log "install: ok in $((SECONDS - t0)) s (env: source /root/gpu-env.sh)"
}

tests() {
  install_project || return 1
  log "tests: tests/test_vllm_gpu.py"
  # -P: import blend from $SITE (the installed copy, with blend.patches), not the repo folder.
  VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING} timeout "$(left)" python3 -P -m pytest -p no:cacheprovider -o pythonpath= -rA -v --durations=0 -m gpu \
    tests/test_vllm_gpu.py ${TEST_ARGS:-} 2>&1 | tee "$OUT/vllm_gpu_tests.txt" | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed" 
  local rc=${PIPESTATUS[0]}
  log "tests: rc=$rc"
  return "$rc"
}

graphs() {  # cuda_graphs inside vLLM: r=1.0 by the master check, replays counted (opt-in, apart)
  install_project || return 1
  log "graphs: tests/test_vllm_gpu_graphs.py"
  VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING} timeout "$(left)" python3 -P -m pytest -p no:cacheprovider -o pythonpath= -rA -v -s -m gpu \
    tests/test_vllm_gpu_graphs.py 2>&1 | tee "$OUT/vllm_gpu_graphs_tests.txt" | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed|replays"
  local rc=${PIPESTATUS[0]}
  log "graphs: rc=$rc"
  return "$rc"
}

units() {  # the kernels' and the loader's GPU tests (no vLLM engine): fast, run first
  install_project || return 1
  log "units: GPU tests of the kernels and the chunk loader"
  timeout "$(left)" python3 -P -m pytest -p no:cacheprovider -o pythonpath= -q -rfE -m gpu tests/test_kernels_*.py \
    tests/test_chunk_loader.py tests/test_layer_graphs.py 2>&1 | tee "$OUT/gpu_unit_tests.txt" | tail -5
  local rc=${PIPESTATUS[0]}
  log "units: rc=$rc"
  return "$rc"
}

run_script() {  # NAME ARGS...: python -m bench.NAME -> $OUT/NAME.txt (+ what the script writes to $OUT)
  local name=$1; shift
  install_project || return 1
  log "$name: python -m bench.$name $*"
  # -P: the checkout's blend/ must not shadow the installed one; bench comes from $PWD, last.
  PYTHONPATH=$PYTHONPATH:$PWD timeout "$(left)" python3 -P -m "bench.$name" "$@" 2>&1 | tee "$OUT/$name.txt" \
    | grep -vE "^(INFO|DEBUG|WARNING) [0-9]|^\(EngineCore"
  local rc=${PIPESTATUS[0]}
  log "$name: rc=$rc"
  return "$rc"
}

# The bench starts no section that its own estimate says would end past the call's budget
# (a later --budget-s in ARGS wins); it prints its plan first.
bench() { run_script ttft_vllm_gpu --out "$OUT/ttft_vllm_gpu.json" --budget-s "$(( $(left) - 15 ))" "$@"; }
profile() { run_script profile_vllm_gpu --out "$OUT" "$@"; }
serve() {  # stops starting runs 30 s before the call's budget; py-spy is looked up in $SITE/bin
  install_project || return 1
  run_script serve_rag --out "$OUT" --budget-s "$(( $(left) - 30 ))" "$@"
}

[ $# -gt 0 ] || { sed -n '2,23p' "$0"; exit 2; }
rc=0
while [ $# -gt 0 ]; do
  cmd=$1; shift
  case "$cmd" in
    stash) stash ;;
    install) install || exit 1 ;;
    tests) tests || rc=1 ;;
    units) units || rc=1 ;;
    graphs) graphs || rc=1 ;;
    bench) bench "$@" || rc=1; break ;;
    profile) profile "$@" || rc=1; break ;;
    serve) serve "$@" || rc=1; break ;;
    all) install || exit 1; tests || rc=1; bench || rc=1 ;;
    *) echo "unknown subcommand $cmd (stash|install|units|tests|graphs|bench|profile|serve|all)" >&2; exit 2 ;;
  esac
done
exit "$rc"
