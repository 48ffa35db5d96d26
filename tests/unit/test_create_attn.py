"""attn_layer='spe' inside timm's own models through timm's attention factory."""
# ruff: noqa: I001  (timm_spe is imported before any name from timm.layers: those are the patched ones)
from functools import partial

import pytest
import torch

import timm_spe  # first: names imported from timm.layers before it are timm's originals
from timm_spe import SpeModule

import timm
from timm.layers import EcaModule, SEModule, create_attn, get_attn
from timm.layers.cbam import CbamModule


def test_names_resolve():
    assert get_attn('spe') is SpeModule
    assert get_attn('SPE') is SpeModule
    assert get_attn('spe_paper').keywords == dict(formulation='paper')
    m = create_attn('spe_paper', 32)
    assert isinstance(m, SpeModule) and m.formulation == 'paper'


def test_other_names_unchanged():
    assert get_attn('se') is SEModule and get_attn('eca') is EcaModule and get_attn('cbam') is CbamModule
    assert get_attn(None) is None and get_attn('') is None and get_attn(True) is SEModule
    assert get_attn(SpeModule) is SpeModule
    with pytest.raises(AssertionError, match='Invalid attn module'):
        get_attn('nope')


def test_registration_is_idempotent():
    timm_spe.register_attn_layers()
    timm_spe.register_attn_layers()
    assert get_attn('se') is SEModule and get_attn('spe') is SpeModule


@pytest.mark.parametrize('attn_layer,formulation', [
    ('spe', 'official'), ('spe_paper', 'paper'), (partial(SpeModule, formulation='paper'), 'paper')])
def test_spe_in_timm_resnet(attn_layer, formulation):
    m = timm.create_model('resnet18', num_classes=5, block_args=dict(attn_layer=attn_layer))
    spe = [x for x in m.modules() if isinstance(x, SpeModule)]
    assert len(spe) == 8 and all(s.formulation == formulation for s in spe)
    assert spe[0].channels == 64 and spe[-1].channels == 512
    out = m(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(s.p.grad is not None for s in spe)


def test_spe_in_other_timm_families():
    """Modules that bound timm's get_attn by name (cspnet, efficientnet builder) resolve 'spe' too."""
    import timm.models._efficientnet_builder as effnet_builder
    import timm.models.cspnet as cspnet
    assert cspnet.get_attn is timm_spe.get_attn and effnet_builder.get_attn is timm_spe.get_attn
    attn_layer, _ = cspnet._get_attn_fn(dict(attn_layer='spe', attn_kwargs=dict(formulation='paper')))
    block = cspnet.BottleneckBlock(32, 32, attn_layer=attn_layer)
    assert any(isinstance(x, SpeModule) and x.formulation == 'paper' for x in block.modules())
    assert block(torch.randn(1, 32, 8, 8)).shape == (1, 32, 8, 8)


def test_spe_in_efficientnet():
    """EfficientNet builds its SE layer through get_attn and passes rd_ratio/act_layer: SPE accepts them."""
    m = timm.create_model('efficientnet_b0', se_layer='spe', num_classes=3)
    assert sum(isinstance(x, SpeModule) for x in m.modules()) == 16
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_registered_imagenet_variant():
    m = timm.create_model('resnet50_spe')
    assert sum(isinstance(x, SpeModule) for x in m.modules()) == 16
    assert m.pretrained_cfg['input_size'] == (3, 224, 224)
