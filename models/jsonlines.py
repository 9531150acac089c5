"""The serve loop of the project's long-lived Python processes (bench/reference.py, models/shapes.py):
one JSON request per line on stdin, one JSON answer per line on stdout, {"error": "..."} for a request
that failed, so that the caller can report it and go on."""
import json
import sys
from typing import Callable


def serve(answer: Callable[[dict], dict]) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            res = answer(json.loads(line))
        except Exception as err:  # answered, not raised: the process serves the next request
            res = {"error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()
