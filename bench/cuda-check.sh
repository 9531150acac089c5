#!/usr/bin/env bash
# One device call on a lent GPU machine (see ../shared/GPU.md): builds the addon against the machine's
# CUDA libtorch through BLIP3O_LIBTORCH, then checks CUDA against CPU on the bundled model.
# Expects, carried in .device/ (ignored by git): node.xz (this machine's node binary, xz) and
# node_modules.tar.xz (production node_modules: npm ci --omit=dev), and dist/ (npx tsc) carried too.
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
xz -dc .device/node.xz > /tmp/node && chmod +x /tmp/node && mkdir -p /tmp/nb && ln -sf /tmp/node /tmp/nb/node
export PATH=/tmp/nb:$PATH
[ -d node_modules ] || tar -xJf .device/node_modules.tar.xz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
export BLIP3O_LIBTORCH=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
s=$(date +%s)
node node_modules/cmake-js/bin/cmake-js compile -G Ninja > "$OUT/build.txt" 2>&1 || { tail -40 "$OUT/build.txt"; exit 1; }
echo "build: $(( $(date +%s) - s )) s"
node -e "console.log(JSON.stringify(require('./build/Release/blip3o.node').runtimeInfo()))"
timeout 240 node bench/cuda-check.js models/tiny > "$OUT/cuda-check.json"
cat "$OUT/cuda-check.json"
