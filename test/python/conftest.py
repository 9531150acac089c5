"""pytest settings for the Python tests, and the `fidelity` fixture of the fidelity checks."""
import json
import os

import pytest


def pytest_configure(config):
    # torch 2.x marks TorchScript deprecated on every script/load/freeze call; the bundle format is
    # TorchScript on purpose (shared/DESIGN.md), so the warning says nothing about these tests.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit:DeprecationWarning")


@pytest.fixture
def fidelity():
    """check(name, value, limit): asserts value <= limit, and with BLIP3O_FIDELITY_OUT set appends
    {"name", "value", "limit", "pass"} to that file as a JSON line (npm run fidelity collects them)."""
    def check(name: str, value: float, limit: float) -> None:
        out = os.environ.get("BLIP3O_FIDELITY_OUT")
        if out:
            with open(out, "a") as f:
                f.write(json.dumps({"name": name, "value": float(value), "limit": float(limit),
                                    "pass": bool(value <= limit)}) + "\n")
        assert value <= limit, f"{name}: {value} > {limit}"
    return check
