""" torch.hub entry points: one per model that ``import timm_spe`` registers with timm

    torch.hub.load('<owner>/timm-spe', 'resnet164_spe', pretrained=True)      # CIFAR-10 weights, its default tag
    torch.hub.load('path/to/timm-spe', 'resnet83_spe', source='local', num_classes=100)
    torch.hub.list('<owner>/timm-spe')             # every entry point; torch.hub.help(...) describes one

Each entry point is ``timm.create_model(name, pretrained=pretrained, **kwargs)``, so every keyword timm takes passes
through (``num_classes``, ``in_chans``, ``features_only``, ``pretrained_cfg='<tag>'`` for another pretrained tag,
``pretrained_cfg_overlay=dict(file=...)``...). Pretrained weights are this repository's shipped files
(``hub_cards/<model>.<tag>/model.safetensors``) or Hub downloads, checked against the sha256 recorded in
``timm_spe/registry.py`` before anything is loaded, as every load of the package is. The entry points are made
from timm's registry (``timm_spe.model_names()``): a model registered in the package has one without a change here.
"""
import json as _json
from pathlib import Path as _Path

import timm as _timm

import timm_spe as _timm_spe

dependencies = ['torch', 'torchvision', 'timm', 'huggingface_hub', 'safetensors', 'yaml']

_CARDS = _Path(__file__).resolve().parent / 'hub_cards'


def _top1(model_tag):
    """The staged eval.json's top-1 of a tag and what it was measured on ('' if this checkout has none)."""
    try:
        result = _json.loads((_CARDS / model_tag / 'eval.json').read_text())
        return f", {result['top1']:.2f} % top-1 on the {result['data_label']}, {result['num_images']:,} images"
    except (OSError, ValueError, KeyError, TypeError):
        return ''


def _doc(name):
    lines = [f'{name}: {_timm.models.model_entrypoint(name).__doc__.strip()}']
    default = f'{name}.{_timm.models.get_pretrained_cfg(name).tag}'
    tags = sorted(_timm.list_pretrained(f'{name}.*'), key=lambda t: t != default)  # the default tag first
    if tags:
        lines.append('Pretrained tags (pretrained=True loads the first; pretrained_cfg=TAG another):')
        lines += [f"  {t.split('.', 1)[1]}: {_timm.models.get_pretrained_cfg(t).num_classes} classes{_top1(t)}"
                  for t in tags]
    else:
        lines.append('No pretrained weights yet (pretrained=True says how to train and record them).')
    lines.append(f"Returns timm.create_model('{name}', pretrained=pretrained, **kwargs); any keyword of timm's\n"
                 'passes through, e.g. num_classes=100, in_chans=1, features_only=True, '
                 'pretrained_cfg_overlay=dict(file=PATH).')
    return '\n'.join(lines)


def _entry_point(name):
    def entry_point(pretrained=False, **kwargs):
        return _timm.create_model(name, pretrained=pretrained, **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = _doc(name)
    return entry_point


for _name in _timm_spe.model_names():
    globals()[_name] = _entry_point(_name)
