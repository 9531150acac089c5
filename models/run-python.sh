#!/usr/bin/env bash
# Runs the project's Python: $BLIP3O_PYTHON, else .venv's (native/setup.sh makes it, with torch 2.13).
# Runs from the repository root so `-m models.x` works.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${BLIP3O_PYTHON:-.venv/bin/python}
if ! [ -x "$py" ] && ! command -v "$py" >/dev/null 2>&1; then
  echo "blip3o: no Python at $py (run \`npm run setup\`, which makes .venv, or set BLIP3O_PYTHON)" >&2
  exit 1
fi
exec "$py" "$@"
