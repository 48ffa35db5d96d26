"""SPE under autocast (bfloat16 / float16 activations, float32 parameters): the fused training functions run there
too, with the CPU kernels on and off, give what the plain ops give, and cast no full-size activation that the block
without SPE does not."""
import copy
import math

import pytest
import timm
import torch
from torch.profiler import profile

import timm_spe
from timm_spe import spe_me
from timm_spe.spe import _block_tail_fusable

LOW = [torch.bfloat16, torch.float16]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
KERNELS = pytest.mark.parametrize('kernels', [False, True], ids=['eager', 'cpu_kernels'])


def _perturbed(model):
    """SPE's initial parameters make a constant gate: move them so that every term of the gate matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, timm_spe.SpeModule):
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.5)
    return model


def _block_step(block, x, grad, dtype):
    """Forward under autocast to ``dtype`` and backward of one block: output, input gradient, parameter gradients."""
    x = x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=dtype):
        out = block(x)
    out.backward(grad)
    return out, x.grad, {n: p.grad for n, p in block.named_parameters()}


def _inner_block(name='resnet83_spe'):
    block = _perturbed(timm.create_model(name)).train().layer2[2]  # an inner block: no downsample
    return block, block.conv1.in_channels


def test_the_block_tail_fuses_for_low_precision_activations_with_float32_parameters(random_spe):
    spe, bn = random_spe(4), torch.nn.BatchNorm2d(4)
    for dtype in LOW:
        c = torch.randn(2, 4, 5, 5).to(dtype)
        with torch.autocast('cpu', dtype=dtype):
            assert _block_tail_fusable(c, c, bn, spe)
            assert _block_tail_fusable(c.contiguous(memory_format=torch.channels_last), c, bn, spe)
            assert not _block_tail_fusable(c, c.float(), bn, spe)  # a shortcut of another dtype
            assert not _block_tail_fusable(c.transpose(2, 3), c, bn, spe)
    c = torch.randn(2, 4, 5, 5)
    assert not _block_tail_fusable(c.double(), c.double(), bn, spe)  # float64 activations, float32 parameters
    assert not _block_tail_fusable(c.bfloat16(), c.bfloat16(), bn, copy.deepcopy(spe).double())


@KERNELS
@pytest.mark.parametrize('memory_format', LAYOUTS, ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('dtype', LOW, ids=['bfloat16', 'float16'])
def test_fused_block_tail_under_autocast_gives_the_plain_ops_results(monkeypatch, dtype, memory_format, kernels):
    """The same output bit for bit and the same running statistics; gradients up to the dtype's rounding (the fused
    backward sums in float32 from per-map sums where autograd's ops round each product)."""
    block, ch = _inner_block()
    torch.manual_seed(0)
    x = (torch.randn(8, ch, 16, 16) * 2 + 3).to(dtype).contiguous(memory_format=memory_format)  # mean >> 0
    grad = torch.randn(8, ch, 16, 16).to(dtype).contiguous(memory_format=memory_format)
    plain = copy.deepcopy(block)
    with timm_spe.set_cpu_kernels(kernels):
        out, gx, gp = _block_step(block, x, grad, dtype)
    monkeypatch.setattr(timm_spe.spe, '_block_tail_fusable', lambda *args: False)
    ref, ref_gx, ref_gp = _block_step(plain, x, grad, dtype)
    assert out.dtype == ref.dtype == dtype
    assert torch.equal(out, ref)
    tol = dict(rtol=0.02, atol=0.02) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    scale = ref_gx.float().abs().max()
    torch.testing.assert_close(gx.float() / scale, ref_gx.float() / scale, **tol)
    for name in gp:
        s = ref_gp[name].abs().max()
        torch.testing.assert_close(gp[name] / s, ref_gp[name] / s, **tol, msg=name)
    for (name, a), b in zip(block.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@KERNELS
@pytest.mark.parametrize('dtype', LOW, ids=['bfloat16', 'float16'])
def test_fused_spe_layer_under_autocast_gives_the_plain_ops_results(monkeypatch, dtype, kernels):
    """SpeModule on its own (any timm model with attn_layer='spe'): the fused x * gate under autocast."""
    torch.manual_seed(0)
    spe = _perturbed(torch.nn.Sequential(timm_spe.SpeModule(16))).train()
    x = torch.randn(4, 16, 8, 8).to(dtype)
    grad = torch.randn(4, 16, 8, 8).to(dtype)
    plain = copy.deepcopy(spe)
    calls = []
    apply = spe_me._SpeScale.apply
    monkeypatch.setattr(spe_me._SpeScale, 'apply', lambda *a: calls.append(1) or apply(*a))
    with timm_spe.set_cpu_kernels(kernels):
        out, gx, gp = _block_step(spe, x, grad, dtype)
    assert calls  # the fused function ran
    monkeypatch.setattr(spe_me, 'fused_applies', lambda *args: False)
    ref, ref_gx, ref_gp = _block_step(plain, x, grad, dtype)
    assert out.dtype == dtype and torch.equal(out, ref)
    tol = dict(rtol=0.02, atol=0.02) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gx.float(), ref_gx.float(), **tol)
    for name in gp:
        s = ref_gp[name].abs().max()
        torch.testing.assert_close(gp[name] / s, ref_gp[name] / s, **tol, msg=name)


def _full_size_casts(block, x, grad, dtype):
    """The dtype casts and copies of tensors of the size of the block's activations in a forward + backward."""
    x = x.clone().requires_grad_()
    with profile(record_shapes=True) as prof:
        with torch.autocast('cpu', dtype=dtype):
            out = block(x)
        out.backward(grad)
    return sorted(str(e.input_shapes[0]) for e in prof.events()
                  if e.name in ('aten::_to_copy', 'aten::copy_') and e.input_shapes and e.input_shapes[0]
                  and math.prod(e.input_shapes[0]) == x.numel())


@KERNELS
@pytest.mark.parametrize('memory_format', LAYOUTS, ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('dtype', LOW, ids=['bfloat16', 'float16'])
def test_no_full_size_casts_under_autocast_that_the_plain_block_does_not_make(dtype, memory_format, kernels):
    """The block output stays in the autocast dtype and nothing copies a whole activation to float32 (the CPU does
    that silently for any elementwise op mixing a float32 gate with bfloat16 activations)."""
    block, ch = _inner_block()
    plain = timm.create_model('resnet83').train().layer2[2]
    x = torch.randn(4, ch, 8, 8).to(dtype).contiguous(memory_format=memory_format)
    grad = torch.randn(4, ch, 8, 8).to(dtype).contiguous(memory_format=memory_format)
    with timm_spe.set_cpu_kernels(kernels):
        assert _full_size_casts(block, x, grad, dtype) == _full_size_casts(plain, x, grad, dtype)
        spe = timm_spe.SpeModule(ch).train()
        assert _full_size_casts(spe, x, grad, dtype) == []


@KERNELS
@pytest.mark.parametrize('dtype', LOW, ids=['bfloat16', 'float16'])
def test_the_penalty_gradient_stays_exact_under_autocast(dtype, kernels):
    """Eq. 8's gradient ``2 * eta * p`` is added in float32 to ``p``'s float32 gradient, bit for bit the same sum as
    with the penalty off plus that term, in every SPE layer of a model trained under autocast."""
    torch.manual_seed(0)
    model = _perturbed(timm.create_model('resnet83_spe', num_classes=10)).train()
    x = torch.randn(2, 3, 16, 16)
    grads = []
    for on in (True, False):
        m = copy.deepcopy(model)
        timm_spe.set_auto_penalty(m, on)
        torch.manual_seed(1)
        with timm_spe.set_cpu_kernels(kernels):
            with torch.autocast('cpu', dtype=dtype):
                loss = m(x).float().square().mean()
            loss.backward()
        grads.append([(mod.p.grad, mod.p.detach(), mod.eta) for mod in m.modules()
                      if isinstance(mod, timm_spe.SpeModule)])
    for (with_penalty, p, eta), (without, _, _) in zip(*grads):
        assert with_penalty.dtype == torch.float32
        assert torch.equal(with_penalty, without + 2. * eta * p)
