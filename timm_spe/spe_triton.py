""" SPE in training on Triton kernels, for CUDA: the block tail ``relu(spe(bn(x)) + shortcut)`` and the layer alone

:class:`~timm_spe.spe_me._BatchNormSpeAddReLU` in stock ops issues ~150 ATen ops per block beyond the plain block's,
mostly N x C gate math that is one kernel launch each on a GPU. The function here computes the same values with one
kernel per pass (:mod:`timm_spe._triton_kernels`): forward = BN + one kernel (pools, gate, Eq. 3, scale, add, ReLU),
backward = three kernels (ReLU's backward with the per-map sums, the gate's backward, BN's input gradient with ``p``'s
gradient and the Eq. 8 penalty's), where the plain block runs BN, add and ReLU forward and BN's and ReLU's backward.
It takes ``p`` and the layer's penalty switch instead of ``(lambda, 1 - lambda)``: Eq. 3 and the penalty are inside.
The SPE layer alone (``x * gate``: :class:`~timm_spe.spe_me._SpeScale`, in timm's ResNets with ``attn_layer='spe'``)
likewise: one kernel forward, three backward.

The default for CUDA tensors where Triton imports and runs on the GPU (compute capability 8.0 or newer; checked once
per device by compiling and launching one small kernel, with a one-line warning where that fails); switched off by
``timm_spe.set_triton_kernels(False)`` or ``TIMM_SPE_TRITON_KERNELS=0`` (:mod:`timm_spe.config`). CPU tensors only
when switched on explicitly under ``TRITON_INTERPRET=1`` (how the tests run it). Where :func:`applies` says no, the
stock-op function runs. Same values as it to float32 rounding (summation order differs), the same memory saved.

Eager code launches the kernels directly (:data:`timm_spe._triton_ops.direct`); where anything traces or watches the
ops (``torch.compile``, ``torch.export``, ``torch.jit.trace``, a ``TorchDispatchMode`` or ``TorchFunctionMode``,
``torch.func`` transforms, a tensor subclass) they go through their ops ``torch.ops.timm_spe.*`` instead, each one
call: same kernels, same values (:func:`kernels`). On a GPU those are ``triton_op``s, which ``torch.compile`` traces
into kernel launches in inductor's own code.
"""
import importlib
import os
import warnings

import torch
from timm.layers import register_notrace_function
from torch.autograd.function import once_differentiable

from .config import triton_kernels_enabled
from .cpu_kernels import _compiling
from .spe_me import LOW_PRECISION

__all__ = ['applies', 'kernels', 'fused_batch_norm_spe_add_relu', 'spe_scale']

_DTYPES = (torch.float32,) + LOW_PRECISION
_MIN_CAPABILITY = (8, 0)  # Triton's supported NVIDIA GPUs
_GPU_RUNS = {}  # torch.device -> whether the default takes the Triton kernels there (checked once)
_DIRECT_LAUNCHES = True  # eager calls skip the ops' dispatch (False: always through them; tests, benchmarks)
_direct = None  # timm_spe._triton_ops.direct once imported

# what can watch or trace ops besides Dynamo (looked up once: eager calls are hot); absent: assume something does
_dispatch_modes = getattr(torch._C, '_len_torch_dispatch_stack', lambda: 1)
_function_modes = getattr(torch._C, '_len_torch_function_stack', lambda: 1)
_functorch_level = getattr(getattr(torch._C, '_functorch', None), 'peek_interpreter_stack', lambda: True)
_assume_constant_result = getattr(getattr(torch, 'compiler', None), 'assume_constant_result', lambda fn: fn)
_current_cuda_device = getattr(torch._C, '_cuda_getDevice', lambda: -1)


def _interpreting() -> bool:
    return os.environ.get('TRITON_INTERPRET', '').strip().lower() in ('1', 'true', 'yes', 'on')


def _check_gpu(device: torch.device) -> bool:
    """Triton imports and runs on ``device``: a CUDA GPU (not ROCm: untested) of compute capability 8.0 or newer, not
    under ``TRITON_INTERPRET=1``, and one small kernel compiles and launches there. The answer is kept per device; the
    kernel is not tried (and the answer not kept) where it would be traced, watched or captured (Dynamo, a dispatch or
    function mode such as a fake tensor mode, a CUDA graph): there the rest decides."""
    if torch.version.hip is not None or _interpreting():
        return _keep(device, False)
    try:
        ops = importlib.import_module('timm_spe._triton_ops')
    except ImportError:  # no triton: the stock ops, as without this path
        return _keep(device, False)
    except Exception as e:  # a triton that does not import
        return _cannot(device, e)
    if torch.cuda.get_device_capability(device) < _MIN_CAPABILITY:
        return _keep(device, False)
    if _compiling() or _dispatch_modes() or _function_modes() or torch.cuda.is_current_stream_capturing():
        return True
    try:
        ops.probe(device)
    except Exception as e:
        return _cannot(device, e)
    return _keep(device, True)


def _keep(device: torch.device, ok: bool) -> bool:
    _GPU_RUNS[device] = ok
    return ok


def _cannot(device: torch.device, e: Exception) -> bool:
    reason = ' '.join(f'{type(e).__name__}: {e}'.split())[:200]
    warnings.warn(f'timm_spe: Triton cannot run its kernels on {device} ({reason}); SPE trains on the stock CUDA ops '
                  f'there (TIMM_SPE_TRITON_KERNELS=0 skips this check).', stacklevel=2)
    return _keep(device, False)


@_assume_constant_result  # torch.compile takes the answer as a constant instead of tracing the check
def _gpu_runs_triton(device: torch.device) -> bool:
    ok = _GPU_RUNS.get(device)
    return _check_gpu(device) if ok is None else ok


def applies(x: torch.Tensor) -> bool:
    """The Triton kernels take ``x``: float32 / bfloat16 / float16 with offsets within int32, on the current CUDA
    device where Triton runs there (by default; switched on: any CUDA GPU, and CPU tensors under ``TRITON_INTERPRET=1``;
    switched off: none). NCHW-contiguous or channels_last, and the rest, the caller checked
    (:func:`~timm_spe.spe_me.fused_applies`)."""
    setting = triton_kernels_enabled()
    if setting is False or isinstance(x, torch.fx.Proxy):  # FX symbolic tracing records the stock ops
        return False
    if x.dtype not in _DTYPES or x.numel() >= 2 ** 31 or 3 * x.shape[0] * x.shape[1] >= 2 ** 31:
        return False
    if x.is_cuda:
        # Triton launches on the current device: a tensor on another one keeps the stock ops (compiled code sets it)
        if not _compiling() and x.get_device() != _current_cuda_device():
            return False
        return setting is True or _gpu_runs_triton(x.device)
    return setting is True and x.device.type == 'cpu' and _interpreting()


def kernels(t: torch.Tensor):
    """The kernels' launch functions for a call on ``t``: called directly in plain eager code, through their ops
    (``torch.ops.timm_spe``) where anything traces or watches the ops, or ``t`` is a tensor subclass."""
    if _compiling():
        return torch.ops.timm_spe
    if (not _DIRECT_LAUNCHES or type(t) is not torch.Tensor or _dispatch_modes() or _function_modes()
            or _functorch_level() is not None or torch.jit.is_tracing()):
        return torch.ops.timm_spe
    global _direct
    if _direct is None:
        _direct = importlib.import_module('timm_spe._triton_ops').direct
    return _direct


def _as(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s dtype (the kernels accumulate in float32; parameters of another dtype get theirs)."""
    return t if t.dtype == like.dtype else t.to(like.dtype)


class _BatchNormSpeAddReLUTriton(torch.autograd.Function):
    """As :class:`~timm_spe.spe_me._BatchNormSpeAddReLU` (it saves BN's input, the output and N x C pools, indices and
    gate; here stacked: ``stats``, ``idx``), with ``p``, the penalty switch ``on`` and ``eta`` in place of ``lam``."""

    @staticmethod
    def forward(x, shortcut, bn_weight, bn_bias, running_mean, running_var, momentum: float, eps: float,
                p, on, eta: float, w_exc, b_exc, w_rew, b_rew, paper: bool):
        # y in x's layout (native_batch_norm keeps it): the kernels address x, y and the output alike
        y, mean, invstd = torch.native_batch_norm(x, bn_weight, bn_bias, running_mean, running_var, True, momentum, eps)
        stats, idx = kernels(x).bn_spe_tail_(y, shortcut, p, w_exc, b_exc, w_rew, b_rew, paper)
        return y, mean, invstd, stats, idx

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, bn_weight, bn_bias, _, _, _, _, p, on, eta, w_exc, b_exc, w_rew, b_rew, paper = inputs
        out, mean, invstd, stats, idx = output
        ctx.mark_non_differentiable(mean, invstd, stats, idx)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, out, bn_weight, bn_bias, mean, invstd, stats, idx, p, on, w_exc, b_exc, w_rew, b_rew)
        ctx.eta, ctx.paper = eta, paper

    @staticmethod
    @once_differentiable  # double backward raises instead of returning a wrong gradient
    def backward(ctx, grad: torch.Tensor, *unused):
        if grad is None:
            return (None,) * 16
        x, out, bn_weight, bn_bias, mean, invstd, stats, idx, p, on, w_exc, b_exc, w_rew, b_rew = ctx.saved_tensors
        k = kernels(grad)
        grad, sums = k.relu_map_sums(grad, out, x, mean, idx)  # through ReLU: the shortcut's gradient, in x's layout
        vv, g_we, g_be, g_wr, g_br, s_dy, s_dyx = k.bn_gate_backward(
            sums, stats, mean, invstd, bn_weight, bn_bias, p, w_exc, b_exc, w_rew, b_rew, ctx.paper)
        if ctx.needs_input_grad[0]:
            grad_x, g_p = k.bn_input_grad(grad, x, stats, mean, invstd, bn_weight, s_dy, s_dyx, idx, vv, p, on, ctx.eta)
        else:
            grad_x, g_p = None, k.mix_backward(stats, vv, p, on, ctx.eta)
        return (grad_x, grad if ctx.needs_input_grad[1] else None, _as(s_dyx, bn_weight), _as(s_dy, bn_bias),
                None, None, None, None, g_p, None, None, _as(g_we, w_exc), _as(g_be, b_exc), _as(g_wr, w_rew),
                _as(g_br, b_rew), None)


@register_notrace_function
def fused_batch_norm_spe_add_relu(
        x: torch.Tensor, shortcut: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
        running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float, eps: float,
        p: torch.Tensor, on: torch.Tensor, eta: float, w_exc: torch.Tensor, b_exc: torch.Tensor, w_rew: torch.Tensor,
        b_rew: torch.Tensor, paper: bool,
) -> torch.Tensor:
    """``relu(y * spe_gate(y) + shortcut)`` with ``y`` a training-mode batch norm of ``x``, on the Triton kernels
    (where :func:`applies`; the caller checks). ``p`` is the layer's raw parameter (Eq. 3 and the Eq. 8 penalty's
    gradient, where ``on`` is set, are computed in the kernels)."""
    return _BatchNormSpeAddReLUTriton.apply(
        x, shortcut, bn_weight, bn_bias, running_mean, running_var, momentum, eps, p, on, eta,
        w_exc, b_exc, w_rew, b_rew, paper)[0]


class _SpeScaleTriton(torch.autograd.Function):
    """As :class:`~timm_spe.spe_me._SpeScale` (saves ``x`` and the N x C gate, pools and indices: ``stats``, ``idx``),
    with ``p``, the penalty switch ``on`` and ``eta`` in place of ``lam``."""

    @staticmethod
    def forward(x, p, on, eta: float, w_exc, b_exc, w_rew, b_rew, paper: bool):
        return kernels(x).spe_scale(x, p, w_exc, b_exc, w_rew, b_rew, paper)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, p, on, eta, w_exc, b_exc, w_rew, b_rew, paper = inputs
        _, stats, idx = output
        ctx.mark_non_differentiable(stats, idx)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, stats, idx, p, on, w_exc, b_exc, w_rew, b_rew)
        ctx.eta, ctx.paper = eta, paper

    @staticmethod
    @once_differentiable  # double backward raises instead of returning a wrong gradient
    def backward(ctx, grad: torch.Tensor, *unused):
        if grad is None:
            return (None,) * 9
        x, stats, idx, p, on, w_exc, b_exc, w_rew, b_rew = ctx.saved_tensors
        k = kernels(grad)
        vv, g_we, g_be, g_wr, g_br = k.gate_backward(k.map_dot(grad, x), stats, p, w_exc, b_exc, w_rew, b_rew, ctx.paper)
        if ctx.needs_input_grad[0]:
            grad_x, g_p = k.scale_input_grad(grad, x, stats, idx, vv, p, on, ctx.eta)
        else:
            grad_x, g_p = None, k.mix_backward(stats, vv, p, on, ctx.eta)
        return grad_x, g_p, None, None, _as(g_we, w_exc), _as(g_be, b_exc), _as(g_wr, w_rew), _as(g_br, b_rew), None


@register_notrace_function
def spe_scale(x: torch.Tensor, p: torch.Tensor, on: torch.Tensor, eta: float, w_exc: torch.Tensor,
              b_exc: torch.Tensor, w_rew: torch.Tensor, b_rew: torch.Tensor, paper: bool) -> torch.Tensor:
    """``x * spe_gate(x)`` of the default SPE variant in training, on the Triton kernels (where :func:`applies` and
    :func:`~timm_spe.spe_me.fused_applies`; the caller checks). ``p`` as in :func:`fused_batch_norm_spe_add_relu`."""
    return _SpeScaleTriton.apply(x, p, on, eta, w_exc, b_exc, w_rew, b_rew, paper)[0]
