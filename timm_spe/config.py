""" timm_spe's on/off switches, as timm's ``timm/layers/config.py`` holds timm's (``set_layer_config``, ...)

The one-pass CPU kernels (:mod:`timm_spe.cpu_kernels`): off by default; ``set_cpu_kernels(True)`` (or
``with set_cpu_kernels(True): ...``) switches them on and builds them on first use (:mod:`timm_spe._cpu_build`),
``TIMM_SPE_CPU_KERNELS=1`` in the environment switches them on at ``import timm_spe`` (``run.sh train`` sets it),
``cpu_kernels_enabled()`` tells. Imports only the builder from the package.

The Triton kernels of SPE's training passes (:mod:`timm_spe.spe_triton`): by default they run for CUDA tensors where
Triton imports and runs on the GPU, and the stock CUDA ops elsewhere; ``set_triton_kernels(False)`` (also a context
manager) or ``TIMM_SPE_TRITON_KERNELS=0`` at import switches them off, ``set_triton_kernels(True)`` or ``=1`` on
wherever they can take the input (any CUDA GPU; CPU tensors under ``TRITON_INTERPRET=1``), ``set_triton_kernels(None)``
back to the default; ``triton_kernels_enabled()`` tells (None: the default). On an H200, measured switched on, they
were the faster path for training (1.49x the stock CUDA ops' speed in fp32, 1.60x under bf16 autocast:
``benchmarks/README.md``, CUDA).
"""
import importlib
import os
import warnings
from typing import Optional

from ._cpu_build import _load

__all__ = ['set_cpu_kernels', 'cpu_kernels_enabled', 'set_triton_kernels', 'triton_kernels_enabled']

_ENV = 'TIMM_SPE_CPU_KERNELS'
_state = {'enabled': False, 'loaded': False}
_triton_state = {'enabled': None}  # None: the default (CUDA tensors, where Triton runs on the GPU)
_TRITON_ENV = 'TIMM_SPE_TRITON_KERNELS'


class _Switch:
    """A switch that takes effect when made and, as a context manager, restores the setting it replaced on exit."""
    previous: bool

    def _settings(self) -> dict:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        self._settings()['enabled'] = self.previous


class set_cpu_kernels(_Switch):
    """Use (or stop using) the one-pass CPU kernels; builds them on first use.

    Takes effect at once, like timm's ``set_layer_config``; as a context manager it restores the previous setting
    on exit::

        timm_spe.set_cpu_kernels(True)          # from here on
        with timm_spe.set_cpu_kernels(False):   # only inside the block
            ...

    Raises ``RuntimeError`` naming the cause when they cannot be built (the setting is then unchanged).
    ``previous`` holds the setting it replaced.
    """

    def __init__(self, enabled: bool = True):
        self.previous = _state['enabled']
        if enabled and not _state['loaded']:
            _load()
            _state['loaded'] = True
        _state['enabled'] = bool(enabled)

    def _settings(self) -> dict:
        return _state


def cpu_kernels_enabled() -> bool:
    """Whether SPE's passes use the one-pass CPU kernels."""
    return _state['enabled']


class set_triton_kernels(_Switch):
    """Run SPE's training passes on their Triton kernels (``True``: wherever they take the input, any CUDA GPU and,
    under ``TRITON_INTERPRET=1``, CPU tensors), on the stock ops (``False``), or as by default (``None``: CUDA tensors
    where Triton imports and runs on the GPU, checked once per device). Like :class:`set_cpu_kernels`, also a context
    manager. ``True`` raises ``RuntimeError`` when Triton cannot be imported (the setting is then unchanged)."""

    def __init__(self, enabled: Optional[bool] = True):
        self.previous = _triton_state['enabled']
        if enabled is not None:
            enabled = bool(enabled)
        if enabled:
            try:
                import triton  # noqa: F401
            except ImportError as e:
                raise RuntimeError(
                    f"the Triton kernels need the triton package ({e}); install it (PyTorch's CUDA wheels bring it) "
                    "or leave them off.") from None
            # define the kernels and register their ops now, outside any torch.compile'd region (which calls them
            # as torch.ops.timm_spe.*)
            importlib.import_module('timm_spe._triton_ops')
        _triton_state['enabled'] = enabled

    def _settings(self) -> dict:
        return _triton_state


def triton_kernels_enabled() -> Optional[bool]:
    """The Triton kernels' setting: ``True`` (switched on), ``False`` (switched off) or ``None`` (the default: CUDA
    tensors take them where Triton runs on the GPU)."""
    return _triton_state['enabled']


def _switch_from_env(name: str, switch, what: str, default: str) -> None:
    value = os.environ.get(name, '').strip().lower()
    if value == '':
        return
    if value in ('0', 'false', 'no', 'off'):
        switch(False)
        return
    if value not in ('1', 'true', 'yes', 'on'):
        warnings.warn(f'{name}={value!r} is not understood (use 1 or 0); the {what} {default}.', stacklevel=4)
        return
    try:
        switch(True)
    except RuntimeError as e:
        warnings.warn(f'{name}=1 but {e}', stacklevel=4)


def _from_env() -> None:
    _switch_from_env(_ENV, set_cpu_kernels, 'CPU kernels', 'stay off')
    _switch_from_env(_TRITON_ENV, set_triton_kernels, 'Triton kernels',
                     'keep their default (CUDA tensors, where Triton runs on the GPU)')


_from_env()
