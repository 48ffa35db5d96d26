""" Checks the layers share: timm's generic attention kwargs, and where a fused path may run (hooks, FX tracing)

Imported by the attention layers (:mod:`timm_spe.spe`, :mod:`timm_spe.srm`, :mod:`timm_spe.sge`) and the SPE block
(:mod:`timm_spe.resnet`); imports nothing from the package.
"""
from torch import nn as nn
from torch.fx import _symbolic_trace as _fx_trace

__all__ = ['check_timm_attn_kwargs', 'has_module_hooks', 'is_fx_symbolic_tracing']

# kwargs timm models pass to attention layers in general (e.g. cspnet: act_layer; efficientnet: rd_ratio)
_IGNORED_TIMM_ATTN_KWARGS = frozenset(
    {'act_layer', 'gate_layer', 'norm_layer', 'rd_ratio', 'rd_channels', 'rd_divisor', 'round_chs_fn'})


def check_timm_attn_kwargs(layer: str, accepted: str, timm_attn_kwargs: dict) -> None:
    """Refuse arguments that neither the attention ``layer`` nor timm's generic attention kwargs name (one line)."""
    unknown = set(timm_attn_kwargs) - _IGNORED_TIMM_ATTN_KWARGS
    if unknown:
        raise TypeError(f'{layer} got unexpected arguments {sorted(unknown)}; it accepts {accepted} and (ignored) '
                        f'timm attention kwargs {sorted(_IGNORED_TIMM_ATTN_KWARGS)}.')


# is_fx_symbolic_tracing(): whether torch.fx.symbolic_trace (FX feature extraction) is tracing; False under
# torch.export and torch.compile, which keep the fused paths. Resolved once here, since every training block's forward
# asks. (A torch without is_fx_symbolic_tracing has only is_fx_tracing.)
is_fx_symbolic_tracing = getattr(_fx_trace, 'is_fx_symbolic_tracing', _fx_trace.is_fx_tracing)


def has_module_hooks(*modules: nn.Module) -> bool:
    """Whether any forward (pre-)hook or backward (pre-)hook, global or on one of ``modules``, would fire on a
    call of these modules: a fused path that skips their calls may only run where this is False."""
    from torch.nn.modules import module as nn_module
    if (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
            or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks):
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in modules)
