"""The Eq. 8 penalty handed over to the loss is counted once from the first step, eager and compiled."""
import copy

import pytest
import torch

import timm_spe


@pytest.mark.parametrize('compiled', [False, True], ids=['eager', 'compiled'])
def test_explicit_penalty_is_counted_once_from_the_first_step(compiled):
    """README: loss = task + spe_penalty(model) counts the penalty once from the first step. spe_penalty switches
    the automatic penalty off after the forward ran: the backward must read the switch when it runs, also when
    torch.compile traced that backward while the switch was still on."""
    torch.manual_seed(0)
    model = timm_spe.CifarResNet(depth=11, attn_layer='spe')
    ref = copy.deepcopy(model)
    timm_spe.set_auto_penalty(ref, False)
    run = torch.compile(model, backend='aot_eager', fullgraph=True) if compiled else model
    x = torch.randn(2, 3, 16, 16)
    for step in range(2):
        for m, fn in ((model, run), (ref, ref)):
            m.zero_grad()
            (fn(x).square().mean() + timm_spe.spe_penalty(m)).backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=f'step {step + 1}: {name}')
