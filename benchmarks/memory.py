"""Memory of a train step, per model in a fresh process: the bytes autograd saves for backward and the peak RSS.

:func:`memory_of_models` measures each model in a child forked from a preloaded server;
``python -m benchmarks.memory MODEL BATCH`` (from the repository root) prints one model's :func:`measure` as JSON.
"""
import json
import multiprocessing
import resource
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import timm_spe
from benchmarks.workloads import create, input_batch, uses_kernels


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


def memory_of_models(names: List[str], batch: int, desc: str = 'models (memory, subprocesses)'
                     ) -> Dict[str, Dict[str, float]]:
    """:func:`measure` of each model (bytes saved for backward, peak RSS of two train steps above the RSS with the
    model and batch already in memory: activations, gradients, optimizer state, allocator), each in its own fresh
    child process, one at a time. The children are forked from
    a server process that imported torch, timm and timm_spe once and ran nothing: each starts in a fraction of a
    second instead of ~7 s of imports, with no tensor, thread pool or allocator state of another model. Its RSS
    growth also counts the pages of the preloaded modules that the train steps touch (copied on write), which a fresh
    interpreter holds privately from the start: at batch 8, +53 MiB for resnet164 and +13 MiB for resnet164_spe over
    ``python -m benchmarks.memory`` in a fresh process (2026-12-02); small against the ~3.7 GiB of batch 128."""
    ctx = multiprocessing.get_context('forkserver')
    ctx.set_forkserver_preload(['benchmarks.memory'])
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1) as pool:
        results = tqdm(pool.map(measure, names, [batch] * len(names)), total=len(names), desc=desc)
        return dict(zip(names, results))


if __name__ == '__main__':
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
