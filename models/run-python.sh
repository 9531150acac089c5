#!/usr/bin/env bash
# Runs a Python that has torch: $BLIP3O_PYTHON, else Debian's /usr/bin/python3 (the python3 first on
# PATH may be another interpreter without torch). Runs from the repository root so `-m models.x` works.
set -euo pipefail
cd "$(dirname "$0")/.."
for py in "${BLIP3O_PYTHON:-}" /usr/bin/python3 python3; do
  [ -n "$py" ] || continue
  if "$py" -c 'import torch' >/dev/null 2>&1; then exec "$py" "$@"; fi
done
echo "blip3o: no Python with torch found (set BLIP3O_PYTHON, or apt-get install python3-torch)" >&2
exit 1
