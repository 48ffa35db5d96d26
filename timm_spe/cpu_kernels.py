""" Optional one-pass CPU kernels for SPE's passes over a block output

PyTorch's CPU ops read a block output once for ``amax`` and again for ``amin`` and find the argmax / argmin
element by element; the block tail and BN's input gradient take two passes each. ``csrc/spe_cpu.cpp`` does
each in one vectorised pass: ``torch.ops.timm_spe.max_min``, ``max_min_with_indices``, ``scale_add_relu_``,
``bn_input_grad_`` and ``channels_last_per_map_sums``, with fake (meta) implementations, so ``torch.compile``
and ``torch.export`` trace them. They are compiled on first use with ``torch.utils.cpp_extension`` (a C++
compiler and ninja are needed; the build takes ~10 s here, once, and is cached by PyTorch, per CPU model since it
is compiled with ``-march=native``).

Off by default: switch on with ``timm_spe.set_cpu_kernels(True)`` or ``TIMM_SPE_CPU_KERNELS=1`` in the
environment (``run.sh train`` sets it; the benchmark measures both). Only CPU float32 / float64 tensors in
NCHW or channels_last use the kernels; anything else (CUDA, bfloat16, other strides) runs the eager ops.
Results are those of the eager ops bit for bit (values, first-extremum indices, NaN as ``max(dim)``, the
rounding of ``addcmul``), except channels_last backward sums, which take the more precise ``(c - mean)`` form.
"""
import hashlib
import logging
import os
import platform
import warnings
from pathlib import Path

import torch

__all__ = ['set_cpu_kernels', 'cpu_kernels_enabled', 'kernels_apply', 'kernels_apply_per_map']

_SOURCE = Path(__file__).parent / 'csrc' / 'spe_cpu.cpp'
_ENV = 'TIMM_SPE_CPU_KERNELS'
_state = {'enabled': False, 'loaded': False}


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
    """Compile (or take from PyTorch's extension cache) and register the ops; raises with the cause."""
    if _state['loaded']:
        return
    cpp_log = logging.getLogger('torch.utils.cpp_extension')
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)  # its import warns that no CUDA runtime is found: irrelevant to a CPU build
    try:
        from torch.utils.cpp_extension import load
    finally:
        cpp_log.setLevel(level)
    try:
        load(name=f'timm_spe_cpu_{_cpu_signature()}', sources=[str(_SOURCE)],
             extra_cflags=['-O3', '-march=native', '-ffp-contract=off', '-fopenmp'], extra_ldflags=['-fopenmp'],
             is_python_module=False, verbose=False)
    except Exception as e:  # compiler or ninja missing, build error
        raise RuntimeError(
            f'timm_spe could not build its CPU kernels ({type(e).__name__}: {e}). They need a C++ compiler '
            f'(g++/clang++) and ninja (pip install ninja); without them leave the kernels off '
            f'(set_cpu_kernels(False), or unset {_ENV}) and the eager ops are used.') from e

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
    def _(grad, x, mean):
        n, c = x.shape[0], x.shape[1]
        return x.new_empty((n, c)), x.new_empty((n, c))

    @torch.library.register_fake('timm_spe::bn_input_grad_')
    def _(out, grad, x, gs, k0, k1):
        return None

    _state['loaded'] = True


def set_cpu_kernels(enabled: bool = True) -> bool:
    """Use (or stop using) the one-pass CPU kernels for SPE's pooling; builds them on first use.

    Raises ``RuntimeError`` naming the cause when they cannot be built. Returns the previous setting.
    """
    previous = _state['enabled']
    if enabled:
        _load()
    _state['enabled'] = bool(enabled)
    return previous


def cpu_kernels_enabled() -> bool:
    """Whether SPE's pooling uses the one-pass CPU kernels."""
    return _state['enabled']


def kernels_apply(x: torch.Tensor) -> bool:
    """The kernels are on and take ``x``: a non-empty 4-D CPU float32/float64 tensor, NCHW or channels_last."""
    return (
        _state['enabled'] and x.device.type == 'cpu' and x.dtype in (torch.float32, torch.float64)
        and x.ndim == 4 and x.numel() > 0
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
    )


def kernels_apply_per_map(x: torch.Tensor, like_x: torch.Tensor, per_map: torch.Tensor) -> bool:
    """The elementwise kernels (block tail, BN's input gradient) take ``x`` (:func:`kernels_apply`), ``like_x`` laid
    out as ``x`` and a contiguous ``per_map`` tensor of N x C (x 1 x 1) values, all of one dtype."""
    return (
        kernels_apply(x) and like_x.device == x.device and like_x.dtype == x.dtype
        and like_x.shape == x.shape and like_x.stride() == x.stride()
        and per_map.device == x.device and per_map.dtype == x.dtype and per_map.is_contiguous()
        and per_map.numel() == x.shape[0] * x.shape[1]
    )


def _from_env() -> None:
    value = os.environ.get(_ENV, '').strip().lower()
    if value in ('', '0', 'false', 'no', 'off'):
        return
    if value not in ('1', 'true', 'yes', 'on'):
        warnings.warn(f'{_ENV}={value!r} is not understood (use 1 or 0); the CPU kernels stay off.', stacklevel=2)
        return
    try:
        set_cpu_kernels(True)
    except RuntimeError as e:
        warnings.warn(f'{_ENV}=1 but {e}', stacklevel=2)


_from_env()
