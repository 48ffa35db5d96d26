"""SRM and SGE, the SPE paper's Table 1 baselines timm lacks: reference computations, the authors' code, timm use."""
# ruff: noqa: I001  (timm_spe is imported before any name from timm.layers: those are the patched ones)
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_spe  # noqa: F401  (first: registers the names with timm's factory)
from timm_spe.sge import SgeModule
from timm_spe.srm import SrmModule

import timm
from timm.layers import create_attn, get_attn


def _randomize_(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, b in module.named_buffers():
            if name.endswith('running_mean'):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype))
            elif name.endswith('running_var'):
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + 0.5)
    return module


# ---- plain references: the formulas with explicit loops over samples, channels, groups, positions ----

def reference_srm(x, cfc, gamma, beta, running_mean, running_var, train, eps=1e-5, bn_eps=1e-5):
    """SRM of the paper (Sec. 3): style pooling, channel-wise FC, BN, sigmoid, one channel at a time."""
    N, C, H, W = x.shape
    z = torch.zeros(N, C, dtype=x.dtype)
    for n in range(N):
        for c in range(C):
            v = x[n, c].flatten()
            mu = v.sum() / v.numel()
            var = ((v - mu) ** 2).sum() / (v.numel() - 1)
            z[n, c] = cfc[c, 0] * mu + cfc[c, 1] * torch.sqrt(var + eps)
    if train:  # batch statistics (biased variance), as BN normalises in training
        m = z.mean(0)
        v = ((z - m) ** 2).mean(0)
    else:
        m, v = running_mean, running_var
    g = 1 / (1 + torch.exp(-((z - m) / torch.sqrt(v + bn_eps) * gamma + beta)))
    return x * g[:, :, None, None]


def reference_sge(x, weight, bias, groups, eps=1e-5):
    """SGE of the paper (Sec. 3): per group, similarity to the mean feature, normalise, scale/shift, sigmoid."""
    N, C, H, W = x.shape
    cg = C // groups
    out = torch.empty_like(x)
    for n in range(N):
        for gi in range(groups):
            feats = x[n, gi * cg:(gi + 1) * cg]  # cg x H x W
            g_mean = feats.sum(dim=(1, 2)) / (H * W)  # the group's global average feature
            c = torch.stack([torch.dot(feats[:, i, j], g_mean) for i in range(H) for j in range(W)])
            c = c - c.mean()
            std = torch.sqrt(((c - c.mean()) ** 2).sum() / (c.numel() - 1))
            a = (c / (std + eps)) * weight.flatten()[gi] + bias.flatten()[gi]
            out[n, gi * cg:(gi + 1) * cg] = feats * torch.sigmoid(a).view(1, H, W)
    return out


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('eps', [1e-5, 0.0])
def test_srm_matches_plain_reference(train, eps):
    """SrmModule's output and gradients equal the loop-by-loop formulas, in train (batch stats) and eval."""
    torch.manual_seed(0)
    m = _randomize_(SrmModule(6, eps=eps).double()).train(train)
    x = torch.randn(3, 6, 5, 4, dtype=torch.double, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ref_params = [p.detach().clone().requires_grad_() for p in (m.cfc, m.bn.weight, m.bn.bias)]
    rm, rv = m.bn.running_mean.clone(), m.bn.running_var.clone()
    out = m(x)
    ref = reference_srm(x_ref, *ref_params, rm, rv, train, eps=eps)
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for p, r in zip((m.cfc, m.bn.weight, m.bn.bias), ref_params):
        torch.testing.assert_close(p.grad, r.grad)


@pytest.mark.parametrize('groups', [1, 2, 4])
def test_sge_matches_plain_reference(groups):
    """SgeModule's output and gradients equal the loop-by-loop formulas for several group counts."""
    torch.manual_seed(0)
    m = _randomize_(SgeModule(8, groups=groups).double())
    x = torch.randn(2, 8, 4, 5, dtype=torch.double, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    w_ref, b_ref = m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()
    out = m(x)
    ref = reference_sge(x_ref, w_ref, b_ref, groups)
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(m.weight.grad, w_ref.grad)
    torch.testing.assert_close(m.bias.grad, b_ref.grad)


# ---- the authors' modules, re-implemented with their names, shapes and order of operations ----

class AuthorsSRMLayer(nn.Module):
    """hyunjaelee410/style-based-recalibration-module, models/recalibration_modules.py ``SRMLayer``:
    ``cfc`` (C x 2, zeros), ``bn`` (BatchNorm2d); style pooling on an N x C x HW view, either
    ``std`` (first version, ``eps=None``) or ``sqrt(var + eps)`` (later version)."""

    def __init__(self, channel, eps=1e-5):
        super().__init__()
        self.cfc = nn.Parameter(torch.zeros(channel, 2))
        self.bn = nn.BatchNorm2d(channel)
        self.eps = eps

    def forward(self, x):
        n, c = x.shape[:2]
        flat = x.view(n, c, -1)
        mean = flat.mean(dim=2, keepdim=True)
        std = flat.std(dim=2, keepdim=True) if self.eps is None else (flat.var(dim=2, keepdim=True) + self.eps).sqrt()
        style = torch.cat((mean, std), dim=2)  # N x C x 2
        z = (style * self.cfc[None]).sum(dim=2)[:, :, None, None]
        return x * torch.sigmoid(self.bn(z))


class AuthorsSpatialGroupEnhance(nn.Module):
    """implus/PytorchInsight, classification/models/imagenet/resnet_sge.py ``SpatialGroupEnhance``:
    ``weight`` (zeros) and ``bias`` (ones), 1 x G x 1 x 1; computed on an (N*G) x C/G x H x W view."""

    def __init__(self, groups=64):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))

    def forward(self, x):
        b, c, h, w = x.size()
        xg = x.view(b * self.groups, -1, h, w)
        sim = (xg * F.adaptive_avg_pool2d(xg, 1)).sum(dim=1, keepdim=True).view(b * self.groups, -1)
        sim = sim - sim.mean(dim=1, keepdim=True)
        sim = sim / (sim.std(dim=1, keepdim=True) + 1e-5)
        sim = sim.view(b, self.groups, h, w) * self.weight + self.bias
        return (xg * torch.sigmoid(sim.view(b * self.groups, 1, h, w))).view(b, c, h, w)


def test_state_dicts_are_the_authors():
    """Same state-dict keys and shapes as the authors' modules, and the same initial values."""
    for ours, theirs in [(SrmModule(32), AuthorsSRMLayer(32)), (SgeModule(128), AuthorsSpatialGroupEnhance(64))]:
        a, b = ours.state_dict(), theirs.state_dict()
        assert list(a) == list(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize('eps', [1e-5, None])
@pytest.mark.parametrize('train', [True, False])
def test_srm_equals_authors_code(eps, train):
    """The authors' SRMLayer's weights load into SrmModule unchanged and give the same output; eps=None is
    their first version (torch.std), matched by SrmModule(eps=0)."""
    theirs = _randomize_(AuthorsSRMLayer(16, eps=eps), seed=1).train(train)
    ours = SrmModule(16, eps=0.0 if eps is None else eps).train(train)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 16, 8, 8)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.bn.running_mean, theirs.bn.running_mean)


@pytest.mark.parametrize('groups', [64, 16])
def test_sge_equals_authors_code(groups):
    """The authors' SpatialGroupEnhance's weights load into SgeModule unchanged and give the same output."""
    theirs = _randomize_(AuthorsSpatialGroupEnhance(groups), seed=2)
    ours = SgeModule(256, groups=groups)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 256, 8, 8)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('model_name,authors_cls', [
    ('resnet83_srm', AuthorsSRMLayer), ('resnet83_sge', AuthorsSpatialGroupEnhance)])
@pytest.mark.parametrize('train', [False, True])
def test_logits_equal_after_weight_transfer(model_name, authors_cls, train):
    """A CIFAR ResNet whose every attention layer is the authors' module, loaded with our weights
    (strict), gives our model's logits (eval: running stats; train: batch stats)."""
    torch.manual_seed(0)
    ours = timm.create_model(model_name, num_classes=10)
    for block in [b for stage in (ours.layer1, ours.layer2, ours.layer3) for b in stage]:
        _randomize_(block.se, seed=block.se.channels)
    theirs = copy.deepcopy(ours)
    n_swapped = 0
    for stage in (theirs.layer1, theirs.layer2, theirs.layer3):
        for block in stage:
            mod = authors_cls(block.se.channels) if authors_cls is AuthorsSRMLayer else authors_cls(64)
            mod.load_state_dict(block.se.state_dict())
            block.se = mod
            n_swapped += 1
    assert n_swapped == 27
    ours.train(train)
    theirs.train(train)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


# ---- initial state, options, errors ----

def test_fresh_gates_are_the_authors_init():
    """Freshly made: SRM's gate is sigmoid(0) = 1/2 (cfc zeros), SGE's is sigmoid(1) everywhere (weight 0, bias 1)."""
    x = torch.randn(2, 64, 6, 6)
    torch.testing.assert_close(SrmModule(64).eval()(x), x * 0.5)
    torch.testing.assert_close(SgeModule(64)(x), x * torch.sigmoid(torch.tensor(1.0)))


@pytest.mark.parametrize('cls', [SrmModule, SgeModule])
def test_timm_attn_kwargs_ignored_others_raise(cls):
    """Generic timm attention kwargs (act_layer, rd_ratio...) are accepted and ignored; unknown ones raise."""
    m = cls(64, act_layer=nn.ReLU, rd_ratio=0.25, rd_divisor=8, gate_layer='sigmoid')
    assert sum(p.numel() for p in m.parameters()) == (4 * 64 if cls is SrmModule else 2 * 64)
    with pytest.raises(TypeError, match='unexpected arguments'):
        cls(64, reduction=16)


def test_bad_arguments():
    """Channels not a multiple of the groups, or negative eps, are refused with a clear message."""
    with pytest.raises(ValueError, match='multiple of groups'):
        SgeModule(48, groups=64)
    with pytest.raises(ValueError, match='positive'):
        SrmModule(0)
    with pytest.raises(ValueError, match='eps'):
        SrmModule(8, eps=-1.0)


@pytest.mark.parametrize('cls', [SrmModule, SgeModule])
def test_channels_last_script_and_bf16(cls):
    """channels_last input and TorchScript give the same output; a bf16 input gives a bf16 output."""
    m = _randomize_(cls(64)).eval()
    x = torch.randn(2, 64, 7, 5)
    out = m(x)
    torch.testing.assert_close(m(x.to(memory_format=torch.channels_last)), out)
    torch.testing.assert_close(torch.jit.script(m)(x), out)
    assert m(x.bfloat16()).dtype == torch.bfloat16


# ---- timm integration: names, timm's own models, registered CIFAR variants ----

def test_names_resolve():
    """'srm' and 'sge' resolve through timm's get_attn / create_attn, case-insensitively."""
    assert get_attn('srm') is SrmModule and get_attn('SGE') is SgeModule
    assert isinstance(create_attn('srm', 32), SrmModule)
    m = create_attn('sge', 128, groups=32)
    assert isinstance(m, SgeModule) and m.groups == 32


@pytest.mark.parametrize('attn_layer,cls', [('srm', SrmModule), ('sge', SgeModule)])
def test_in_timm_resnet(attn_layer, cls):
    """attn_layer='srm' / 'sge' in timm's own ResNet: one layer per block, trains (gradients reach it)."""
    m = timm.create_model('resnet18', num_classes=5, block_args=dict(attn_layer=attn_layer))
    layers = [x for x in m.modules() if isinstance(x, cls)]
    assert len(layers) == 8 and layers[0].channels == 64 and layers[-1].channels == 512
    out = m(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for x in layers for p in x.parameters())


@pytest.mark.parametrize('attn', ['srm', 'sge'])
def test_registered_cifar_variants(attn):
    """resnet{83,164,245,326}_srm / _sge are registered, with the layer after bn3 of every block."""
    assert {f'resnet{d}_{attn}' for d in timm_spe.CIFAR_DEPTHS} <= set(timm.list_models(f'*_{attn}'))
    m = timm.create_model(f'resnet83_{attn}')
    cls = SrmModule if attn == 'srm' else SgeModule
    assert [type(b.se) for s in (m.layer1, m.layer2, m.layer3) for b in s] == [cls] * 27
    if attn == 'sge':
        assert {b.se.groups for s in (m.layer1, m.layer2, m.layer3) for b in s} == {64}


def _resnet164_params(attn, num_classes, **attn_kwargs):
    with torch.device('meta'):
        m = timm.create_model(f'resnet164_{attn}', num_classes=num_classes, attn_kwargs=attn_kwargs or None)
    return sum(p.numel() for p in m.parameters())


def test_paper_counts_imply_sge_groups_8_to_64():
    """Table 1's rounded SGE counts (1.71M / 1.73M) hold for 8, 16, 32 and 64 groups (64 divides every
    width), not for 4: the authors' 64 is one of the options the paper's numbers allow."""
    for groups in (8, 16, 32, 64):
        assert round(_resnet164_params('sge', 10, groups=groups) / 1e6, 2) == 1.71
        assert round(_resnet164_params('sge', 100, groups=groups) / 1e6, 2) == 1.73
    assert round(_resnet164_params('sge', 10, groups=4) / 1e6, 2) == 1.70


def test_srm_param_count_is_four_per_channel():
    """ResNet164 + SRM adds exactly 4 parameters per attended channel (cfc 2 + BN 2): 54 blocks, 8064 channels."""
    with torch.device('meta'):
        plain = sum(p.numel() for p in timm.create_model('resnet164', num_classes=10).parameters())
    channels = 18 * (64 + 128 + 256)
    assert _resnet164_params('srm', 10) - plain == 4 * channels
    assert math.isclose(_resnet164_params('sge', 10) - plain, 54 * 2 * 64)


def test_srm_conv1d_formulation_is_the_same():
    """The channel-wise FC as a grouped Conv1d (kernel 2, no bias) on the N x C x 2 style tensor, with
    weight cfc.view(C, 1, 2), gives SrmModule's output."""
    m = _randomize_(SrmModule(12), seed=3).train()
    x = torch.randn(4, 12, 6, 6)
    conv = nn.Conv1d(12, 12, kernel_size=2, groups=12, bias=False)
    with torch.no_grad():
        conv.weight.copy_(m.cfc.view(12, 1, 2))
    bn = copy.deepcopy(m.bn)
    flat = x.flatten(2)
    style = torch.stack((flat.mean(2), (flat.var(2) + 1e-5).sqrt()), dim=2)  # N x C x 2
    ref = x * torch.sigmoid(bn(conv(style).unsqueeze(-1)))
    torch.testing.assert_close(m(x), ref)
