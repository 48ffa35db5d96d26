""" Checkpoint loading and conversion

* the authors' official SPEM code (github.com/Qrange-group/SPEM, ``models/spem.py``): DataParallel
  state dicts (``module.`` prefix) with per-block SPE parameters ``w1``/``b1`` (excitation),
  ``w2``/``b2`` (reweighting), each 1 x C x 1 x 1, and ``p`` (2,);
* timm ``train.py`` checkpoints (``model_best.pth.tar`` / ``last.pth.tar``), which pickle an
  ``argparse.Namespace`` under ``args``: loaded with ``weights_only=True`` and exactly that class
  allow-listed, never with an unrestricted unpickler;
* safetensors files.
"""
import argparse
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

__all__ = [
    'OFFICIAL_SPE_KEYS', 'is_official_state_dict', 'convert_official_state_dict', 'official_depth',
    'load_checkpoint_file', 'load_weights', 'cifar_model_of',
]

PathLike = Union[str, Path]
# official per-block parameter name -> ours (under the block's ``se`` attention module)
OFFICIAL_SPE_KEYS = {'w1': 'w_exc', 'b1': 'b_exc', 'w2': 'w_rew', 'b2': 'b_rew', 'p': 'p'}
_OFFICIAL_SPE = re.compile(r'^(layer\d+\.\d+)\.(w1|b1|w2|b2|p)$')


def _strip_module(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def is_official_state_dict(state_dict: Dict[str, Any]) -> bool:
    """True for a state dict in the authors' SPEM layout (``layerX.Y.w1`` ..., optional ``module.``)."""
    return any(_OFFICIAL_SPE.match(k) for k in _strip_module(state_dict))


def official_depth(state_dict: Dict[str, Any]) -> int:
    """Depth (9n + 2) of an official bottleneck checkpoint, from its number of blocks per stage."""
    blocks = {int(m.group(1)) for k in _strip_module(state_dict) if (m := re.match(r'^layer1\.(\d+)\.', k))}
    if not blocks:
        raise ValueError('not a CIFAR ResNet state dict: no layer1.<i>.* keys')
    return 9 * (max(blocks) + 1) + 2


def convert_official_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map the authors' SPEM keys and shapes onto ``timm_spe``'s CIFAR ResNets (logits are identical)."""
    out = {}
    for key, value in _strip_module(state_dict).items():
        m = _OFFICIAL_SPE.match(key)
        if m:
            block, name = m.groups()
            out[f'{block}.se.{OFFICIAL_SPE_KEYS[name]}'] = value.reshape(-1).clone()
        else:
            out[key] = value
    return out


def _reason(e: BaseException) -> str:
    """The informative line of a loader's error (torch's weights_only errors span many lines and advise
    ``weights_only=False``, which timm-spe never does)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    line = next((l for l in lines if 'nsupported' in l or 'WeightsUnpickler error' in l), lines[0] if lines else '')
    return f'{type(e).__name__}: {line}' if line else type(e).__name__


def _unsafe_reason(e: BaseException) -> str:
    """What torch's safe loader refused, in our words: its own text advises allow-listing the object or filing an
    issue, neither of which is the fix for a user holding an untrusted file."""
    text = str(e)
    found = re.search(r'GLOBAL ([\w.]+)', text)
    if found:
        return f'it holds a pickled Python object ({found.group(1)}), not only tensors'
    if 'WeightsUnpickler' in text or 'file an issue' in text:
        return 'its pickle holds something other than tensors and plain containers'
    return _reason(e).rstrip('.')


def load_checkpoint_file(path: PathLike, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Load weights from a safetensors file, a train.py checkpoint or an official SPEM checkpoint, safely.

    Returns:
        ``(state_dict, info)`` where ``info`` has ``format`` ('safetensors', 'timm-train', 'official',
        'state_dict') and, for train.py checkpoints, ``args`` (the run's argparse Namespace) and ``epoch``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist.")
    if path.suffix == '.safetensors':
        if use_ema:
            raise ValueError(f"'{path}' is a safetensors file: one set of weights, no state_dict_ema. Drop --ema, or "
                             f"give the train.py checkpoint (trained with --model-ema) it came from.")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(
                f"'{path}' is not a readable safetensors file ({_reason(e)}): it is truncated or corrupt. Copy or "
                f"download it again, or write it again from its source checkpoint (`timm-spe convert SRC --model "
                f"MODEL --out FILE.safetensors`).") from e
        return _checked_finite(path, *_as_timm_state_dict(tensors, {'format': 'safetensors'}))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # torch warns about pickle protocols it did not write: the refusal below says what matters
            warnings.simplefilter('ignore', UserWarning)
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the reason and the fix
        raise ValueError(
            f"'{path}' cannot be loaded safely: {_unsafe_reason(e)}. timm-spe never unpickles arbitrary objects "
            f"(torch.load with weights_only=True, argparse.Namespace allowed); re-save the weights as "
            f"safetensors.") from e
    info: Dict[str, Any] = {'format': 'state_dict'}
    if isinstance(ckpt, dict) and 'state_dict' in ckpt:
        info.update({k: ckpt[k] for k in ('epoch', 'arch', 'args', 'metric', 'acc', 'best_acc') if k in ckpt})
        info['format'] = 'timm-train' if 'args' in ckpt or 'arch' in ckpt else 'official'
        if use_ema:
            if ckpt.get('state_dict_ema') is None:
                raise ValueError(f"'{path}' has no state_dict_ema (train with --model-ema, or drop --ema).")
            state_dict = ckpt['state_dict_ema']
            info['ema'] = True
        else:
            state_dict = ckpt['state_dict']
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        if use_ema:
            raise ValueError(f"'{path}' is a bare state dict: one set of weights, no state_dict_ema. Drop --ema.")
        state_dict = ckpt
    else:
        raise ValueError(f"'{path}' holds no state dict (expected a dict of tensors or a dict with 'state_dict').")
    return _checked_finite(path, *_as_timm_state_dict(state_dict, info))


def _checked_finite(path: PathLike, state_dict: Dict[str, torch.Tensor], info: Dict[str, Any]):
    """Refuse weights holding NaN or inf (a diverged run): they would evaluate to ``loss nan`` and be converted,
    staged or published like any others."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ', '.join(bad[:3]) + (', ...' if len(bad) > 3 else '')
        raise ValueError(f"'{path}' has non-finite weights (NaN or inf) in {len(bad)} of {len(state_dict)} tensors "
                         f"({shown}): the run that wrote it diverged; use a checkpoint from before it did.")
    return state_dict, info


def _as_timm_state_dict(state_dict: Dict[str, torch.Tensor], info: Dict[str, Any]):
    """Any container's weights in timm-spe's key layout: the authors' SPEM keys converted, a DataParallel /
    DistributedDataParallel ``module.`` prefix dropped (safetensors files and pickled checkpoints alike)."""
    if is_official_state_dict(state_dict):
        info['format'] = 'official'
        info['depth'] = official_depth(state_dict)
        return convert_official_state_dict(state_dict), info
    return _strip_module(state_dict), info


# the attention kind of a CIFAR ResNet block (CIFAR_ATTN_LAYERS of timm_spe/resnet.py) by a parameter name only its
# module (the block's ``se``) has; SPE's ablation settings change its other names, never ``w_exc``
_ATTN_KEYS = {'w_exc': 'spe', 'fc1.weight': 'se', 'conv.weight': 'eca', 'channel.fc1.weight': 'cbam', 'cfc': 'srm',
              'weight': 'sge'}


def _cifar_layout(state_dict: Dict[str, Any]) -> Optional[Tuple[int, Optional[str]]]:
    """``(blocks per stage, attention kind)`` of a CIFAR bottleneck ResNet's keys (attention ``''``: none, None: not
    one of CIFAR_ATTN_LAYERS); None for the keys of any other network."""
    keys = set(_strip_module(state_dict))
    blocks = [{int(m.group(1)) for k in keys if (m := re.match(rf'^layer{stage}\.(\d+)\.', k))}
              for stage in (1, 2, 3, 4)]
    n = len(blocks[0])
    if not n or blocks[3] or any(b != set(range(n)) for b in blocks[:3]) or 'layer1.0.conv3.weight' not in keys:
        return None
    names = {k[len('layer1.0.se.'):] for k in keys if k.startswith('layer1.0.se.')}
    return n, next((attn for name, attn in _ATTN_KEYS.items() if name in names), None) if names else ''


def cifar_model_of(state_dict: Dict[str, Any]) -> Optional[str]:
    """The CIFAR ResNet whose weights ``state_dict`` holds (e.g. ``'resnet164_spe'``), read from its keys alone: the
    depth (9n + 2) from its n bottleneck blocks per stage, the attention from the parameter names of the first block's
    attention module. None if they are of no registered model (another depth, an ImageNet ResNet...)."""
    from . import CIFAR_DEPTHS  # the package face's (no model file imported here): the registered depths
    layout = _cifar_layout(state_dict)
    if layout is None or layout[1] is None or 9 * layout[0] + 2 not in CIFAR_DEPTHS:
        return None
    return f'resnet{9 * layout[0] + 2}' + (f'_{layout[1]}' if layout[1] else '')


def load_weights(model: torch.nn.Module, path: PathLike, use_ema: bool = False) -> Dict[str, Any]:
    """Load ``path`` into ``model`` strictly; a mismatch names the model the weights are of (read from their keys),
    to give instead (``--model`` of convert and publish, ``MODEL`` of eval and inspect), else the missing and unexpected
    keys."""
    state_dict, info = load_checkpoint_file(path, use_ema=use_ema)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        arch = getattr(model, 'pretrained_cfg', {}).get('architecture', '?')
        fits = cifar_model_of(state_dict)
        if fits and fits != arch:
            n, attn = _cifar_layout(state_dict)
            raise ValueError(
                f"'{path}' is a {fits} state dict (depth {9 * n + 2}: {n} blocks per stage; attention: "
                f"{attn or 'none'}; read from its keys), which does not fit {arch}: give {fits} (or {fits}.TAG) as the "
                f"model instead.")
        depth = f" (checkpoint depth {info['depth']})" if 'depth' in info else ''
        raise ValueError(
            f"'{path}'{depth} does not match {type(model).__name__} '{arch}': "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}. Check --model (depth, attention).")
    return info
