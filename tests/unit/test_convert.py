"""timm_spe.convert: the authors' SPEM checkpoints map onto our models with identical logits."""
import argparse

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

import timm_spe  # noqa: F401
from benchmarks.spe_reference import authors_gate, authors_mix
from timm_spe.convert import (
    convert_official_state_dict,
    is_official_state_dict,
    load_checkpoint_file,
    load_weights,
    official_depth,
)


class OfficialBottleneck(nn.Module):
    """A re-implementation of the authors' models/spem.py Bottleneck (same names, shapes and forward)."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        c = planes * 4
        self.w1, self.b1 = nn.Parameter(torch.randn(1, c, 1, 1)), nn.Parameter(torch.randn(1, c, 1, 1))
        self.w2, self.b2 = nn.Parameter(torch.randn(1, c, 1, 1)), nn.Parameter(torch.randn(1, c, 1, 1))
        self.p = nn.Parameter(torch.rand(2) + 0.1)

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out = authors_gate(out, authors_mix(self.p), self.w1, self.b1, self.w2, self.b2) * out
        return self.relu(out + residual)


class OfficialSPEM(nn.Module):
    def __init__(self, depth=20, num_classes=10):
        super().__init__()
        n = (depth - 2) // 9
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(256, num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(planes * 4))
        layers = [OfficialBottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [OfficialBottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class Payload:
    """Stands for any object outside the allow-list: it must never be unpickled."""


@pytest.fixture(scope='module')
def official():
    torch.manual_seed(0)
    model = OfficialSPEM(depth=20, num_classes=10)
    with torch.no_grad():  # non-trivial BN statistics so that a wrong mapping shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


def _dataparallel_checkpoint(model, path):
    state_dict = {f'module.{k}': v for k, v in model.state_dict().items()}
    torch.save({'epoch': 164, 'state_dict': state_dict, 'best_acc': 94.8, 'optimizer': {}}, path)


def test_convert_gives_identical_logits(official, tmp_path):
    path = tmp_path / 'model_best.pth.tar'
    _dataparallel_checkpoint(official, path)
    state_dict, info = load_checkpoint_file(path)
    assert info['format'] == 'official' and info['depth'] == 20 and info['best_acc'] == 94.8
    ours = timm_spe.CifarResNet(depth=20, attn_layer='spe').eval()
    ours.load_state_dict(state_dict)  # strict: every key maps
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-5, atol=1e-5)


def test_key_mapping(official):
    sd = {f'module.{k}': v for k, v in official.state_dict().items()}
    assert is_official_state_dict(sd) and official_depth(sd) == 20
    converted = convert_official_state_dict(sd)
    assert converted['layer2.1.se.w_exc'].shape == (128,)
    torch.testing.assert_close(converted['layer2.1.se.b_rew'], official.layer2[1].b2.reshape(-1))
    assert torch.equal(converted['layer1.0.se.p'], official.layer1[0].p)
    assert not any(k.startswith('module.') for k in converted)


def test_cli_convert_and_model_check(official, tmp_path):
    from timm_spe.cli import main
    src = tmp_path / 'model_best.pth.tar'
    _dataparallel_checkpoint(official, src)
    with pytest.raises(SystemExit, match='does not match'):  # wrong depth names the mismatch
        main(['convert', str(src), '--model', 'resnet83_spe', '--out', str(tmp_path / 'bad.safetensors')])


def test_train_py_checkpoint_is_loaded_safely(tmp_path):
    model = timm.create_model('resnet83_spe')
    path = tmp_path / 'last.pth.tar'
    ns = argparse.Namespace(model='resnet83_spe', epochs=3, lr=0.1)
    torch.save({'epoch': 2, 'arch': 'resnet83_spe', 'state_dict': model.state_dict(), 'args': ns,
                'state_dict_ema': model.state_dict()}, path)
    state_dict, info = load_checkpoint_file(path)
    assert info['format'] == 'timm-train' and info['args'].epochs == 3
    assert set(state_dict) == set(model.state_dict())
    assert load_checkpoint_file(path, use_ema=True)[1]['ema'] is True


def test_untrusted_pickle_is_refused(tmp_path):
    path = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': {}, 'args': Payload()}, path)
    with pytest.raises(ValueError, match='cannot be loaded safely'):
        load_checkpoint_file(path)


def test_safetensors_and_mismatch(tmp_path):
    model = timm.create_model('resnet83_spe')
    path = tmp_path / 'w.safetensors'
    save_file(model.state_dict(), str(path))
    other = timm.create_model('resnet83_spe')
    assert load_weights(other, path)['format'] == 'safetensors'
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    with pytest.raises(ValueError, match=r'is a resnet83_spe state dict .*: give resnet83_spe \(or'):
        load_weights(timm.create_model('resnet83'), path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint_file(tmp_path / 'nope.pth')


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth.tar'])
def test_weights_of_another_model_are_named_with_the_model_that_fits(suffix, tmp_path):
    """resnet164_spe weights given as --model resnet83_spe: the error listed unexpected num_batches_tracked keys."""
    from timm_spe.cli import main
    state_dict = timm.create_model('resnet164_spe').state_dict()
    src = tmp_path / f'r164{suffix}'
    if suffix == '.safetensors':
        save_file(state_dict, str(src))
    else:
        torch.save({'epoch': 2, 'arch': 'resnet164_spe', 'state_dict': state_dict}, src)
    with pytest.raises(SystemExit) as info:
        main(['convert', str(src), '--model', 'resnet83_spe', '--out', str(tmp_path / 'o.safetensors')])
    line = str(info.value.code)
    assert line == (f"timm-spe convert: error: '{src}' is a resnet164_spe state dict (depth 164: 18 blocks per stage; "
                    f"attention: spe; read from its keys), which does not fit resnet83_spe: give resnet164_spe (or "
                    f"resnet164_spe.TAG) as the model instead.")
    assert not (tmp_path / 'o.safetensors').exists()
    with pytest.raises(SystemExit) as info:  # the model is an argument of inspect and eval, not --model
        main(['inspect', 'resnet83_spe', '--checkpoint', str(src)])
    assert str(info.value.code).startswith(f"timm-spe inspect: error: '{src}' is a resnet164_spe state dict (")


@pytest.mark.parametrize('depth', [83, 164])
def test_the_model_of_a_state_dict_is_read_from_its_keys(depth):
    """Every attention kind of the CIFAR ResNets (CIFAR_ATTN_LAYERS) is told apart by its keys, with the depth."""
    from timm_spe.convert import cifar_model_of
    from timm_spe.resnet import CIFAR_ATTN_LAYERS, cifar_model_name
    for attn in CIFAR_ATTN_LAYERS:
        name = cifar_model_name(depth, attn)
        with torch.device('meta'):
            state_dict = timm.create_model(name).state_dict()
        assert cifar_model_of(state_dict) == name
        assert cifar_model_of({f'module.{k}': v for k, v in state_dict.items()}) == name  # DataParallel keys
    with torch.device('meta'):
        assert cifar_model_of(timm.create_model('resnet18_spe').state_dict()) is None  # no CIFAR ResNet
        assert cifar_model_of(timm_spe.CifarResNet(depth=20, attn_layer='spe').state_dict()) is None  # no such model


def test_cli_convert_folder_loads_with_local_dir_and_publishes(tmp_path):
    """An official ResNet-83 SPEM checkpoint -> `timm-spe convert --out DIR` -> timm 'local-dir:' -> same logits."""
    from timm_spe.cli import main
    torch.manual_seed(3)
    official = OfficialSPEM(depth=83, num_classes=100).eval()
    src = tmp_path / 'model_best.pth.tar'
    _dataparallel_checkpoint(official, src)
    out = tmp_path / 'converted'
    main(['convert', str(src), '--model', 'resnet83_spe.cifar100', '--out', str(out)])
    assert sorted(p.name for p in out.iterdir()) == ['config.json', 'model.safetensors']
    ours = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert ours.pretrained_cfg['tag'] == 'cifar100'
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(SystemExit, match='not empty'):
        main(['convert', str(src), '--model', 'resnet83_spe.cifar100', '--out', str(out)])
    with pytest.raises(SystemExit, match=r'give --model resnet83_spe\.TAG'):
        main(['convert', str(src), '--model', 'resnet83_spe', '--out', str(tmp_path / 'untagged')])
    # publishing straight from the official checkpoint: recipe / budget say where the weights come from
    main(['publish', str(src), '--model', 'resnet83_spe', '--tag', 'cifar100', '--out', str(tmp_path / 'pub'),
          '--dry-run'])
    card = (tmp_path / 'pub' / 'README.md').read_text()
    assert "official SPEM code" in card and '164 epochs' in card and '73.87%' in card
    m = timm.create_model('resnet83_spe.cifar100', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'pub' / 'model.safetensors'))).eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), official(x), rtol=1e-5, atol=1e-5)
