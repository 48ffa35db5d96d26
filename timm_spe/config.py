""" timm_spe's on/off switches, as timm's ``timm/layers/config.py`` holds timm's (``set_layer_config``, ...)

The one-pass CPU kernels (:mod:`timm_spe.cpu_kernels`): off by default; ``set_cpu_kernels(True)`` (or
``with set_cpu_kernels(True): ...``) switches them on and builds them on first use (:mod:`timm_spe._cpu_build`),
``TIMM_SPE_CPU_KERNELS=1`` in the environment switches them on at ``import timm_spe`` (``run.sh train`` sets it),
``cpu_kernels_enabled()`` tells. Imports only the builder from the package.
"""
import os
import warnings

from ._cpu_build import _load

__all__ = ['set_cpu_kernels', 'cpu_kernels_enabled']

_ENV = 'TIMM_SPE_CPU_KERNELS'
_state = {'enabled': False, 'loaded': False}


class set_cpu_kernels:
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

    def __enter__(self) -> 'set_cpu_kernels':
        return self

    def __exit__(self, *args) -> None:
        _state['enabled'] = self.previous


def cpu_kernels_enabled() -> bool:
    """Whether SPE's passes use the one-pass CPU kernels."""
    return _state['enabled']


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
