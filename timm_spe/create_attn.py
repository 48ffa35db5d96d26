""" Attention factory hook: makes ``attn_layer='spe'`` (and ``'srm'``, ``'sge'``) work across timm

timm resolves attention layers by name in ``timm.layers.create_attn.get_attn`` (an if/elif chain
with no registry). After ``import timm_spe`` the names below resolve to :class:`SpeModule` and to the
paper's baselines timm lacks, :class:`~timm_spe.srm.SrmModule` and :class:`~timm_spe.sge.SgeModule`;
every other name is handed to timm's own ``get_attn`` unchanged.
"""
import importlib
import sys
from functools import partial
from typing import Any, Callable, Dict

import timm.layers

from .sge import SgeModule
from .spe import SpeModule
from .srm import SrmModule

# ``timm.layers.create_attn`` the attribute is the function; the module must be looked up by name
timm_create_attn = importlib.import_module('timm.layers.create_attn')

__all__ = ['SPE_ATTN_LAYERS', 'get_attn', 'register_attn_layers']

SPE_ATTN_LAYERS: Dict[str, Callable[..., Any]] = {
    'spe': SpeModule,
    'spe_paper': partial(SpeModule, formulation='paper'),
    'srm': SrmModule,  # baselines of the SPE paper's Table 1 that timm does not have
    'sge': SgeModule,
}

_timm_get_attn = getattr(timm_create_attn.get_attn, '_timm_get_attn', timm_create_attn.get_attn)


def get_attn(attn_type: Any) -> Any:
    """timm's ``get_attn``, plus the names in :data:`SPE_ATTN_LAYERS` (SPE, SRM, SGE)."""
    if isinstance(attn_type, str) and attn_type.lower() in SPE_ATTN_LAYERS:
        return SPE_ATTN_LAYERS[attn_type.lower()]
    return _timm_get_attn(attn_type)


get_attn._timm_get_attn = _timm_get_attn


def register_attn_layers() -> None:
    """Install :func:`get_attn` wherever timm bound its own (``create_attn`` and ``from ... import get_attn``)."""
    for name, module in list(sys.modules.items()):
        if (name == 'timm' or name.startswith('timm.')) and getattr(module, 'get_attn', None) is _timm_get_attn:
            module.get_attn = get_attn
    timm_create_attn.get_attn = get_attn
    timm.layers.get_attn = get_attn
