"""pytest settings for the Python tests."""


def pytest_configure(config):
    # torch 2.x marks TorchScript deprecated on every script/load/freeze call; the bundle format is
    # TorchScript on purpose (shared/DESIGN.md), so the warning says nothing about these tests.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit:DeprecationWarning")
