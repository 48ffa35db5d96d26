"""CIFAR ResNet family: architecture, parameter counts vs the paper, timm model contract."""
import re

import pytest
import timm
import torch
from helpers import ROOT

import timm_spe
from timm_spe import SpeModule

# Parameter counts (millions, as printed) from the paper's Tables 1 and 2.
PAPER_PARAMS_M = {
    ('resnet83', 10): 0.87, ('resnet83_spe', 10): 0.89, ('resnet83', 100): 0.89, ('resnet83_spe', 100): 0.91,
    ('resnet164', 10): 1.70, ('resnet164_spe', 10): 1.74, ('resnet164', 100): 1.73, ('resnet164_spe', 100): 1.76,
    ('resnet245', 10): 2.54, ('resnet245_spe', 10): 2.59, ('resnet245', 100): 2.56, ('resnet245_spe', 100): 2.61,
    ('resnet326', 10): 3.37, ('resnet326_spe', 10): 3.44, ('resnet326', 100): 3.40, ('resnet326_spe', 100): 3.46,
    ('resnet164_se', 10): 1.91, ('resnet164_se', 100): 1.93,
    ('resnet164_cbam', 10): 1.92, ('resnet164_cbam', 100): 1.94,
    ('resnet164_eca', 10): 1.70,
    ('resnet164_srm', 10): 1.74, ('resnet164_srm', 100): 1.76,
    ('resnet164_sge', 10): 1.71, ('resnet164_sge', 100): 1.73,
    # Table 1 lists ResNet164 + ECA on CIFAR-100 as 1.72M, fewer than the plain ResNet164 (1.73M) it
    # adds parameters to: a typo in the paper, so that one entry is not checked.
}


@pytest.mark.parametrize('name,num_classes', sorted(PAPER_PARAMS_M))
def test_param_count_matches_paper(name, num_classes):
    with torch.device('meta'):
        model = timm.create_model(name, num_classes=num_classes)
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 2) == PAPER_PARAMS_M[(name, num_classes)], n


def test_list_models():
    """The registered models are the variant tables of timm_spe/resnet.py, named resnet<depth>[_<attn>]: every depth x
    attention kind and the ImageNet SPE ResNets, nothing else. (Which kinds the tables must hold is PAPER_PARAMS_M's
    business above: the paper's Tables 1 and 2.)"""
    depths, attns, imagenet = timm_spe.CIFAR_DEPTHS, timm_spe.resnet.CIFAR_ATTN_LAYERS, timm_spe.resnet.IMAGENET_MODELS
    cifar = {f'resnet{depth}' + (f'_{attn}' if attn else '') for depth in depths for attn in attns}
    assert cifar <= set(timm.list_models('resnet*'))
    assert set(timm_spe.model_names()) == cifar | set(imagenet)
    assert len(timm_spe.model_names()) == len(depths) * len(attns) + len(imagenet)  # no name made twice
    assert {'resnet50_spe', 'resnet83_spe', 'resnet164_spe'} <= set(timm.list_models('*spe*'))
    assert 'resnet164_spe.cifar100' not in timm.list_pretrained('resnet164_spe*')  # registered, but no weights


def _comment(text: str, code: str) -> str:
    """The comment after ``code`` on its line of ``text``."""
    line = next(line for line in text.splitlines() if code in line)
    return line.split('#', 1)[1].strip()


def _names(comment: str) -> list:
    """``'resnet83_spe, resnet18/50/101_spe'`` -> the names it lists, ``resnet18/50/101_spe`` as three."""
    names = []
    for item in comment.split(', '):
        m = re.fullmatch(r'resnet([\d/]+)(_\w+)?', item)
        assert m, f'not a model name (list): {item!r}'
        names += [f'resnet{depth}{m.group(2) or ""}' for depth in m.group(1).split('/')]
    return names


def test_readme_lists_the_registered_models():
    """README's Usage names the models by hand: they are the registry's. A depth or attention kind added to the
    variant tables of timm_spe/resnet.py fails here until README says it too (so does docs/design_space.md's
    resnet{<depths>}_<attn>)."""
    readme = (ROOT / 'README.md').read_text()
    listed = _names(_comment(readme, "timm.list_models('*spe*')"))
    assert sorted(listed) == sorted(timm.list_models('*spe*')), f'README lists {listed}'
    baselines = _comment(readme, "timm.create_model('resnet164_se')").split('baselines: ')[1].split(', ')
    assert baselines == [f'_{attn}' for attn in timm_spe.resnet.CIFAR_ATTN_LAYERS if attn not in ('', 'spe')]
    design_space = (ROOT / 'docs' / 'design_space.md').read_text()
    depth_lists = re.findall(r'`resnet\{([\d,]+)\}_<attn>`', design_space)
    assert depth_lists and all(tuple(map(int, d.split(','))) == timm_spe.CIFAR_DEPTHS for d in depth_lists), depth_lists


def test_architecture_follows_authors_code():
    m = timm.create_model('resnet83_spe')  # n = 9
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and m.conv1.out_channels == 16
    assert not hasattr(m, 'maxpool')
    for stage, (width, stride) in enumerate([(16, 1), (32, 2), (64, 2)], start=1):
        blocks = getattr(m, f'layer{stage}')
        assert len(blocks) == 9
        first = blocks[0]
        assert first.conv1.kernel_size == (1, 1) and first.conv2.kernel_size == (3, 3)
        assert first.conv2.stride == (stride, stride) and first.conv3.out_channels == 4 * width
        assert first.downsample is not None and first.downsample[0].stride == (stride, stride)
        assert all(b.downsample is None for b in blocks[1:])
        assert all(isinstance(b.se, SpeModule) and b.se.channels == 4 * width for b in blocks)
    assert m.fc.in_features == 256
    assert [f['num_chs'] for f in m.feature_info] == [16, 64, 128, 256]
    assert [f['reduction'] for f in m.feature_info] == [1, 1, 2, 4]


def test_init_as_authors():
    torch.manual_seed(0)
    m = timm.create_model('resnet164')
    conv = m.layer3[5].conv2
    std = (2. / (3 * 3 * conv.out_channels)) ** 0.5
    assert abs(conv.weight.std().item() - std) / std < 0.05
    assert torch.equal(m.layer2[0].bn3.weight, torch.ones(512 // 4))
    assert torch.equal(m.layer2[0].bn3.bias, torch.zeros(512 // 4))


@pytest.mark.parametrize('depth', [21, 164.0, 2, 0, 165])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match=r'9n \+ 2'):
        timm_spe.CifarResNet(depth=depth)


def test_attn_kwargs_reach_layer():
    m = timm.create_model('resnet83_spe', attn_kwargs=dict(formulation='paper', eta=0.2))
    se = m.layer1[0].se
    assert se.formulation == 'paper' and se.eta == 0.2
    with pytest.raises(ValueError, match='no attn_layer'):
        timm.create_model('resnet83', attn_kwargs=dict(eta=0.2))


def test_forward_api():
    m = timm.create_model('resnet83_spe', num_classes=100, drop_rate=0.1, drop_path_rate=0.1).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_features(x)
    assert feats.shape == (2, 256, 8, 8)
    assert m.forward_head(feats, pre_logits=True).shape == (2, 256)
    assert m(x).shape == (2, 100)
    final, inter = m.forward_intermediates(x)
    torch.testing.assert_close(final, feats)
    assert [t.shape[1:] for t in inter] == [(16, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]
    assert len(m.forward_intermediates(x, indices=[1, 3], intermediates_only=True)) == 2
    m.set_grad_checkpointing()
    torch.testing.assert_close(m(x), m.eval()(x))
    assert m.get_classifier() is m.fc and m.get_classifier(name_only=True) == 'fc'
    m.reset_classifier(7)
    assert m(x).shape == (2, 7)
    assert set(m.group_matcher()) == {'stem', 'blocks'}


def test_reset_classifier_keeps_the_pool_and_the_models_dtype_and_mode_as_timm_resnet_does():
    """timm 1.0.31's model tests check this contract for every registered model (ours included), whatever timm."""
    m = timm.create_model('resnet83_spe', global_pool='max', in_chans=3).eval()
    assert m.in_chans == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = m.forward_head(m.forward_features(x), pre_logits=True)
        m.reset_classifier(5)  # keeps 'max'
        torch.testing.assert_close(m.forward_head(m.forward_features(x), pre_logits=True), pooled)
        assert m(x).shape == (2, 5)
        m.reset_classifier(5, 'catavgmax')  # concatenated pooling: twice the width before the classifier
        assert m.head_hidden_size == 512 == m.forward_head(m.forward_features(x), pre_logits=True).shape[1]
        assert m(x).shape == (2, 5)
    assert timm.create_model('resnet83_spe', global_pool='catavgmax', num_classes=0)(x).shape == (2, 512)
    for train in (False, True):
        m.to(torch.float64).train(train)
        m.reset_classifier(3)
        assert m.fc.weight.dtype == torch.float64 and all(mod.training == train for mod in m.modules())


def test_pruned_model_ends_at_its_last_kept_feature_and_still_checkpoints():
    x = torch.randn(2, 3, 32, 32)
    m = timm.create_model('resnet83_spe').train()
    take = m.prune_intermediate_layers((0, 1, 2, 3))  # all stages kept, the head goes
    m.set_grad_checkpointing()
    final, inter = m.forward_intermediates(x, indices=take)
    assert len(inter) == 4 and m(x).shape == (2, 256, 8, 8)  # no head: no pooling either
    (final.sum() + m.forward_features(x).sum()).backward()
    m = timm.create_model('resnet83_spe').eval()
    with torch.no_grad():
        tap = m.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
        m.prune_intermediate_layers([1], prune_head=False)  # stages 2-3 gone: so is the head sized for them
        torch.testing.assert_close(m.forward_features(x), tap, rtol=0, atol=0)
        assert m.num_features == m.head_hidden_size == 64 and m(x).shape == (2, 64, 32, 32)
        m.reset_classifier(7, 'avg')
        assert m(x).shape == (2, 7)
    m.train().set_grad_checkpointing()  # checkpoint_seq(flatten=True) over the emptied stages
    m(x).sum().backward()


def test_in_chans_and_features_only():
    m = timm.create_model('resnet83_spe', in_chans=1)
    assert m(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    f = timm.create_model('resnet164_spe', features_only=True, out_indices=(1, 2, 3))
    outs = f(torch.randn(1, 3, 32, 32))
    assert [o.shape[1] for o in outs] == f.feature_info.channels() == [64, 128, 256]


def test_pretrained_cfgs():
    for tag, classes in (('cifar10', 10), ('cifar100', 100)):
        m = timm.create_model(f'resnet164_spe.{tag}')
        cfg = m.pretrained_cfg
        assert cfg['num_classes'] == classes and m.num_classes == classes
        assert cfg['input_size'] == (3, 32, 32) and cfg['crop_pct'] == 1.0
        assert cfg['mean'] == (0.4914, 0.4822, 0.4465) and cfg['std'] == (0.2023, 0.1994, 0.2010)
        assert cfg['first_conv'] == 'conv1' and cfg['classifier'] == 'fc'
        assert not cfg.get('hf_hub_id') and len(cfg['label_names']) == classes  # no weights published yet


def test_penalty_reaches_every_block():
    m = timm.create_model('resnet83_spe').train()
    x = torch.randn(2, 3, 32, 32)
    m(x).sum().backward()
    auto = [b.se.p.grad.clone() for s in (m.layer1, m.layer2, m.layer3) for b in s]
    m.zero_grad()
    m(x).sum().backward()  # same input, same BN batch stats: same grads
    m.zero_grad()
    (m(x).sum() + timm_spe.spe_penalty(m)).backward()
    explicit = [b.se.p.grad for s in (m.layer1, m.layer2, m.layer3) for b in s]
    assert len(auto) == 27
    for a, e in zip(auto, explicit):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_default_tags():
    """resnet164_spe and its plain control default to the weights trained here; the paper-schedule tags (no weights)
    are not listed, and a model without trained weights defaults to its paper-schedule tag."""
    assert timm.create_model('resnet164_spe').pretrained_cfg['tag'] == 'cifar10_e30'
    assert timm.create_model('resnet164').pretrained_cfg['tag'] == 'cifar10_e30'
    assert timm.create_model('resnet83').pretrained_cfg['tag'] == 'cifar10'
    assert timm.list_pretrained('resnet164_spe*') == ['resnet164_spe.cifar10_e30']
    assert timm.list_pretrained('resnet164*') == ['resnet164.cifar10_e30', 'resnet164_spe.cifar10_e30']  # docs/hub.md


def _unfused_copy(model):
    """The same weights run through timm's own Bottleneck.forward (x * gate, then += shortcut, ReLU)."""
    import copy

    from timm.models.resnet import Bottleneck
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, timm_spe.resnet.SpeBottleneck):
            m.__class__ = Bottleneck
    return ref


@pytest.mark.parametrize('train', [False, True])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_fused_spe_block_matches_timm_block(train, memory_format):
    torch.manual_seed(0)
    m = timm.create_model('resnet83_spe')
    assert isinstance(m.layer2[1], timm_spe.resnet.SpeBottleneck)
    assert type(timm.create_model('resnet83_se').layer2[1]).__name__ == 'Bottleneck'
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref = _unfused_copy(m).double()  # timm's Bottleneck.forward in float64: the ground truth
    m.train(train).to(memory_format=memory_format)
    ref.train(train)
    x = torch.randn(4, 3, 32, 32)
    out, out_ref = m(x.contiguous(memory_format=memory_format)), ref(x.double())
    torch.testing.assert_close(out, out_ref.float(), rtol=1e-5, atol=1e-5)
    if train:
        out.square().mean().backward()
        out_ref.square().mean().backward()
        for (name, p), q in zip(m.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad.float(), rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), c in zip(m.named_buffers(), ref.buffers()):  # running statistics, num_batches_tracked
        torch.testing.assert_close(b, c.to(b.dtype), msg=name)


def test_drop_path_uses_unfused_path():
    m = timm.create_model('resnet83_spe', drop_path_rate=0.2).eval()
    ref = _unfused_copy(m)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m(x), ref(x))


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_fx_feature_extraction_finds_the_blocks_named_modules_in_train_and_eval_mode(mode):
    """Train mode: bn3, se and act3 of every block are extractable (FX takes the module-by-module tail there, as
    hooks and torch.jit.trace do), with the eager values, and the extractor's backward keeps the Eq. 8 penalty. Eval
    mode keeps the inference tail so that FX equals eager bit for bit (timm's model tests): bn3 and act3 are nodes,
    se's multiply is fused into the residual add (docs/design.md says so)."""
    import copy
    import warnings

    from torchvision.models.feature_extraction import create_feature_extractor
    torch.manual_seed(0)
    m = getattr(timm.create_model('resnet83_spe'), mode)()
    for spe in (mod for mod in m.modules() if isinstance(mod, SpeModule)):
        torch.nn.init.normal_(spe.w_exc)
        torch.nn.init.normal_(spe.w_rew)
        spe.p.data = torch.rand(2)
    names = ['layer1.0.bn3', 'layer1.0.act3', 'layer3.8.act3'] + (['layer1.0.se', 'layer3.8.se'] if mode == 'train' else [])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torchvision: train and eval graphs differ
        fx = create_feature_extractor(copy.deepcopy(m), train_return_nodes={n: n for n in names},
                                      eval_return_nodes={n: n for n in names if not n.endswith('.se')})
    got = getattr(fx, mode)()(x := torch.randn(4, 3, 32, 32))
    if mode == 'eval':
        assert torch.equal(got['layer3.8.act3'], m.forward_features(x))  # bit for bit
    seen = {}
    for n in names:
        m.get_submodule(n).register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o.clone()))
    m(x)
    assert sorted(got) == sorted(names)
    for n in names:  # train: the eager blocks without hooks run the fused training function (other rounding)
        torch.testing.assert_close(got[n], seen[n], **(dict(rtol=1e-4, atol=1e-4) if mode == 'train' else {}))
    if mode == 'train':
        for model, out in ((fx, got), (m, seen)):
            model.zero_grad()
            (out['layer3.8.se'].sum() * 0).backward()
        p_fx, p_eager = fx.get_submodule('layer3.8.se').p, m.get_submodule('layer3.8.se').p
        torch.testing.assert_close(p_fx.grad, 2 * 0.1 * p_fx.detach())  # zero loss: the penalty's gradient alone
        torch.testing.assert_close(p_eager.grad, p_fx.grad)


@pytest.mark.parametrize('pretrained', [False, True])
def test_a_tag_the_model_does_not_have_names_the_tags_it_has_and_those_with_weights(pretrained):
    """A retired tag (cifar10_cpu2h) or a typo: timm said only 'Invalid pretrained tag'; the CLI lists the tags."""
    with pytest.raises(RuntimeError, match=r'Invalid pretrained tag \(cifar10_cpu2h\) for resnet164_spe') as err:
        timm.create_model('resnet164_spe.cifar10_cpu2h', pretrained=pretrained)
    with_weights = [name.split('.', 1)[1] for name in timm.list_pretrained('resnet164_spe.*')]
    assert with_weights and f'with weights {with_weights}' in str(err.value)
    assert "its tags are ['cifar10', " in str(err.value) and 'pretrained_cfg_overlay' in str(err.value)
    assert timm.create_model('resnet164_spe.cifar100').pretrained_cfg['tag'] == 'cifar100'  # known tags still work
