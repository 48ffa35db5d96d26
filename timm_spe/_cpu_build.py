""" Building the optional one-pass CPU kernels: ``csrc/*.cpp`` compiled and their ops registered

:func:`_load` compiles the source with ``torch.utils.cpp_extension`` (a C++ compiler and ninja are needed; PyTorch
caches the build, per CPU model since it is built with ``-march=native``: :func:`_cpu_signature`) and registers the
fake (meta) implementations that let ``torch.compile`` and ``torch.export`` trace the ops. Called by
:class:`timm_spe.config.set_cpu_kernels` on first enable; the switch is in :mod:`timm_spe.config`, the dispatch to the
ops in :mod:`timm_spe.cpu_kernels`. Imports nothing from the package.
"""
import hashlib
import logging
import platform
from pathlib import Path

import torch

_CSRC = Path(__file__).parent / 'csrc'
_SOURCES = [_CSRC / name for name in ('spe_cpu.cpp', 'max_min.cpp', 'passes.cpp', 'gate.cpp')]


def _source_signature() -> str:
    """Short hash of every file in ``csrc/``, the shared header included: part of the build's name, so that a changed
    header rebuilds too (PyTorch's cache watches only the listed sources)."""
    digest = hashlib.sha1()
    for path in sorted(p for p in _CSRC.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b'\0' + path.read_bytes())
    return digest.hexdigest()[:8]


def _cpu_signature(cpuinfo: str = '/proc/cpuinfo') -> str:
    """Short hash of this CPU's feature flags: the build (``-march=native``) is cached per CPU model, so a cache
    shared between machines (e.g. a network home) never hands one CPU's binary to another."""
    try:
        with open(cpuinfo) as f:
            flags = next((line for line in f if line.startswith(('flags', 'Features'))), '')
    except OSError:
        flags = ''
    flags = flags or f'{platform.machine()} {platform.processor()}'
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _load() -> None:
    """Compile (or take from PyTorch's extension cache) and register the ops; raises with the cause. Once per process:
    the caller (:class:`timm_spe.config.set_cpu_kernels`) records that it succeeded."""
    cpp_log = logging.getLogger('torch.utils.cpp_extension')
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)  # its import warns that no CUDA runtime is found: irrelevant to a CPU build
    try:
        from torch.utils.cpp_extension import load
    finally:
        cpp_log.setLevel(level)
    try:
        load(name=f'timm_spe_cpu_{_cpu_signature()}_{_source_signature()}', sources=[str(p) for p in _SOURCES],
             extra_cflags=['-O3', '-march=native', '-ffp-contract=off', '-fopenmp'], extra_ldflags=['-fopenmp'],
             is_python_module=False, verbose=False)
    except Exception as e:  # compiler or ninja missing, build error
        raise RuntimeError(
            f'timm_spe could not build its CPU kernels ({type(e).__name__}: {e}). They need a C++ compiler '
            f'(g++/clang++) and ninja (pip install ninja); without them leave the kernels off '
            f'(set_cpu_kernels(False), or unset TIMM_SPE_CPU_KERNELS) and the eager ops are used.') from e

    # fake (meta) implementations, argument names as in the C++ schemas
    @torch.library.register_fake('timm_spe::max_min')
    def _(x):
        n, c = x.shape[0], x.shape[1]
        return x.new_empty((n, c)), x.new_empty((n, c))

    @torch.library.register_fake('timm_spe::max_min_with_indices')
    def _(x):
        n, c = x.shape[0], x.shape[1]
        return x.new_empty((n, c)), x.new_empty((n, c), dtype=torch.long), \
            x.new_empty((n, c)), x.new_empty((n, c), dtype=torch.long)

    @torch.library.register_fake('timm_spe::scale_add_relu_')
    def _(x, shortcut, gate):
        return None

    @torch.library.register_fake('timm_spe::channels_last_per_map_sums')
    def _(grad, x, mean, i_max, i_min):
        n, c = x.shape[0], x.shape[1]
        return tuple(x.new_empty((n, c)) for _ in range(4))

    @torch.library.register_fake('timm_spe::bn_input_grad_')
    def _(out, grad, x, grad_scale, shift, x_coef, i_max, v_max, i_min, v_min):
        return None

    @torch.library.register_fake('timm_spe::take_at')
    def _(x, index):
        return x.new_empty((x.shape[0], x.shape[1]))

    @torch.library.register_fake('timm_spe::scatter_add_at_')
    def _(t, index, values):
        return None

    @torch.library.register_fake('timm_spe::spe_gate')
    def _(f_max, f_min, lam, w_exc, b_exc, w_rew, b_rew, paper):
        return f_max.new_empty(f_max.shape)

    @torch.library.register_fake('timm_spe::mix_weights')
    def _(p):
        return p.new_empty((2,))

    @torch.library.register_fake('timm_spe::spe_gate_of')
    def _(x, p, w_exc, b_exc, w_rew, b_rew, paper):
        return x.new_empty((x.shape[0], x.shape[1]))

    @torch.library.register_fake('timm_spe::spe_add_relu_')
    def _(x, shortcut, p, w_exc, b_exc, w_rew, b_rew, paper):
        return None

    @torch.library.register_fake('timm_spe::block_backward_coefficients')
    def _(sum_grad, sum_grad_xhat, x_max, x_min, f_max, f_min, gate, mean, invstd, bn_weight, bn_bias, lam,
          w_exc, b_exc, w_rew, b_rew, paper, count):
        per_map = [sum_grad.new_empty(sum_grad.shape) for _ in range(3)]
        per_channel = [mean.new_empty(mean.shape) for _ in range(8)]
        return [per_map[0], per_channel[0], per_channel[1], per_map[1], per_map[2], *per_channel[2:4],
                lam.new_empty((2,)), *per_channel[4:]]
