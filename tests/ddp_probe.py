"""Runs a training script (timm's train.py, examples/train_ddp.py) as ``__main__`` in one torchrun rank and records
what this rank's DistributedDataParallel wrapper held, for the torchrun tests (integration/test_torchrun.py):

- ``rank<R>-wrapped.safetensors``: the module's state when DDP wrapped it (after any resume, before DDP's broadcast
  from rank 0), ``rank<R>-end.safetensors``: its state when the process exits;
- ``rank<R>.json``: the SPE layers' penalty state when wrapped (``auto_penalty``, ``eta`` of each layer).

Files go to ``$DDP_PROBE_DIR``. Usage: ``python -m torch.distributed.run --nproc_per_node=2 tests/ddp_probe.py
SCRIPT [ARGS]``.

One change to what it runs: timm's train.py (v1.0.28, and its main branch as of 2026-12) wraps the model with
``DistributedDataParallel(model, device_ids=[device])`` also where the device is the CPU, which DDP refuses ("device_ids
... only work with single-device/multiple-device GPU modules or CPU modules"); on GPUs it is what DDP wants. For a CPU
module this probe passes ``device_ids=None`` instead, as DDP requires; nothing else differs from a GPU launch.
"""
import atexit
import json
import os
import runpy
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

OUT = Path(os.environ['DDP_PROBE_DIR'])
RANK = int(os.environ['RANK'])
_wrapped = []


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def _penalty_state(module: torch.nn.Module) -> dict:
    from timm_spe import SpeModule
    return {name: {'auto_penalty': m.auto_penalty, 'eta': m.eta} for name, m in module.named_modules()
            if isinstance(m, SpeModule) and m.p is not None}


_ddp_init = DistributedDataParallel.__init__


def _init(self, module, device_ids=None, *args, **kwargs):
    save_file(_state(module), str(OUT / f'rank{RANK}-wrapped.safetensors'))
    (OUT / f'rank{RANK}.json').write_text(json.dumps({'penalty': _penalty_state(module)}))
    _wrapped.append(module)
    if device_ids is not None and all(torch.device(d).type == 'cpu' for d in device_ids):
        device_ids = None  # timm train.py on the CPU: see the module docstring
    _ddp_init(self, module, device_ids, *args, **kwargs)


@atexit.register
def _at_exit():
    if _wrapped:
        save_file(_state(_wrapped[-1]), str(OUT / f'rank{RANK}-end.safetensors'))


DistributedDataParallel.__init__ = _init
sys.argv = sys.argv[1:]
sys.path.insert(0, str(Path(sys.argv[0]).resolve().parent))
runpy.run_path(sys.argv[0], run_name='__main__')
