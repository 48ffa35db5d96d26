"""What several test files share and is no fixture: the repository's root (tests run from a clone), timm's train.py
where a copy is at hand, a minimal staged Hub folder, an SPE layer with random parameters."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from timm_spe import SpeModule
from timm_spe.hub import sha256_file

ROOT = Path(__file__).resolve().parents[1]


def timm_train_py() -> str:
    """timm's train.py: ``$TIMM_TRAIN_PY``, else the clone ``./run.sh train`` makes in .cache/; the test skips without
    one (train.py is not on PyPI)."""
    for cand in (os.environ.get('TIMM_TRAIN_PY'), ROOT / '.cache' / 'pytorch-image-models' / 'train.py'):
        if cand and Path(cand).is_file():
            return str(cand)
    pytest.skip('timm train.py not available (set TIMM_TRAIN_PY or run ./run.sh train once)')


def minimal_staged_folder(folder: Path, tag='cifar10', weights=None) -> Path:
    """A minimal staged Hub folder (tiny weights, timm config, a card quoting their sha256)."""
    folder.mkdir(parents=True)
    if weights is None:
        save_file({'x': torch.zeros(2)}, str(folder / 'model.safetensors'))
    else:
        (folder / 'model.safetensors').write_bytes(weights.read_bytes())
    (folder / 'config.json').write_text(json.dumps({'architecture': 'resnet83_spe', 'pretrained_cfg': {'tag': tag}}))
    (folder / 'README.md').write_text(f"sha256 {sha256_file(folder / 'model.safetensors')}\n")
    return folder


def random_spe_module(channels=6, formulation='official', seed=0, dtype=None, **kwargs) -> SpeModule:
    """An :class:`SpeModule` (any variant: ``lam``, ``reweight`` in ``kwargs``) with normal random weights and biases
    and ``p`` uniform in [0.2, 1.5] (``lambda`` away from 0 and 1), so that a wrong term or gradient shows."""
    torch.manual_seed(seed)
    m = SpeModule(channels, formulation=formulation, dtype=dtype, **kwargs)
    with torch.no_grad():
        for name, t in m.named_parameters():
            if name != 'p':
                t.normal_()
        if m.p is not None:
            m.p.uniform_(0.2, 1.5)
    return m
