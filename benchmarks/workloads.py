"""The benchmark's models (its rows), their eval forward and train step as timed workloads, and their FLOPs
against this machine's GEMM peak."""
from typing import Callable, Dict, List, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import timm_spe

# the authors' formulation, unfused: the tests' reference, so both time and check one thing
from benchmarks.spe_reference import UnfusedSpeReference
from benchmarks.timing import timed, timed_interleaved

CHANNELS_LAST = ' (channels_last)'  # suffix: model and batch in channels_last, as the train recipes run them
KERNELS = ' +cpu_kernels'  # before CHANNELS_LAST: with timm_spe's one-pass CPU kernels on
MODELS = ('resnet164', 'resnet164_spe', 'resnet164_spe' + KERNELS, 'resnet164_se', 'resnet164_eca',
          'resnet164_spe_unfused', 'resnet164' + CHANNELS_LAST, 'resnet164_spe' + CHANNELS_LAST,
          'resnet164_spe' + KERNELS + CHANNELS_LAST)


def memory_format(name: str) -> torch.memory_format:
    return torch.channels_last if name.endswith(CHANNELS_LAST) else torch.contiguous_format


def baseline(name: str) -> str:
    """The resnet164 entry a model's ratios are taken against (same memory format)."""
    return 'resnet164' + CHANNELS_LAST if name.endswith(CHANNELS_LAST) else 'resnet164'


def uses_kernels(name: str) -> bool:
    return KERNELS in name


def arch(name: str) -> str:
    """The timm model (or ``resnet164_spe_unfused``) of a row, without its layout and kernel suffixes."""
    return name.removesuffix(CHANNELS_LAST).removesuffix(KERNELS)


def model_names(cpu_kernels: bool = True) -> List[str]:
    return [n for n in MODELS if cpu_kernels or not uses_kernels(n)]


def create(name: str) -> nn.Module:
    if arch(name) == 'resnet164_spe_unfused':
        model = timm.create_model('resnet164', attn_layer=UnfusedSpeReference)
    else:
        model = timm.create_model(arch(name))
    return model.to(memory_format=memory_format(name))


def input_batch(name: str, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32).contiguous(memory_format=memory_format(name))


def model_workloads(name: str, batch: int, compiled: bool = False, autocast: Optional[torch.dtype] = None
                    ) -> Dict[str, Callable[[], None]]:
    """``{'eval_forward': fn, 'train_step': fn}`` for one model on a fixed random batch (optionally the model
    wrapped in ``torch.compile``, default inductor backend; the first calls compile). ``autocast``: the forward
    passes under CPU autocast to that dtype (bfloat16 / float16), as ``train.py --amp`` runs them."""
    torch.manual_seed(0)
    module = create(name)
    model = torch.compile(module) if compiled else module
    x = input_batch(name, batch)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)

    kernels = uses_kernels(name)

    amp = dict(device_type='cpu', dtype=autocast or torch.bfloat16, enabled=autocast is not None)

    def eval_forward():
        timm_spe.set_cpu_kernels(kernels)
        model.eval()
        with torch.no_grad(), torch.autocast(**amp):
            model(x)

    def train_step():
        timm_spe.set_cpu_kernels(kernels)
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(**amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return {'eval_forward': eval_forward, 'train_step': train_step}


def bench_models(names: List[str], batch: int, warmup: int, repeats: int, autocast: Optional[torch.dtype] = None
                 ) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Time every model, interleaved (see :func:`~benchmarks.timing.timed_interleaved`) instead of whichever runs
    first getting a different machine."""
    work = {name: model_workloads(name, batch, autocast=autocast) for name in names}
    results: Dict[str, Dict[str, Dict[str, float]]] = {name: {} for name in names}
    for kind in tqdm(('eval_forward', 'train_step'), desc='models'):
        for name, t in timed_interleaved({name: work[name][kind] for name in names}, warmup, repeats).items():
            results[name][kind] = t
    return results


def gemm_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    """This machine's single-precision GEMM rate now: ``size``^2 ``torch.mm``, best of ``repeats`` after one
    warm-up (the ceiling a conv-heavy step can approach; measured in the same run as the steps it scales)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def step_gflop(name: str, batch: int) -> Dict[str, float]:
    """FLOPs (GFLOP) of one eval forward and one train step (forward + backward) of a model, counted by
    ``torch.utils.flop_counter`` (convolutions and matmuls: what the GEMM peak bounds)."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model, x = create(name), input_batch(name, batch)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    eval_flop = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        model.train()(x).sum().backward()
    return {'eval_forward': eval_flop / 1e9, 'train_step': counter.get_total_flops() / 1e9}


def efficiency(models: Dict[str, Dict[str, Dict[str, float]]], gflop: Dict[str, Dict[str, float]],
               peak_gflops: float) -> Dict[str, Dict[str, float]]:
    """Per model and workload: the median step's achieved GFLOP/s as a fraction of the GEMM peak."""
    out = {}
    for name, r in models.items():
        if arch(name) in gflop:
            out[name] = {k: gflop[arch(name)][k] / (r[k]['median_ms'] / 1e3) / peak_gflops
                         for k in ('eval_forward', 'train_step')}
    return out
