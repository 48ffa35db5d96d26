"""The CPU kernels under torch.compile: traced through their fake implementations, without graph breaks."""
import torch
from compile_check import assert_compiled_train_step_matches_eager

import timm_spe


def test_compile_traces_kernels_without_graph_breaks(cpu_kernels_on):
    from torch import _dynamo
    torch.manual_seed(0)
    m = timm_spe.resnet.CifarResNet(depth=11, attn_layer='spe')
    x = torch.randn(4, 3, 32, 32)
    for mode in (True, False):
        with torch.no_grad():
            m.train(mode)
            explained = _dynamo.explain(m)(x)
            assert explained.graph_break_count == 0
            assert any('timm_spe' in str(node.target) for g in explained.graphs for node in g.graph.nodes)
    assert_compiled_train_step_matches_eager(m, x)
