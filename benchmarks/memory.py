"""Memory of a train step, per model in a fresh process: the bytes autograd saves for backward and the peak RSS.

:func:`memory` runs ``python -m benchmarks.memory MODEL BATCH`` from the repository root, which prints
:func:`measure`'s JSON.
"""
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_spe
from benchmarks.workloads import create, input_batch, uses_kernels

ROOT = Path(__file__).resolve().parents[1]


def saved_for_backward_mib(model: nn.Module, x: torch.Tensor) -> float:
    """Unique storage bytes autograd holds for backward after one training forward (exact, allocator-independent)."""
    storages: Dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values()) / 2 ** 20


def measure(name: str, batch: int) -> Dict[str, float]:
    """In this process (a fresh one: see :func:`memory`): bytes saved for backward, and the peak RSS of two train
    steps above the RSS with the model and batch already in memory."""
    timm_spe.set_cpu_kernels(uses_kernels(name))
    m = create(name).train()
    x = input_batch(name, batch)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    base = int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    saved = saved_for_backward_mib(m, x)
    return {'saved_for_backward_mib': saved, 'peak_rss_growth_mib': max(peak - base, 0) / 2 ** 20}


def memory(name: str, batch: int) -> Dict[str, float]:
    """In a fresh subprocess: bytes saved for backward, and the peak RSS of two train steps above the RSS
    with the model and batch already in memory (activations, gradients, optimizer state, allocator)."""
    out = subprocess.run([sys.executable, '-m', 'benchmarks.memory', name, str(batch)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == '__main__':
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
