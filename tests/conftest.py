"""Test helpers live next to the tests (e.g. hub_server.py)."""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture()
def make_image_folder(tmp_path):
    """Builds tiny image folders in tmp_path: ``make_image_folder(classes, per_class=2, root=None)`` -> root.

    ``root`` (default ``tmp_path / 'images'``) gets ``<class>/0000.jpg ...``: random 32x32 RGB JPEGs (quality 75,
    as the repo's CIFAR copy), or PNGs with ``ext='.png'``; ``classes`` may hold nested paths ('test/cat').
    """
    def make(classes, per_class=2, root=None, ext='.jpg', size=32, seed=0):
        root = tmp_path / 'images' if root is None else root
        rng = np.random.default_rng(seed)
        for c in classes:
            (root / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
                img.save(root / c / f'{i:04d}{ext}', **({'quality': 75} if ext == '.jpg' else {}))
        return root
    return make
