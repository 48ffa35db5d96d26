"""Integration tests: each runs the package the way a user does, through another process or tool -- a subprocess
(the CLI, timm's train.py / validate.py / inference.py), a local Hub server, a built wheel, torch.hub, the ONNX
exporters, torch.compile / torch.export, timm's own model tests. All of them are ``slow``: ``./run.sh test-fast``
(``-m "not slow"``) runs only tests/unit/."""
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    # a conftest's collection hook sees every collected test, not only this folder's
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)
