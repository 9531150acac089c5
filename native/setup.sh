#!/usr/bin/env bash
# Sets up everything blip3o needs on Debian/Ubuntu: a C++ toolchain, the project's Python virtual
# environment (.venv: torch 2.13 with its prebuilt libtorch, transformers, safetensors, numpy, pytest), npm
# packages, the native addon (cmake-js, against .venv's libtorch) and the TypeScript build.
#   bash native/setup.sh              every step
#   bash native/setup.sh --if-needed  only missing or stale steps (npm start and npm test run this)
# BLIP3O_LIBTORCH builds the addon against another libtorch (a CUDA wheel's, an unpacked one) instead;
# PYTHON names the interpreter that makes .venv (default python3); PIP_RETRIES, pip's retries (default 0:
# where only a local mirror answers, retrying an unreachable index costs minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
if_needed=0
[ "${1:-}" = "--if-needed" ] && if_needed=1
say() { echo "blip3o setup: $*" >&2; }
python=${PYTHON:-python3}

# 1. System packages: the compiler, CMake, the JSON parser's headers, and venv where Python lacks it.
pkgs=(cmake g++ make nlohmann-json3-dev)
"$python" -c 'import venv, ensurepip' >/dev/null 2>&1 || pkgs+=(python3-venv)
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

# 2. The Python virtual environment; its stamp is a copy of the requirements it holds.
if [ $if_needed = 0 ] || ! cmp -s requirements.txt .venv/requirements.txt; then
  [ -x .venv/bin/python ] || { say "making .venv ($("$python" --version 2>&1))"; "$python" -m venv .venv; }
  say "pip install -r requirements.txt into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check --retries "${PIP_RETRIES:-0}" -r requirements.txt
  cp requirements.txt .venv/requirements.txt
fi

# 3. npm packages; npm ci also runs this package's install (addon) and prepare (TypeScript) scripts.
if [ $if_needed = 0 ] || stale node_modules/.package-lock.json package.json package-lock.json; then
  say "npm ci"
  npm ci --no-audit --no-fund
fi

# 4. The addon and the TypeScript output, when their sources (or the torch they build against) are newer.
if [ $if_needed = 0 ] || stale build/Release/blip3o.node native CMakeLists.txt .venv/requirements.txt; then
  say "building the native addon (cmake-js)"
  npx cmake-js compile
fi
if [ $if_needed = 0 ] || stale dist/cli.js ts tsconfig.json; then
  say "compiling TypeScript"
  npx tsc -p tsconfig.json
fi
