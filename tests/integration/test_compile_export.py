"""The CIFAR ResNets through TorchScript, FX, torch.export and torch.compile: they trace, and a compiled train step equals eager."""
import pytest
import torch
from compile_check import assert_compiled_train_step_matches_eager

import timm_spe


@pytest.mark.parametrize('cpu_kernels', [False, True])
def test_torchscript_fx_export_compile(cpu_kernels):
    """TorchScript, FX (and TorchScript of the FX graph, as timm's own model tests do), torch.export and dynamo,
    with SPE's CPU kernels off and on (scripted code runs the plain ops). A depth-11 network: the same classes as
    the registered depths with one block a stage (timm's model suite scripts and traces resnet83_* itself)."""
    import warnings

    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    with timm_spe.set_cpu_kernels(cpu_kernels):
        m = timm_spe.resnet.CifarResNet(depth=11, attn_layer='spe').eval()  # resnet83_spe's blocks, one a stage
        x = torch.randn(2, 3, 32, 32)
        ref = m(x)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            torch.testing.assert_close(torch.jit.script(m)(x), ref)
        kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
        train_nodes, eval_nodes = get_graph_node_names(m, tracer_kwargs=kw)
        fx = create_feature_extractor(m, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                      tracer_kwargs=kw)
        torch.testing.assert_close(list(fx.eval()(x).values())[0], ref)
        with torch.no_grad():  # inference path (the kernels, where on)
            torch.testing.assert_close(list(fx.eval()(x).values())[0], ref)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            scripted_fx = torch.jit.script(fx.eval())
        with torch.no_grad():
            torch.testing.assert_close(list(scripted_fx(x).values())[0], ref)
        torch.testing.assert_close(torch.export.export(m, (x,)).module()(x), ref)
        list(fx.train()(x).values())[0].mean().backward()  # the penalty function is an FX leaf
        assert all(p.grad is not None for p in fx.parameters())
        from torch import _dynamo
        for mode in (True, False):
            assert _dynamo.explain(m.train(mode))(x).graph_break_count == 0


def test_compiled_train_step_matches_eager():
    """torch.compile (dynamo + AOTAutograd; the aot_eager backend needs no C++ compiler) traces the fused
    autograd functions, BN running-statistics updates included, with results equal to eager."""
    torch.manual_seed(0)
    assert_compiled_train_step_matches_eager(
        timm_spe.resnet.CifarResNet(depth=11, attn_layer='spe'), torch.randn(4, 3, 32, 32))
