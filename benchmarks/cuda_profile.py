"""CUDA profile of SPE's train step: where the eager step's host time goes, and whether the compiled step traces whole.

1. Host microseconds per call of one Triton launch (``_dot_kernel``), of the custom op around it, of its Python body
   (the launch function eager code now calls directly, ``timm_spe._triton_ops.direct``).
2. ``torch.profiler`` over three eager train steps (batch 128, channels_last, fp32) of resnet164, resnet164_spe on the
   Triton kernels and on the stock ops: per-step wall time unprofiled, self CPU / CUDA time, the top ops.
3. A depth-20 resnet164_spe ``torch.compile``d (inductor), stock ops then Triton: six steps with Dynamo's graph-break
   and recompile logs and counters.

Run on a machine with a GPU: ``python benchmarks/cuda_profile.py`` (about 3 minutes on an H200, most of it part 3's
compilation); it prints as it goes. ``benchmarks/results/cuda_profile_h200.log`` is its output on an H200 (torch 2.11,
triton 3.6, 2026-12-04; committed in 42ed9dd, run before that commit's ``out=`` fix of the stock path under
torch.compile). That run summed self CUDA time over every row, which counts each kernel twice (under its op and
itself): its ``== ...`` lines' self CUDA figures are about 2x; the tables' footers (``Self CUDA time total``, three
steps) are right, and this script now sums as they do.
"""
import time

import timm
import torch
import torch.nn as nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import timm_spe

cuda = torch.device('cuda')

def model_step(name, triton, depth=None, compiled=False, batch=128):
    torch.manual_seed(0)
    kw = dict(num_classes=10) if depth is None else dict(num_classes=10, depth=depth)
    m = timm.create_model(name, **kw).to(cuda).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=cuda).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=cuda)
    run = torch.compile(m) if compiled else m
    def step():
        with timm_spe.set_triton_kernels(triton):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(run(x), y)
            loss.backward()
            opt.step()
    return step

# 1. host time per launch: a Triton launch, the custom op around it, the autograd function
with timm_spe.set_triton_kernels(True):
    ops = torch.ops.timm_spe
    from timm_spe import _triton_ops as T
    g = torch.randn(128, 256, 32, 32, device=cuda).to(memory_format=torch.channels_last)
    xx = torch.randn_like(g)
    n_, c_, hw_, nc_, sn_, sc_, shw_, grid_, bc_, bh_ = T.geometry(xx)
    o_ = torch.empty((n_, c_), device=cuda)
    for f, label in ((lambda: T._dot_kernel[grid_](g, xx, o_, c_, hw_, sn_, sc_, shw_, sn_, sc_, shw_,
                                                   BLOCK_C=bc_, BLOCK_HW=bh_), 'bare triton launch _dot_kernel'),
                     (lambda: ops.map_dot(g, xx), 'custom op map_dot'),
                     (lambda: T.map_dot._opoverload(g, xx), 'opoverload'),
                     # the launch function the custom op wraps, which eager code calls directly
                     (lambda: T.direct.map_dot(g, xx), 'python impl'),
                     (lambda: torch.empty((128, 256), device=cuda), 'torch.empty (N, C)')):
        try:
            for _ in range(20): f()
            torch.cuda.synchronize(); t = time.perf_counter()
            for _ in range(200): f()
            host = (time.perf_counter() - t) / 200 * 1e6
            torch.cuda.synchronize(); tot = (time.perf_counter() - t) / 200 * 1e6
            print(f'{label}: host {host:.1f} us per call, with the GPU {tot:.1f} us', flush=True)
        except Exception as e:
            print(label, 'failed', type(e).__name__, e, flush=True)

# 2. profiles of three eager steps: plain, SPE on Triton
for name, triton in (('resnet164', False), ('resnet164_spe', True), ('resnet164_spe', False)):
    step = model_step(name, triton)
    for _ in range(3): step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5): step()
    torch.cuda.synchronize(); wall = (time.perf_counter() - t) / 5 * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3): step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    cpu = sum(e.self_cpu_time_total for e in ka) / 3e3
    # the GPU's own events only: an op's row also carries its kernels' device time (the table footer counts so too)
    dev = sum(e.self_device_time_total for e in ka if e.device_type == DeviceType.CUDA) / 3e3
    print(f'\n== {name} triton={triton}: {wall:.1f} ms per step unprofiled; profiled self CPU {cpu:.1f} ms, '
          f'self CUDA {dev:.1f} ms per step', flush=True)
    print(ka.table(sort_by='self_cpu_time_total', row_limit=22, max_name_column_width=60), flush=True)
    print(ka.table(sort_by='self_device_time_total', row_limit=10, max_name_column_width=60), flush=True)

# 3. compiled, depth 20: graph breaks and recompiles
torch._logging.set_logs(graph_breaks=True, recompiles=True)
import torch._dynamo

for triton in (False, True):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = model_step('resnet164_spe', triton, depth=20, compiled=True)
    for i in range(6):
        t = time.perf_counter(); step(); torch.cuda.synchronize()
        print(f'compiled depth 20 triton={triton} step {i}: {time.perf_counter() - t:.2f} s', flush=True)
    c = torch._dynamo.utils.counters
    print('graph breaks:', dict(c['graph_break']), '\nstats:', dict(c['stats']), flush=True)
