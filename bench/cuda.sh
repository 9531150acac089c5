#!/usr/bin/env bash
# The whole CUDA run of one lent GPU machine (../shared/GPU.md), as one device call:
#   1. in the background from the start: random-weight bundles exported on the GPU in bfloat16
#      (models.export), one at the 4B dimensions and one with the 8B preset's 7B backbone (its other
#      components cut to a layer: only its text decoding is timed), and the hardware floors
#      (bench/floors.py);
#   2. builds the addon against the machine's CUDA libtorch (the torch wheel's) through BLIP3O_LIBTORCH;
#   3. checks CUDA against CPU, and CUDA graphs against the eager path, on the bundled tiny model
#      (bench/cuda-check.js);
#   4. times the graph path, the eager path and the Python reference side by side: images at 4B,
#      text decoding at 4B and at 7B (bench/cuda-speed.js);
#   5. merges it all into $OUT/<date>_cuda-graphs_<card>.{json,md} (bench/cuda-summary.js): copy them
#      to bench/results/.
# Each step writes under $OUT as it ends (8 files at most), so a step that fails or runs out of time
# keeps the others'. Carried in .device/ (ignored by git): node.xz (this machine's node binary, xz) and
# node_modules.tar.xz (npm ci --omit=dev --ignore-scripts, tarred); dist/ (npx tsc) carried too.
# BUDGET (seconds, default 540) bounds the whole run: each step gets at most what is left of it, less
# the summary's share.
#   BUDGET=540 bash bench/cuda.sh
# (DEVICE=cpu PRESET=tiny DECODE_PRESET=tiny DECODE_ARGS= runs it on a machine without CUDA: a dry run.)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
T0=$(date +%s)
step() { echo "== $1 (at $(( $(date +%s) - T0 )) s)"; }
# seconds a step may take: its own cap, or what is left of BUDGET less 15 s for the summary
upto() { local left=$(( T0 + ${BUDGET:-540} - 15 - $(date +%s) )); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
if [ -f .device/node.xz ]; then
  xz -dc .device/node.xz > /tmp/node && chmod +x /tmp/node && mkdir -p /tmp/nb && ln -sf /tmp/node /tmp/nb/node
  export PATH=/tmp/nb:$PATH
fi
[ -d node_modules ] || tar -xJf .device/node_modules.tar.xz
PY=${BLIP3O_PYTHON:-$(command -v python3)}
export BLIP3O_PYTHON=$PY
export PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-4b}
DECODE_PRESET=${DECODE_PRESET:-8b}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - > "$OUT/env.json" <<'PYEOF'
import json, torch
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name() if cuda else None,
                  "gpuMemoryGiB": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None}))
PYEOF
cat "$OUT/env.json"

step "exports and floors (background)"
export_bundle() {  # preset, out dir, extra args
  local preset=$1 out=$2; shift 2
  timeout "$(upto 300)" "$PY" -m models.export --preset "$preset" --out "$out" --dtype bfloat16 --device "$DEVICE" \
    --stand-in-tokenizer "$@" > "/tmp/export-$preset.txt" 2>&1 || { echo "export $preset failed:"; tail -20 "/tmp/export-$preset.txt"; }
  echo "export $preset done (at $(( $(date +%s) - T0 )) s)"
}
( export_bundle "$PRESET" /tmp/blip3o-image
  # shellcheck disable=SC2086
  export_bundle "$DECODE_PRESET" /tmp/blip3o-decode ${DECODE_ARGS---dit-layers 1 --vision-layers 1 --unet-depth 0,0,1 --unet-layers-per-block 1}
) &
EXPORTS=$!
FLOORS=
if [ "$DEVICE" = cuda ]; then
  "$PY" -m bench.floors --preset "$PRESET" --decode-preset "$DECODE_PRESET" > "$OUT/floors.json" 2> /tmp/floors.txt ||
    { echo "floors failed:"; tail -20 /tmp/floors.txt; } &
  FLOORS=$!
fi

step "build"
export BLIP3O_LIBTORCH=${BLIP3O_LIBTORCH:-$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')}
if ! node node_modules/cmake-js/bin/cmake-js compile -G Ninja > /tmp/build.txt 2>&1; then
  grep -B2 -A12 -m8 "error" /tmp/build.txt | head -120
  echo "build failed: building again without the CUDA graphs, to time the rest"
  node node_modules/cmake-js/bin/cmake-js compile -G Ninja --CDBLIP3O_CUDA_GRAPHS=OFF > /tmp/build.txt 2>&1 || { tail -60 /tmp/build.txt; exit 1; }
fi
grep -E "blip3o:|warning" /tmp/build.txt | head -20
node -e "console.log(JSON.stringify(require('./build/Release/blip3o.node').runtimeInfo()))"

if [ "$DEVICE" = cuda ]; then
  step "CUDA against CPU and graphs against eager, bundled model"
  timeout "$(upto 150)" node bench/cuda-check.js models/tiny > "$OUT/cuda-check.json" || echo "cuda-check failed: $?"
  cat "$OUT/cuda-check.json"
fi

step "waiting for the exports"
wait "$EXPORTS"
step "graph, eager and Python reference: images and decoding, $PRESET"
[ -f /tmp/blip3o-image/manifest.json ] &&
  timeout "$(upto 260)" node bench/cuda-speed.js /tmp/blip3o-image --device "$DEVICE" --runs "${RUNS:-3}" > "$OUT/speed-4b.json" ||
  echo "speed $PRESET failed: $?"
step "graph, eager and Python reference: decoding, $DECODE_PRESET"
[ -f /tmp/blip3o-decode/manifest.json ] &&
  timeout "$(upto 200)" node bench/cuda-speed.js /tmp/blip3o-decode --device "$DEVICE" --decode-only > "$OUT/speed-8b.json" ||
  echo "speed $DECODE_PRESET failed: $?"
nvidia-smi --query-gpu=memory.used --format=csv,noheader

step "summary"
# (a bare `wait` would also wait for the tee behind this script's output)
[ -z "$FLOORS" ] || wait "$FLOORS"
node bench/cuda-summary.js "$OUT" "$OUT"

# Then, into the log only, while time is left: kernels and graph time of a DiT step and a decode step
# with this checkout's layer definitions and, when .device/models-base.tar holds an older models/*.py
# (git archive, see the README), with that one's (bench/layer_ab.py); the decoder under channels-last
# and cuDNN's autotuner; the graph path with TorchScript's fusing executor (BLIP3O_JIT_OPTIMIZE=1).
left() { echo $(( T0 + ${BUDGET:-540} - $(date +%s) )); }
if [ "$DEVICE" = cuda ] && [ "$(left)" -gt 60 ]; then
  step "layer definitions A/B (information)"
  timeout "$(( $(left) - 5 ))" "$PY" -m bench.layer_ab > /tmp/layer-ab.json || echo "layer A/B failed: $?"
  if [ -f .device/models-base.tar ] && [ "$(left)" -gt 45 ]; then
    rm -rf /tmp/base && mkdir -p /tmp/base && tar -xf .device/models-base.tar -C /tmp/base && cp -r bench /tmp/base/
    (cd /tmp/base && timeout "$(( $(left) - 5 ))" "$PY" -m bench.layer_ab) > /tmp/layer-ab-base.json || echo "base A/B failed: $?"
  fi
  for f in /tmp/layer-ab*.json; do echo "$f: $(cat "$f")"; done
fi
if [ "$DEVICE" = cuda ] && [ "$(left)" -gt 40 ]; then
  step "decoder memory formats (information)"
  timeout "$(( $(left) - 5 ))" "$PY" -m bench.decoder_formats /tmp/blip3o-image
fi
if [ "$DEVICE" = cuda ] && [ "$(left)" -gt 150 ]; then
  step "graph path with the fusing executor (information)"
  BLIP3O_JIT_OPTIMIZE=1 timeout "$(( $(left) - 5 ))" node bench/cuda-speed.js /tmp/blip3o-image --runs 2 --tokens 32
fi
step "done"
