#!/usr/bin/env bash
# The whole CUDA run of one lent GPU machine (../shared/GPU.md), as one device call:
#   1. builds the addon against the machine's CUDA libtorch (the torch wheel's) through BLIP3O_LIBTORCH;
#   2. checks CUDA against CPU on the bundled tiny model (bench/cuda-check.js);
#   3. exports a random-weight bundle at the 4B dimensions in bfloat16 on the GPU (models.export);
#   4. benchmarks it: the runtime and the Python reference side by side (blip3o bench);
#   5. merges 2 and 4 into $OUT/<date>_cuda_<card>.{json,md} (bench/cuda-summary.js): copy them to
#      bench/results/.
# Each step writes under $OUT as it ends, so a step that fails or runs out of time keeps the others'.
# Carried in .device/ (ignored by git): node.xz (this machine's node binary, xz) and node_modules.tar.xz
# (npm ci --omit=dev --ignore-scripts, tarred); dist/ (npx tsc) carried too.
# BUDGET (seconds, default 540) bounds the whole run: each step gets at most what is left of it, less
# the summary's share.
#   PRESET=4b EXPORT_ARGS="--dit-layers 2" BENCH_ARGS="--runs 3" BUDGET=540 bash bench/cuda.sh
# (DEVICE=cpu PRESET=tiny runs steps 3 to 5 on a machine without CUDA: a dry run of the script.)
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - > "$OUT/env.json" <<'PYEOF'
import json, torch
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name() if cuda else None,
                  "gpuMemoryGiB": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None}))
PYEOF
cat "$OUT/env.json"

step "build"
export BLIP3O_LIBTORCH=${BLIP3O_LIBTORCH:-$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')}
node node_modules/cmake-js/bin/cmake-js compile -G Ninja > "$OUT/build.txt" 2>&1 || { tail -40 "$OUT/build.txt"; exit 1; }
node -e "console.log(JSON.stringify(require('./build/Release/blip3o.node').runtimeInfo()))"

step "CUDA against CPU, bundled model"
timeout "$(upto 240)" node bench/cuda-check.js models/tiny > "$OUT/cuda-check.json" || echo "cuda-check failed: $?"
cat "$OUT/cuda-check.json"

PRESET=${PRESET:-4b}
BUNDLE=/tmp/blip3o-$PRESET
step "export $PRESET (random weights, bfloat16, on the GPU)"
# shellcheck disable=SC2086
if timeout "$(upto 300)" "$PY" -m models.export --preset "$PRESET" --out "$BUNDLE" --dtype bfloat16 --device "${DEVICE:-cuda}" \
    --stand-in-tokenizer ${EXPORT_ARGS:-}; then
  step "bench $PRESET: runtime and Python reference"
  # shellcheck disable=SC2086
  timeout "$(upto 420)" node dist/cli.js bench --model "$BUNDLE" --device "${DEVICE:-cuda}" --dtype bfloat16 --no-throughput \
    --out /tmp/bench-results --json ${BENCH_ARGS:---runs 3} > "$OUT/bench.json" || echo "bench failed: $?"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader
else
  echo "export failed: $?"
fi

step "summary"
node bench/cuda-summary.js "$OUT" "$OUT"
step "done"
