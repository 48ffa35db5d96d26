""" Building our models the timm way, with a pretrained load that reads only verified safetensors

The layer between the weights stack (:mod:`timm_spe.registry`, :mod:`timm_spe.pretrained`, :mod:`timm_spe.hub`) and
the model files, like timm's ``_builder.py``: :func:`build_spe_model` is timm's ``build_model_with_cfg`` after
:func:`resolve_pretrained_weights` has resolved the pretrained config as timm does, fetched ``model.safetensors``
(and nothing else) if it comes from the Hub, checked it against the recorded sha256 and pointed ``file`` at it.
timm's own loader then applies the usual head reset (``num_classes``) and input-conv adaptation (``in_chans``).
"""
import os
from pathlib import Path
from typing import Any, Dict

from timm.models import build_model_with_cfg, list_models, list_pretrained, resolve_pretrained_cfg
from timm.models._hub import hf_split

from .hub import check_safetensors, download_safetensors, recipe_file
from .registry import (
    SAFE_WEIGHTS_NAME,
    PretrainedWeightsNotFound,
    no_weights_message,
    pretrained_entry,
    tag_of_hub_id,
    verify_sha256,
)

__all__ = ['build_spe_model', 'resolve_pretrained_weights']


def build_spe_model(model_cls, variant: str, pretrained: bool = False, **kwargs):
    """timm's ``build_model_with_cfg(model_cls, variant, pretrained, **kwargs)``, the weights checked first."""
    return build_model_with_cfg(model_cls, variant, pretrained, **resolve_pretrained_weights(variant, kwargs, pretrained))


def _check_named_tag(variant: str, tag: Any) -> None:
    """``'model.tag'`` with a tag the model does not have (a typo, a retired tag): timm's own error names neither the
    tags there are nor the ones with weights; this one does (same type and opening as timm's)."""
    if not isinstance(tag, str):
        return
    tags = [name.split('.', 1)[1] for name in list_models(variant, include_tags=True) if '.' in name]
    if tag not in tags:
        with_weights = [name.split('.', 1)[1] for name in list_pretrained(f'{variant}.*')]
        raise RuntimeError(
            f"Invalid pretrained tag ({tag}) for {variant}: its tags are {tags}, with weights {with_weights}. For "
            f"other weights create '{variant}' with pretrained_cfg_overlay=dict(file='path/to/model.safetensors').")


def resolve_pretrained_weights(variant: str, kwargs: Dict[str, Any], pretrained: bool) -> Dict[str, Any]:
    """Make a pretrained load of ``variant`` read a local, verified safetensors file (downloaded if needed).

    Called by our model builders before timm's ``build_model_with_cfg``; returns the kwargs with a
    resolved ``pretrained_cfg`` whose ``file`` points at the weights. Weights of a tag recorded in
    :mod:`timm_spe.registry` -- the package's copy, a Hub download, an ``hf-hub:`` id of the recorded repo, or a
    file given with the tag named explicitly (``'model.tag'`` + ``pretrained_cfg_overlay=dict(file=...)``) -- must
    have the recorded sha256, or nothing is loaded. A file given for the bare model name is the user's own.
    """
    _check_named_tag(variant, kwargs.get('pretrained_cfg'))
    if not pretrained:
        return kwargs
    kwargs = dict(kwargs)
    named_tag = isinstance(kwargs.get('pretrained_cfg'), str)  # 'model.tag' reaches us as pretrained_cfg='tag'
    overlay = kwargs.pop('pretrained_cfg_overlay', None)
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.pop('pretrained_cfg', None),
        pretrained_cfg_overlay=overlay,
    ).to_dict()
    tag = cfg.get('tag') or ''
    model_tag = f'{variant}.{tag}' if tag else variant
    if cfg.get('state_dict') is None:
        expect = None  # the registry tag whose sha256 the file must have
        if cfg.get('source') == 'local-dir':  # timm.create_model('local-dir:FOLDER'): its safetensors only
            folder = Path(cfg['file'])
            cfg['file'] = str(folder / SAFE_WEIGHTS_NAME)
            if not os.path.isfile(cfg['file']):
                raise PretrainedWeightsNotFound(
                    f"'{folder}' has no {SAFE_WEIGHTS_NAME}; timm-spe loads only safetensors weights. Stage the "
                    f"folder with `timm-spe publish ... --dry-run --out {folder}` or `timm-spe convert`.")
            source = f'local folder {folder}'
        elif cfg.get('file') and (os.path.isfile(cfg['file']) or (overlay or {}).get('file') or not cfg.get('hf_hub_id')):
            user_file = bool(overlay and overlay.get('file'))
            source = 'pretrained_cfg file' if user_file else f"the timm-spe package's weights of '{model_tag}'"
            if pretrained_entry(model_tag) and (named_tag or not user_file):
                expect = model_tag
            if not os.path.isfile(cfg['file']):
                if not user_file:
                    raise PretrainedWeightsNotFound(
                        f"The weights of '{model_tag}' should ship inside the timm-spe package but '{cfg['file']}' is "
                        f"missing: reinstall timm-spe (pip install --force-reinstall timm-spe), or in a git clone "
                        f"restore hub_cards/{model_tag}/{SAFE_WEIGHTS_NAME}.")
                raise FileNotFoundError(f"pretrained_cfg file '{cfg['file']}' for '{variant}' does not exist.")
        elif cfg.get('hf_hub_id'):
            source = f"the Hub repo {cfg['hf_hub_id']}"
            repo_id, revision = hf_split(cfg['hf_hub_id'])
            recorded = tag_of_hub_id(repo_id)
            if cfg.get('source') == 'hf-hub':  # hf-hub:ORG/REPO: checked only if the registry records that repo
                expect = recorded if revision is None else None
            elif pretrained_entry(model_tag):
                expect = model_tag
            cfg['file'] = download_safetensors(cfg['hf_hub_id'], variant, tag, cache_dir=kwargs.get('cache_dir'))
        else:
            raise PretrainedWeightsNotFound(
                no_weights_message(model_tag if tag else f'{variant}.TAG', recipe=recipe_file(model_tag)))
        if expect:
            verify_sha256(cfg['file'], expect, source)
        if str(cfg['file']).endswith('.safetensors'):
            check_safetensors(cfg['file'], source)
        cfg['source'] = ''  # load from the local file, not through timm's (pickle-capable) Hub fallback
    kwargs['pretrained_cfg'] = cfg
    return kwargs
