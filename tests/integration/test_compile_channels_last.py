"""channels_last under torch.compile on the stock ops (the CUDA path): traced whole, even by a Dynamo that refuses
``out=`` into a channels_last tensor (torch before 2.12: on an H200 with torch 2.11 every SPE block broke the graph)."""
import copy

import pytest
import torch
import torch._dynamo.variables.torch as dynamo_torch_variables
from compile_check import assert_compiled_train_step_matches_eager
from torch import nn
from torch._prims_common import is_contiguous

import timm_spe


@pytest.fixture()
def dynamo_refusing_channels_last_out(monkeypatch):
    """Dynamo's rule of torch 2.11: an ``out=`` tensor must be contiguous (2.12 and later also take channels_last).
    Older torch has the rule built in; there the attribute set here is unused."""
    monkeypatch.setattr(dynamo_torch_variables, '_is_supported_out_tensor_layout',
                        lambda fake_out, *, false_if_dde: is_contiguous(fake_out, false_if_dde=false_if_dde),
                        raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_rule_stands_in_for_torch_2_11_dynamo_refusing_out_into_channels_last(dynamo_refusing_channels_last_out):
    """The fixture works (else the tests below would pass for nothing): an ``out=`` write into a channels_last tensor
    breaks a fullgraph trace under it."""
    o = torch.empty(2, 3, 4, 4).to(memory_format=torch.channels_last)
    a, b = torch.randn_like(o), torch.randn_like(o)
    with pytest.raises(Exception, match='non-contiguous `out=`'):
        torch.compile(lambda o, a, b: torch.mul(a, b, out=o), backend='aot_eager', fullgraph=True)(o, a, b)


_MODELS = {
    'the fused block tail': lambda: timm_spe.resnet.CifarResNet(depth=11, attn_layer='spe'),
    'the layer alone': lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), timm_spe.SpeModule(8),
                                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)),
}


def _model(kind):
    torch.manual_seed(0)
    return _MODELS[kind]()


@pytest.mark.parametrize('kind', ['the fused block tail', 'the layer alone'])
def test_a_channels_last_train_step_on_the_stock_ops_compiles_whole_and_equals_eager(
        kind, dynamo_refusing_channels_last_out):
    with timm_spe.set_cpu_kernels(False):
        m = _model(kind).to(memory_format=torch.channels_last)
        x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
        assert_compiled_train_step_matches_eager(m, x)  # fullgraph: a graph break raises


def test_a_channels_last_train_step_under_bfloat16_autocast_compiles_whole_and_equals_eager(
        dynamo_refusing_channels_last_out):
    """bfloat16 activations take the backward's centred form (its own ``out=`` writes) and the CPU's bfloat16 scatter.
    Bit for bit eager's too: PyTorch's fake ``native_batch_norm`` gives bfloat16 batch statistics for bfloat16 input
    where the CPU kernel gives the parameters' float32, and the fused function casts them back while tracing (without
    that, the gradients differed by up to 0.0083 relative)."""
    with timm_spe.set_cpu_kernels(False):
        m = _model('the fused block tail').to(memory_format=torch.channels_last).train()
        ref = copy.deepcopy(m)
        x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
        compiled = torch.compile(m, backend='aot_eager', fullgraph=True)  # fullgraph: a graph break raises
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out, out_ref = compiled(x), ref(x)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
        out.float().square().mean().backward()
        out_ref.float().square().mean().backward()
        for (name, p), q in zip(m.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
