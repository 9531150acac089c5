"""Import a released BLIP3-o checkpoint (BLIP3o/BLIP3o-Model-4B or -8B, as downloaded) into a bundle.

    bash models/run-python.sh -m models.importer CHECKPOINT_DIR --out BUNDLE_DIR [--dtype bfloat16|float16|float32]
        [--name NAME] [--json]

--json: one JSON object per line on stdout ({"event": "progress", ...}, then {"event": "done", ...} or
{"event": "error", "message": ...}); otherwise progress on stderr and a summary on stdout. Exit status 1
for a checkpoint that cannot be imported (one line saying why), 2 for bad arguments.
"""
import argparse
import json
import os
import signal
import sys
from pathlib import Path

from .checkpoint import import_checkpoint
from .shards import CheckpointError


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m models.importer", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="the checkpoint directory (config.json, safetensors, tokenizer, diffusion-decoder/)")
    ap.add_argument("--out", required=True, type=Path, help="bundle directory to write (must not exist)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--name", help="the bundle's name (default blip3o-<checkpoint directory name>)")
    ap.add_argument("--json", action="store_true", help="JSON lines on stdout")
    a = ap.parse_args()
    # a terminated import unwinds, so that the bundle's temporary directory is removed (models/export.py)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def emit(event: dict) -> None:
        if a.json:
            print(json.dumps(event), flush=True)
        elif event.get("event") == "progress":
            what = event.get("stage")
            if "tensors" in event:
                print(f"import: {what} {event['tensors']}/{event['total']} tensors", file=sys.stderr, flush=True)
            elif event.get("written"):
                print(f"import: {what} written", file=sys.stderr, flush=True)
            else:
                print(f"import: checking {a.checkpoint}", file=sys.stderr, flush=True)

    try:
        result = import_checkpoint(a.checkpoint, a.out, a.dtype, a.name, lambda e: emit({"event": "progress", **e}))
    except CheckpointError as e:
        if a.json:
            emit({"event": "error", "message": str(e)})
        else:
            print(f"import: {e}", file=sys.stderr)
        return 1
    if a.json:
        emit({"event": "done", **result})
    else:
        own = result["peakAnonymousBytes"]
        print(f"wrote {result['bundle']} ({result['bundleBytes'] / 1e6:.1f} MB) from {result['checkpointBytes'] / 1e6:.1f} MB "
              f"of checkpoint in {result['seconds']:.1f} s; peak memory {result['peakRssBytes'] / 1e6:.0f} MB resident"
              + ("" if own is None else f", {own / 1e6:.0f} MB of it its own (the rest: the checkpoint's mapped files)"))
    return 0


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":  # byte-identical TorchScript files (see models/export.py)
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "models.importer"] + sys.argv[1:])
    sys.exit(main())
