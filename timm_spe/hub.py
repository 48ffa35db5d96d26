""" Hugging Face Hub helpers: clear errors for pretrained tags whose weights are not published """
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

__all__ = ['PretrainedWeightsNotFound', 'pretrained_errors']


class PretrainedWeightsNotFound(RuntimeError):
    """Raised when a pretrained tag's Hub repository or weight file does not exist (yet)."""


@contextmanager
def pretrained_errors(variant: str, pretrained_cfg: Any, pretrained: bool) -> Iterator[None]:
    """Turn a Hub 404 while loading ``variant``'s pretrained weights into an actionable error."""
    try:
        yield
    except (RepositoryNotFoundError, EntryNotFoundError, RevisionNotFoundError) as e:
        if not pretrained:
            raise
        name = variant if not isinstance(pretrained_cfg, str) else f'{variant}.{pretrained_cfg}'
        raise PretrainedWeightsNotFound(
            f"No published weights for '{name}' on the Hugging Face Hub ({e.__class__.__name__}). "
            f"Train them with timm's train.py and a recipe from train_recipes/, then publish with "
            f"`timm-spe publish CHECKPOINT --model {variant} --tag TAG`; or load a local file with "
            f"pretrained_cfg_overlay=dict(file='model.safetensors').") from e
