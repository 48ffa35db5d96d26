"""Integration tests: each runs the package the way a user does, through another process or tool -- a subprocess
(the CLI, timm's train.py / validate.py / inference.py), a local Hub server, a built wheel, torch.hub, the ONNX
exporters, torch.compile / torch.export, timm's own model tests. All of them are ``slow``: ``./run.sh test-fast``
(``-m "not slow"``) runs only tests/unit/."""
import pytest


def pytest_collection_modifyitems(config, items):
    here = __file__.rsplit('/', 1)[0]
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.slow)
