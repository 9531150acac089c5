#!/usr/bin/env bash
# Sets up everything blip3o needs on Debian/Ubuntu: system packages (libtorch, OpenBLAS, Python torch,
# a C++ toolchain), npm packages, the native addon (cmake-js) and the TypeScript build.
#   bash native/setup.sh              every step
#   bash native/setup.sh --if-needed  only missing or stale steps (npm start and npm test run this)
# With BLIP3O_LIBTORCH set (another libtorch, e.g. a CUDA one), Debian's libtorch is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if_needed=0
[ "${1:-}" = "--if-needed" ] && if_needed=1
say() { echo "blip3o setup: $*" >&2; }

# 1. System packages. Without libopenblas0-pthread Debian's libtorch uses the reference BLAS (~30x slower).
pkgs=(cmake g++ make python3-pytest nlohmann-json3-dev libopenblas0-pthread)
[ -n "${BLIP3O_LIBTORCH:-}" ] || pkgs+=(libtorch-dev python3-torch)
if command -v dpkg-query >/dev/null 2>&1; then
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then
      command -v sudo >/dev/null 2>&1 || { say "run as root, or install: ${missing[*]}"; exit 1; }
      sudo=sudo
    fi
    say "installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
else
  say "not a Debian system: install these or their equivalents yourself: ${pkgs[*]}"
fi

# stale TARGET SOURCE...: true when TARGET is missing or older than a file under the sources
stale() {
  local target=$1; shift
  [ -e "$target" ] || return 0
  [ -n "$(find "$@" -type f -newer "$target" 2>/dev/null | head -n 1)" ]
}

# 2. npm packages; npm ci also runs this package's install (addon) and prepare (TypeScript) scripts.
if [ $if_needed = 0 ] || stale node_modules/.package-lock.json package.json package-lock.json; then
  say "npm ci"
  npm ci --no-audit --no-fund
fi

# 3. The addon and the TypeScript output, when their sources are newer.
if [ $if_needed = 0 ] || stale build/Release/blip3o.node native CMakeLists.txt; then
  say "building the native addon (cmake-js)"
  npx cmake-js compile
fi
if [ $if_needed = 0 ] || stale dist/cli.js ts tsconfig.json; then
  say "compiling TypeScript"
  npx tsc -p tsconfig.json
fi
