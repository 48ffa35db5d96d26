"""Shared fixtures; test helpers live next to the tests (hub_server.py, spe_reference.py, compile_check.py)."""
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


@pytest.fixture()
def cpu_kernels_on():
    """timm_spe's CPU kernels switched on for one test (built on first use), the previous setting back after."""
    import timm_spe
    with timm_spe.set_cpu_kernels(True):
        yield


@pytest.fixture()
def random_spe():
    """``random_spe(channels=6, formulation='official', seed=0, **kwargs)``: a default-variant SpeModule with random
    parameters (``lambda`` away from 0 and 1), so that a wrong term or gradient shows."""
    import torch

    from timm_spe import SpeModule

    def make(channels=6, formulation='official', seed=0, **kwargs):
        torch.manual_seed(seed)
        m = SpeModule(channels, formulation=formulation, **kwargs)
        with torch.no_grad():
            for t in (m.w_exc, m.b_exc, m.w_rew, m.b_rew):
                t.normal_()
            m.p.uniform_(0.2, 1.5)
        return m
    return make
