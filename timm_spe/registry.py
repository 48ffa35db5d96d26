""" Which pretrained tags have weights, and the sha256 every load is checked against: the bottom of the weights stack

Imports nothing from the package (as timm's ``_pretrained.py``): the layers above it read it --
:mod:`timm_spe.pretrained` (cfgs, where a shipped file is, runtime registration), :mod:`timm_spe.hub` (download,
publish), :mod:`timm_spe.builder` (the checked load), :mod:`timm_spe.resnet` (the models).

:data:`PRETRAINED_TAGS` is the one table. A tag is listed by ``timm.list_pretrained`` only if it is in it:

* ``'shipped': True`` -- ``model.safetensors`` is package data (``timm_spe/weights/<model>.<tag>.safetensors``,
  copied from ``hub_cards/<model>.<tag>/`` when the wheel is built, see ``setup.py``), so ``pretrained=True``
  works offline on a fresh install. In a git clone (editable install) the same file is read from
  ``hub_cards/<model>.<tag>/model.safetensors``.
* ``'hf_hub_id': 'org/repo'`` -- published on the Hub; downloaded (and cached) by huggingface_hub.

Every load of a tag's weights -- from the package, the clone, a file given with an explicit tag, or a Hub
download (also ``hf-hub:`` ids of a recorded repo) -- is checked against its ``sha256`` before anything is
loaded. The first entry of a model is its default tag (``timm.create_model('resnet164_spe', pretrained=True)``).

``setup.py`` reads this table with ``ast.literal_eval`` (no import of torch/timm at build time), so it must
stay a literal dict of literal dicts.
"""
import hashlib
from pathlib import Path
from typing import Any, Dict, Optional, Union

__all__ = [
    'PRETRAINED_TAGS', 'PAPER_TAGS', 'PretrainedWeightsNotFound', 'PretrainedWeightsCorrupt',
    'PretrainedWeightsMismatch', 'pretrained_entry', 'tag_of_hub_id', 'verify_sha256', 'sha256_file',
    'default_hub_repo_id', 'no_weights_message', 'HF_HUB_ORG', 'SAFE_WEIGHTS_NAME',
]

# '<model>.<tag>': {'sha256': sha256 of model.safetensors, 'num_classes': N,
#                   'shipped': True (package data) and/or 'hf_hub_id': 'org/repo' (published)}
# To ship new weights as the default: put their line first (sha256 from the staged folder's card).
PRETRAINED_TAGS: Dict[str, Dict[str, Any]] = {
    'resnet164_spe.cifar10_e30': {
        'sha256': 'c9f5778091d5907ae23c555e2c55227e44b57e3c9810105089a48ce3979b80ab', 'num_classes': 10,
        'shipped': True},
    # the plain control of the same recipe: `timm-spe compare` sets the two side by side
    'resnet164.cifar10_e30': {
        'sha256': 'd4b938032b8c2157b3c39ed047890eab256d5263f60cfba4d86e5c9f336f7208', 'num_classes': 10,
        'shipped': True},
}

# The paper's schedule (164 epochs) on CIFAR-10 / CIFAR-100: registered for every CIFAR model (their config
# sets the class count and data config for training) but not listed until weights are published.
PAPER_TAGS: Dict[str, int] = {'cifar10': 10, 'cifar100': 100}

HF_HUB_ORG = 'timm-spe'  # the organisation the project publishes to: <org>/<model>.<tag>
SAFE_WEIGHTS_NAME = 'model.safetensors'
PathLike = Union[str, Path]


class PretrainedWeightsNotFound(RuntimeError):
    """A pretrained tag's weights are not on the Hub (yet), or not in the cache while offline."""


class PretrainedWeightsCorrupt(RuntimeError):
    """A downloaded or local safetensors file cannot be read."""


class PretrainedWeightsMismatch(PretrainedWeightsCorrupt):
    """A weights file is not the one recorded for its tag (its sha256 differs)."""


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def pretrained_entry(model_tag: str) -> Optional[Dict[str, Any]]:
    """The table entry of ``'<model>.<tag>'`` (None: no weights recorded)."""
    return PRETRAINED_TAGS.get(model_tag)


def tag_of_hub_id(repo_id: str) -> Optional[str]:
    """The ``'<model>.<tag>'`` recorded as published at ``repo_id`` (None if no entry records it)."""
    for model_tag, entry in PRETRAINED_TAGS.items():
        if entry.get('hf_hub_id') == repo_id:
            return model_tag
    return None


def default_hub_repo_id(model_tag: str) -> str:
    """Where ``timm-spe publish`` uploads a tag by default: its recorded repo, else ``timm-spe/<model>.<tag>``."""
    entry = pretrained_entry(model_tag) or {}
    return entry.get('hf_hub_id') or f'{HF_HUB_ORG}/{model_tag}'


def verify_sha256(path: PathLike, model_tag: str, source: str) -> str:
    """Check ``path`` is the file recorded for ``model_tag``; returns its sha256. A mismatch names both hashes."""
    expected = (pretrained_entry(model_tag) or {}).get('sha256')
    actual = sha256_file(path)
    if expected and actual != expected:
        raise PretrainedWeightsMismatch(
            f"'{path}' (from {source}) is not the recorded weights of '{model_tag}': its sha256 is {actual}, the "
            f"package records {expected}. Nothing was loaded. The file is corrupt, truncated or other weights: "
            f"delete it (for a Hub download, re-download with huggingface_hub's force_download=True), reinstall "
            f"timm-spe, or load your own weights without the tag: timm.create_model('{model_tag.split('.')[0]}', "
            f"pretrained=True, pretrained_cfg_overlay=dict(file='path/to/model.safetensors')).")
    return actual


def no_weights_message(model_tag: str, recipe: Optional[str] = None) -> str:
    """Why ``model_tag`` cannot be loaded with pretrained=True, and how to make weights for it.

    ``recipe``: the clone's ``train_recipes/<model>-<tag>.yaml`` if it has one (:func:`timm_spe.hub.recipe_file`);
    without it the message names timm's train.py alone. The ``untrained`` tag (the ImageNet variants' config, without
    weights or class names) and the placeholder ``TAG`` are no tag to publish under: the message asks for one and its
    repo, and leaves out ``timm-spe eval`` (it needs class names).
    """
    variant, _, tag = model_tag.partition('.')
    tag = tag or 'TAG'
    listed = sorted(t for t in PRETRAINED_TAGS if t.split('.')[0] == variant and t != f'{variant}.{tag}')
    publish = (f"`timm-spe publish CHECKPOINT --model {variant} --tag TAG --repo-id ORG/NAME`"
               if tag in ('untrained', 'TAG') else  # a 1000-class config: no class names, so no `timm-spe eval`
               f"`timm-spe eval` + `timm-spe publish CHECKPOINT --model {variant} --tag {tag} --eval-json EVAL.json`")
    train = (f"timm's train.py (`./run.sh train {recipe}`, then `timm-spe finish-run --recipe {recipe}`), or" if recipe
             else f"timm's train.py (--model {variant}), then")
    return (
        (f"'{variant}.{tag}' is the architecture alone, without pretrained weights" if tag == 'untrained' else
         f"'{variant}.{tag}' has no pretrained weights yet")
        + (f" (tags with weights: {', '.join(listed)})" if listed else ' (timm.list_pretrained() lists the tags that have)')
        + f". Train them with {train} {publish}; then record the published file's sha256 in timm_spe/registry.py "
        f"(or at runtime with timm_spe.register_pretrained). To use a local file instead: timm.create_model("
        f"'{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='path/to/model.safetensors')).")
