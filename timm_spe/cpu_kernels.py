""" Optional one-pass CPU kernels for SPE's passes over a block output: every eager-or-kernel dispatch

PyTorch's CPU ops read a block output once for ``amax`` and again for ``amin`` and find the argmax / argmin
element by element; the block tail and BN's input gradient take two passes each. ``csrc/`` (``max_min.cpp``, ``passes.cpp``, ``gate.cpp``;
registered by ``spe_cpu.cpp``, shared code in ``spe_cpu.h``) does each in one vectorised pass: ``torch.ops.timm_spe.max_min``, ``max_min_with_indices``, ``scale_add_relu_``,
``bn_input_grad_`` and ``channels_last_per_map_sums``, the N x C gathers / scatters at the extrema (``take_at``,
``scatter_add_at_``), and the N x C gate math each way (``spe_gate``, ``block_backward_coefficients``), with fake (meta)
implementations, so ``torch.compile``
and ``torch.export`` trace them. They are compiled on first use with ``torch.utils.cpp_extension`` (a C++
compiler and ninja are needed) and cached by PyTorch, per CPU model since they are built with ``-march=native``:
:mod:`timm_spe._cpu_build`.

Off by default: ``timm_spe.set_cpu_kernels(True)`` (or ``with timm_spe.set_cpu_kernels(True): ...``), or
``TIMM_SPE_CPU_KERNELS=1`` in the environment (``run.sh train`` sets it); the switch is in :mod:`timm_spe.config`.
The functions of this file are the only callers of the kernels: each runs its kernel where the switch is on and the
kernel takes the input (CPU float32 / float64 / bfloat16 / float16, NCHW or channels_last), and eager ops otherwise.
Results are those of the eager ops bit for bit (values, first-extremum indices, NaN as ``max(dim)``, the rounding of
``addcmul``), except two backward passes, which are more precise than their eager forms: channels_last per-map sums
take the ``(x - mean)`` form, and for bfloat16 / float16 input BN's input gradient and the per-map sums compute in
float32 with float32 coefficients and round once (eager: several 16-bit roundings). The kernels load 16-bit values
into float32 lanes, so autocast / AMP training reads each block output as often as the fp32 path does.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

from .config import cpu_kernels_enabled
from .spe_math import spe_gate as _eager_gate

__all__ = [
    'kernels_apply', 'kernels_apply_per_map', 'coef_dtype', 'max_min', 'max_min_with_indices', 'scale_add_relu_', 'bn_input_grad_',
    'per_map_sums', 'take_at', 'scatter_add_at_', 'spe_gate', 'spe_gate_of', 'spe_add_relu_',
    'block_backward_coefficients',
]

KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)


_IS_COMPILING = getattr(getattr(torch, 'compiler', None), 'is_compiling', None)  # looked up once: eager calls are hot


def _compiling() -> bool:
    """Dynamo is tracing (``torch.compiler.is_compiling``, torch >= 2.3; older torch: never)."""
    return _IS_COMPILING is not None and _IS_COMPILING()


def _out(op, *args, out: torch.Tensor, **kwargs) -> torch.Tensor:
    """``op(*args, out=out, **kwargs)``, or under ``torch.compile`` ``out.copy_(op(*args, **kwargs))``: the same values
    in ``out``. Dynamo before torch 2.12 cannot trace ``out=`` into a channels_last tensor; on CUDA (torch 2.11, an
    H200) that was a graph break in every SPE block and a recompile per channel width. Inductor can fuse the copy into
    the op that makes the value."""
    if _compiling():
        return out.copy_(op(*args, **kwargs))
    return op(*args, out=out, **kwargs)


def kernels_apply(x: torch.Tensor) -> bool:
    """The kernels are on and take ``x``: a non-empty 4-D CPU float32/float64/bfloat16/float16 tensor, NCHW or
    channels_last."""
    return (
        cpu_kernels_enabled() and x.device.type == 'cpu' and x.dtype in KERNEL_DTYPES
        and x.ndim == 4 and x.numel() > 0
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
    )


def coef_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the per-channel / per-map coefficients and sums that go with ``x`` in the backward passes: float32
    for bfloat16 / float16 ``x`` (as autocast keeps the N x C math), ``x``'s own otherwise."""
    return torch.float32 if x.dtype in LOW_PRECISION else x.dtype


def _laid_out_as(t: torch.Tensor, x: torch.Tensor) -> bool:
    return t.device == x.device and t.dtype == x.dtype and t.shape == x.shape and t.stride() == x.stride()


def kernels_apply_per_map(x: torch.Tensor, like_x: torch.Tensor, per_map: torch.Tensor) -> bool:
    """The elementwise kernels (block tail, BN's input gradient) take ``x`` (:func:`kernels_apply`), ``like_x`` laid
    out as ``x`` and a contiguous ``per_map`` tensor of N x C (x 1 x 1) values, all of one dtype."""
    return (
        kernels_apply(x) and _laid_out_as(like_x, x)
        and per_map.device == x.device and per_map.dtype == x.dtype and per_map.is_contiguous()
        and per_map.numel() == x.shape[0] * x.shape[1]
    )


# ---- the dispatch: each of SPE's passes on its kernel where it applies, else in eager ops with the same results

def _first_at(t: torch.Tensor, value: torch.Tensor, largest: bool) -> torch.Tensor:
    """Index of the first element of each row of ``t`` (R x L, contiguous) that is ``>= value`` (``<=`` with
    ``largest=False``), i.e. of the first maximum (minimum) when ``value`` is the row's max (min).

    Three vectorised passes (compare, ``L-1, ..., 0`` where it holds and 0 elsewhere, ``amax``) instead of
    ``max(dim)``'s scalar index loop; no op mixes dtypes (the CPU would copy a whole operand first). Rows without a
    hit (NaN) give ``L - 1``.
    """
    length = t.shape[1]
    flag_dtype = torch.float32 if length <= 2 ** 24 else torch.float64  # exact integers up to L
    compare = torch.ge if largest else torch.le
    hits = compare(t, value.unsqueeze(1))
    reversed_index = torch.arange(length - 1, -1, -1, dtype=flag_dtype, device=t.device)
    return (length - 1) - torch.where(hits, reversed_index, 0.).amax(1).long()


def _max_over_rows(t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Max over dim 1 of an N x K x C contiguous tensor and the first index of it, each N x C: ``max_pool2d``
    on the channels_last view, which is vectorised over C and keeps the index of the first maximum."""
    n, k, c = t.shape
    values, index = F.max_pool2d(t.view(n, k, 1, c).permute(0, 3, 1, 2), (k, 1), return_indices=True)
    return values.view(n, c), index.view(n, c)


def max_min_with_indices(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-(n, c) max, its index, min, its index over H x W (index ``h * W + w`` of the first extremum) of an
    NCHW-contiguous or channels_last tensor: ``max(dim)`` / ``min(dim)`` results (for NaN-free input).

    The kernel takes one pass. Eager, from vectorised ops, since PyTorch's CPU ``max(dim)`` searches the index
    element by element: NCHW rows longer than 64 whose length is a multiple of 32 (from 16 x 16 maps up) are reduced
    in blocks of 32 with ``amax``/``amin``, the first winning block is found with :func:`_first_at` and only that
    block is searched (no full-size temporary); other rows are searched whole (on 8 x 8 maps whole rows take half
    the time of two blocks: the primitives table of ``benchmarks/``). channels_last: the max and its index come from one
    ``max_pool2d`` over H x W; the min from the row minima over W (vectorised over C) and :func:`_max_over_rows` on
    their negation, then the winning row.
    """
    if kernels_apply(x):
        return torch.ops.timm_spe.max_min_with_indices(x)
    n, c, h, w = x.shape
    if not x.is_contiguous():
        f_max, i_max = F.max_pool2d(x, (h, w), return_indices=True)
        rows = x.permute(0, 2, 3, 1)  # N x H x W x C, contiguous
        neg_min, r_min = _max_over_rows(rows.amin(2).neg_())
        in_row = rows.gather(1, r_min.view(n, 1, 1, c).expand(n, 1, w, c)).view(n, w, c)
        _, j_min = _max_over_rows(in_row.neg_())
        return f_max.view(n, c), i_max.view(n, c), neg_min.neg_(), r_min * w + j_min
    flat = x.view(n * c, h * w)
    block = 32
    if h * w <= 2 * block or (h * w) % block:
        f_max, f_min = flat.amax(1), flat.amin(1)
        i_max, i_min = _first_at(flat, f_max, True), _first_at(flat, f_min, False)
    else:
        blocks = flat.view(n * c, -1, block)
        num_blocks = blocks.shape[1]
        b_max, b_min = blocks.amax(2), blocks.amin(2)
        f_max, f_min = b_max.amax(1), b_min.amin(1)
        k_max, k_min = _first_at(b_max, f_max, True), _first_at(b_min, f_min, False)
        first_block = torch.arange(0, n * c * num_blocks, num_blocks, device=x.device)
        all_blocks = blocks.view(-1, block)
        i_max = k_max * block + _first_at(all_blocks.index_select(0, first_block + k_max), f_max, True)
        i_min = k_min * block + _first_at(all_blocks.index_select(0, first_block + k_min), f_min, False)
    return f_max.view(n, c), i_max.view(n, c), f_min.view(n, c), i_min.view(n, c)


@register_notrace_function
def max_min(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x.amax((2, 3)), x.amin((2, 3)))``; one pass on the kernel where it applies and no gradient is needed (not
    while tracing: the trace must not depend on grad mode, and plain ops keep a traced model free of the extension)."""
    if not torch.jit.is_scripting():  # TorchScript (e.g. of an FX graph calling this leaf) skips the kernels
        if not torch.jit.is_tracing() and kernels_apply(x) and not (torch.is_grad_enabled() and x.requires_grad):
            return torch.ops.timm_spe.max_min(x)
    return x.amax((2, 3)), x.amin((2, 3))


@register_notrace_function
def scale_add_relu_(x: torch.Tensor, shortcut: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``relu(x * gate + shortcut)`` written into ``x`` and returned (``gate``: N x C x 1 x 1); no autograd. One pass
    on the kernel where it applies, else ``addcmul`` and ``relu_``, same results."""
    if not torch.jit.is_scripting():  # as in max_min
        if kernels_apply_per_map(x, shortcut, gate):
            torch.ops.timm_spe.scale_add_relu_(x, shortcut, gate)
            return x
        if _compiling():  # as _out does (this function is also scripted: no *args there)
            return x.copy_(torch.addcmul(shortcut, x, gate).relu_())
    return torch.addcmul(shortcut, x, gate, out=x).relu_()


def bn_input_grad_(
        out: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, grad_scale: torch.Tensor, sum_term: torch.Tensor,
        x_coef: torch.Tensor, mean: torch.Tensor, i_max: torch.Tensor, v_max: torch.Tensor, i_min: torch.Tensor,
        v_min: torch.Tensor,
) -> torch.Tensor:
    """BN's input gradient ``grad * grad_scale - sum_term - (x - mean) * x_coef`` written into ``out`` (``grad_scale``
    N x C; ``sum_term``, ``x_coef``, ``mean`` C; all of :func:`coef_dtype`), then ``v_max`` / ``v_min`` (N x C) added at
    the flattened H x W positions ``i_max`` / ``i_min``, and ``out`` returned.

    On the kernel where it applies: one pass of ``grad * grad_scale + shift - x * x_coef`` with ``shift = mean * x_coef
    - sum_term``. Eager float32 / float64: the same formula in two multiply-add passes and two scatters (same results
    bit for bit). Eager bfloat16 / float16: that form would round an intermediate whose terms cancel when ``|mean| >>
    std`` (8 or 11 mantissa bits would lose the gradient), so ``x`` is centred first on ``mean`` rounded to ``x``'s
    dtype (the rounding's offset folded into the constant) and every intermediate is of the result's size, all
    full-size ops in ``x``'s dtype (no float32 copies). The kernel computes in float32 and rounds once."""
    n, c = x.shape[0], x.shape[1]
    coef = coef_dtype(x)
    if kernels_apply(x) and _laid_out_as(grad, x) and _laid_out_as(out, x) \
            and all(t.dtype == coef and t.device == x.device for t in (grad_scale, sum_term, x_coef, mean, v_max, v_min)) \
            and _index_kernel_applies(x, i_max) and _index_kernel_applies(x, i_min):
        torch.ops.timm_spe.bn_input_grad_(
            out, grad, x, grad_scale.contiguous(), (mean * x_coef - sum_term).contiguous(), x_coef.contiguous(),
            i_max, v_max.contiguous(), i_min, v_min.contiguous())
        return out
    if x.dtype in LOW_PRECISION:
        dtype = x.dtype
        mean_low = mean.to(dtype)
        constant = sum_term + (mean_low.float() - mean) * x_coef  # (x - mean) = (x - mean_low) + (mean_low - mean)
        _out(torch.sub, x, mean_low.view(1, c, 1, 1), out=out)
        _out(torch.addcmul, constant.to(dtype).neg_().view(1, c, 1, 1), out, x_coef.to(dtype).view(1, c, 1, 1),
             value=-1, out=out)
        out.addcmul_(grad, grad_scale.to(dtype).view(n, c, 1, 1))
        scatter_add_at_(out, i_max, v_max.to(dtype))
        scatter_add_at_(out, i_min, v_min.to(dtype))
        return out
    shift = mean * x_coef - sum_term
    out = _out(torch.addcmul, shift.view(1, c, 1, 1), grad, grad_scale.view(n, c, 1, 1), out=out)
    out.addcmul_(x, x_coef.view(1, c, 1, 1), value=-1)
    scatter_add_at_(out, i_max, v_max)
    scatter_add_at_(out, i_min, v_min)
    return out


def per_map_sums(
        grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, buf: torch.Tensor,
        i_max: torch.Tensor, i_min: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-(n, c) ``sum_hw(grad)`` and ``sum_hw(grad * (x - mean) * invstd)`` of two N x C x H x W tensors of one
    layout (``mean`` and ``invstd`` per channel), and ``x`` at the flattened H x W positions ``i_max`` and ``i_min``:
    four N x C tensors.

    NCHW on CPU: BatchNorm's own backward kernel on the 1 x NC x H x W views, i.e. with every (n, c) map as a channel,
    returns exactly the two sums as its bias and weight gradients, from one read of both tensors; the values at the
    extrema by :func:`take_at`. channels_last (no such view): on the kernel, all four in one read of both, the sums
    in the ``(x - mean)`` form (float32 sums and ``mean`` for bfloat16 / float16 ``x``); else ``sum_hw(grad * x)`` through ``buf`` (scratch of ``grad``'s shape), which loses
    relative precision ~``|mean| / std`` of ``x`` against the ``(x - mean)`` form.
    """
    n, c, h, w = x.shape
    if x.is_contiguous() and x.device.type == 'cpu':  # CUDA's kernel needs a weight tensor: the generic path there
        _, sum_grad_xhat, sum_grad = torch.ops.aten.native_batch_norm_backward(
            grad.view(1, n * c, h, w), x.view(1, n * c, h, w), None, None, None,
            mean.repeat(n), invstd.repeat(n), True, 0., [False, True, True])
        return sum_grad.view(n, c), sum_grad_xhat.view(n, c), take_at(x, i_max), take_at(x, i_min)
    if kernels_apply(x) and grad.stride() == x.stride() and grad.dtype == x.dtype and mean.dtype == coef_dtype(x) \
            and _index_kernel_applies(x, i_max) and _index_kernel_applies(x, i_min):
        sum_grad, sum_grad_centered, x_max, x_min = torch.ops.timm_spe.channels_last_per_map_sums(
            grad, x, mean.contiguous(), i_max, i_min)
        return sum_grad, invstd * sum_grad_centered, x_max, x_min
    if x.dtype in (torch.bfloat16, torch.float16):
        # centred on the mean rounded to x's dtype (no cancellation in 8 or 11 bits), its offset added back in float32;
        # no mixed-dtype full-size op and no sum(dtype=float32): the CPU would copy a whole tensor to float32 first
        mean_low = mean.to(x.dtype)
        centred = _out(torch.sub, x, mean_low.view(1, c, 1, 1), out=buf).mul_(grad)
        sum_grad, sum_centred = grad.sum((2, 3)).float(), centred.sum((2, 3)).float()
        sum_grad_xc = sum_centred + (mean_low.float() - mean) * sum_grad
        return sum_grad, invstd * sum_grad_xc, take_at(x, i_max), take_at(x, i_min)
    sum_grad = grad.sum((2, 3))
    sum_grad_x = _out(torch.mul, grad, x, out=buf).sum((2, 3))
    return sum_grad, invstd * (sum_grad_x - mean * sum_grad), take_at(x, i_max), take_at(x, i_min)


def _hw_view(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """An NCHW-contiguous or channels_last N x C x H x W tensor as a view with H x W flattened, and the
    flattened dim: ``(N x C x HW, 2)`` or ``(N x HW x C, 1)``. Index ``h * W + w`` either way."""
    n, c = t.shape[0], t.shape[1]
    if t.is_contiguous():
        return t.view(n, c, -1), 2
    return t.permute(0, 2, 3, 1).reshape(n, -1, c), 1


def _index_kernel_applies(t: torch.Tensor, index: torch.Tensor) -> bool:
    return (kernels_apply(t) and index.device == t.device and index.dtype == torch.long and index.is_contiguous()
            and index.numel() == t.shape[0] * t.shape[1])


def take_at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[n, c].flatten()[index[n, c]]`` for every (n, c): N x C values at flattened H x W indices of an
    NCHW-contiguous or channels_last tensor (no autograd). N x C loads on the kernel where it applies, else
    ``gather``; same values."""
    if _index_kernel_applies(x, index):
        return torch.ops.timm_spe.take_at(x, index)
    view, dim = _hw_view(x)
    return view.gather(dim, index.unsqueeze(dim)).squeeze(dim)


def scatter_add_at_(t: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """In place, no autograd: ``t[n, c].flatten()[index[n, c]] += values[n, c]`` for every (n, c). N x C adds on
    the kernel where it applies, else ``scatter_add_``; same results. bfloat16 / float16 on the CPU: ``index_put_``
    at the flat offsets, since the CPU's ``scatter_add_`` copies the whole tensor to float32 and back for them."""
    if _index_kernel_applies(t, index) and values.dtype == t.dtype and values.is_contiguous():
        torch.ops.timm_spe.scatter_add_at_(t, index, values)
        return
    if t.dtype in (torch.bfloat16, torch.float16) and t.device.type == 'cpu' and not _compiling():  # Dynamo cannot
        n, c = t.shape[0], t.shape[1]  # trace storage_offset(); inductor makes its own scatter
        offsets = (torch.arange(n, device=t.device).view(n, 1) * t.stride(0)
                   + torch.arange(c, device=t.device) * t.stride(1) + index * t.stride(3))
        flat = t.as_strided((t.numel(),), (1,), t.storage_offset())
        flat.index_put_((offsets.view(-1),), values.to(t.dtype).reshape(-1), accumulate=True)
        return
    view, dim = _hw_view(t)
    view.scatter_add_(dim, index.unsqueeze(dim), values.unsqueeze(dim))


def _gate_kernel_applies(f_max: torch.Tensor, f_min: torch.Tensor, params: Tuple[torch.Tensor, ...]) -> bool:
    """The gate op takes these: kernels on, CPU, N x C pools of one kernel dtype and shape, no gradient to record, and
    parameters as eager computes with them: float32 for 16-bit pools (autocast / AMP), else the pools' dtype."""
    if not (cpu_kernels_enabled() and f_max.device.type == 'cpu' and f_max.dtype in KERNEL_DTYPES and f_max.ndim == 2
            and f_min.dtype == f_max.dtype and f_min.shape == f_max.shape and f_min.device == f_max.device):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (f_max, f_min) + params):
        return False  # no autograd formula: the eager ops record the graph
    dtype = coef_dtype(f_max)
    return all(t.dtype == dtype and t.device == f_max.device for t in params)


@register_notrace_function
def spe_gate(
        f_max: torch.Tensor, f_min: torch.Tensor, lam: torch.Tensor, w_exc: torch.Tensor, b_exc: torch.Tensor,
        w_rew: torch.Tensor, b_rew: torch.Tensor, paper: bool,
) -> torch.Tensor:
    """:func:`timm_spe.spe_math.spe_gate` rounded to the pools' dtype (N x C): the gate a layer scales its input by.

    One op on the kernels where it applies and no gradient is recorded (inference, and the fused training functions'
    forward), else the eager ops and a cast; the same values bit for bit (the op rounds every step as eager's ops do and
    calls PyTorch's own sigmoid). Eager, the gate is ~20 ops on N x C tensors, each costing more in dispatch than in
    arithmetic. Not while tracing (as :func:`max_min`)."""
    if not torch.jit.is_scripting():  # as in max_min
        params = (lam, w_exc, b_exc, w_rew, b_rew)
        if not torch.jit.is_tracing() and lam.numel() == 2 and _gate_kernel_applies(f_max, f_min, params) \
                and all(t.numel() == f_max.shape[1] for t in params[1:]):
            return torch.ops.timm_spe.spe_gate(
                f_max.contiguous(), f_min.contiguous(), *(t.contiguous() for t in params), paper)
    return _eager_gate(f_max, f_min, lam, w_exc, b_exc, w_rew, b_rew, paper).to(f_max.dtype)


def _inference_kernel_applies(x: torch.Tensor, p: torch.Tensor, params: Tuple[torch.Tensor, ...]) -> bool:
    """The ops that start from a block output ``x`` and the layer's ``p`` take these: :func:`kernels_apply` to ``x``, ``p``
    (2) and the per-channel parameters (C each) of :func:`coef_dtype` on ``x``'s device, and nothing that records a
    gradient. Not while tracing (as :func:`max_min`)."""
    if torch.jit.is_tracing() or not kernels_apply(x):
        return False
    dtype = coef_dtype(x)
    if not (p.numel() == 2 and all(t.dtype == dtype and t.device == x.device for t in (p,) + params)
            and all(t.numel() == x.shape[1] for t in params)):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, p) + params))


def spe_gate_of(
        x: torch.Tensor, p: torch.Tensor, w_exc: torch.Tensor, b_exc: torch.Tensor, w_rew: torch.Tensor,
        b_rew: torch.Tensor, paper: bool,
) -> Optional[torch.Tensor]:
    """The gate a layer scales ``x`` by, N x C in ``x``'s dtype, straight from ``x`` and ``p``: :func:`max_min`,
    Eq. 3 (:func:`timm_spe.spe_math.mix_weights`) and :func:`spe_gate` in one op where the kernels apply and no gradient
    is recorded (inference); ``None`` elsewhere (the caller takes those steps). The same values bit for bit.

    Why one op: inside a model, between a block's big passes, each Python-level op costs several times what it costs in
    a loop on its own; the dozen of them per layer (the pooling, Eq. 3, the gate and their dispatch) cost 0.15-0.3 ms
    per block under bf16 autocast on this project's CPU (``benchmarks/inference_tail.py``)."""
    params = (w_exc, b_exc, w_rew, b_rew)
    if not _inference_kernel_applies(x, p, params):
        return None
    return torch.ops.timm_spe.spe_gate_of(x, p.contiguous(), *(t.contiguous() for t in params), paper)


def spe_add_relu_(
        x: torch.Tensor, shortcut: torch.Tensor, p: torch.Tensor, w_exc: torch.Tensor, b_exc: torch.Tensor,
        w_rew: torch.Tensor, b_rew: torch.Tensor, paper: bool,
) -> bool:
    """``relu(x * gate + shortcut)`` written into ``x``, the gate as :func:`spe_gate_of` makes it: a block's inference
    tail in one op (:func:`spe_gate_of`, then :func:`scale_add_relu_`). ``True`` where it ran: the kernels apply, nothing
    records a gradient, ``shortcut`` is laid out as ``x``; ``False`` elsewhere, ``x`` untouched (the caller takes the
    steps). The same values bit for bit."""
    params = (w_exc, b_exc, w_rew, b_rew)
    if not (_laid_out_as(shortcut, x) and _inference_kernel_applies(x, p, params)):
        return False
    torch.ops.timm_spe.spe_add_relu_(x, shortcut, p.contiguous(), *(t.contiguous() for t in params), paper)
    return True


def block_backward_coefficients(
        sum_grad: torch.Tensor, sum_grad_xhat: torch.Tensor, x_max: torch.Tensor, x_min: torch.Tensor,
        f_max: torch.Tensor, f_min: torch.Tensor, gate: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
        bn_weight: torch.Tensor, bn_bias: torch.Tensor, lam: torch.Tensor, w_exc: torch.Tensor, b_exc: torch.Tensor,
        w_rew: torch.Tensor, b_rew: torch.Tensor, paper: bool, count: int,
) -> Optional[List[torch.Tensor]]:
    """The N x C part of the fused block's backward in one op, for bfloat16 / float16 activations (autocast) on the
    kernels: ``[grad_scale, sum_term, x_coef, v_max, v_min]`` (:func:`bn_input_grad_`'s arguments), BN's weight and
    bias gradients, and the gradients of ``lam, w_exc, b_exc, w_rew, b_rew``; ``None`` where it does not apply (the
    caller, :class:`timm_spe.spe_me._BatchNormSpeAddReLU`, then runs the eager ops).

    Eager, this is ~100 ops on N x C tensors per block, each costing ~20-30 us of dispatch on the CPU whatever its
    size: more than a block's full-size passes under autocast. The op computes the same closed form in float32 (the
    sigmoids with ``std::exp``, sums over N in float64), so results differ from the eager ops by float32 rounding;
    float32 / float64 activations keep the eager ops (bit for bit with the kernels off)."""
    if not (cpu_kernels_enabled() and sum_grad.device.type == 'cpu' and x_max.dtype in LOW_PRECISION):
        return None
    n_by_c = (x_max, x_min, f_max, f_min, gate)
    per_channel = (mean, invstd, bn_weight, bn_bias, w_exc, b_exc, w_rew, b_rew)
    if not (sum_grad.dtype == sum_grad_xhat.dtype == lam.dtype == torch.float32
            and all(t.dtype == x_max.dtype and t.device.type == 'cpu' for t in n_by_c)
            and all(t.dtype == torch.float32 and t.device.type == 'cpu' for t in per_channel)):
        return None
    c = [t.contiguous() for t in per_channel]
    return torch.ops.timm_spe.block_backward_coefficients(
        sum_grad.contiguous(), sum_grad_xhat.contiguous(), *(t.contiguous() for t in n_by_c), *c[:4], lam, *c[4:],
        paper, count)
