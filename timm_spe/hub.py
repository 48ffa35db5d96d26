""" Hugging Face Hub: the safetensors-only download with actionable errors, and publishing

Downloading: :func:`download_safetensors` fetches ``model.safetensors`` (and nothing else) through
huggingface_hub's normal download and cache; :mod:`timm_spe.builder` checks it and hands timm the local file.
A repository without ``model.safetensors`` is refused, never unpickled.

Publishing: :func:`stage_hub_folder` writes ``model.safetensors`` + ``config.json`` (timm's
``save_for_hf``) + a model card; :func:`upload_hub_folder` uploads it without silently replacing
weights already on the Hub.
"""
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

from huggingface_hub import HfApi, get_token, hf_hub_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from timm.models._hub import hf_split, save_for_hf

from ._paths import REPO_ROOT, TRAIN_RECIPES
from .labels import label_names_for
from .registry import (
    SAFE_WEIGHTS_NAME,
    PretrainedWeightsCorrupt,
    PretrainedWeightsMismatch,
    PretrainedWeightsNotFound,
    no_weights_message,
    sha256_file,
)

__all__ = [
    'PretrainedWeightsNotFound', 'PretrainedWeightsCorrupt', 'PretrainedWeightsMismatch', 'SAFE_WEIGHTS_NAME',
    'download_safetensors', 'stage_hub_folder', 'upload_hub_folder', 'sha256_file', 'weights_sha256',
    'read_eval_json', 'hub_api', 'check_safetensors', 'check_upload_allowed', 'check_staged_folder', 'check_upload_files',
    'check_hub_access', 'validate_tag', 'UPLOAD_SUFFIXES', 'NO_TOKEN_MESSAGE', 'recipe_file',
]

_logger = logging.getLogger(__name__)
PathLike = Union[str, Path]


def recipe_file(model_tag: str) -> Optional[str]:
    """``train_recipes/<model>-<tag>.yaml`` (as ``./run.sh train`` takes it) if this clone has that recipe, for the
    how-to of a tag without weights; an installed wheel has none."""
    variant, _, tag = model_tag.partition('.')
    f = TRAIN_RECIPES / f'{variant}-{tag}.yaml'
    return f.relative_to(REPO_ROOT).as_posix() if tag and f.is_file() else None


def _how_to_publish(variant: str, tag: str) -> str:
    return no_weights_message(f'{variant}.{tag}', recipe=recipe_file(f'{variant}.{tag}'))


def download_safetensors(
        hf_hub_id: str,
        variant: str,
        tag: str,
        cache_dir: Optional[PathLike] = None,
) -> str:
    """Download (or find in the cache) ``model.safetensors`` of ``hf_hub_id``; clear errors otherwise.

    Only that one file is requested: a repository holding only pickled weights (``pytorch_model.bin``)
    is reported as having no published weights, and nothing is unpickled.
    """
    repo_id, revision = hf_split(hf_hub_id)
    name = f'{variant}.{tag}' if tag else variant
    try:
        return hf_hub_download(repo_id, SAFE_WEIGHTS_NAME, revision=revision, cache_dir=cache_dir)
    # LocalEntryNotFoundError subclasses EntryNotFoundError: catch the offline/unreachable case first
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise PretrainedWeightsNotFound(
            f"Weights for '{name}' ({hf_hub_id}/{SAFE_WEIGHTS_NAME}) are not in the Hugging Face cache and "
            f"{_why_not_downloaded(e)}. Load them once while online (same HF_HOME / cache), or pass "
            f"pretrained_cfg_overlay=dict(file='path/to/model.safetensors').") from e
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        if isinstance(e, RepositoryNotFoundError) and not isinstance(e, GatedRepoError):  # gated: a subclass
            raise PretrainedWeightsNotFound(
                f"No weights for '{name}': its Hub repo '{repo_id}' was not found at {hf_constants.ENDPOINT} "
                f"(RepositoryNotFoundError): check the hf_hub_id recorded for it (timm_spe.register_pretrained or "
                f"timm_spe/registry.py) and HF_ENDPOINT, publish the weights there (`timm-spe publish CHECKPOINT "
                f"--model {variant} --tag {tag or 'TAG'} --repo-id {repo_id}`), or, for a private repo, log in with "
                f"`hf auth login` (or set HF_TOKEN).") from e
        raise PretrainedWeightsNotFound(
            f"No published weights for '{name}': the Hub has no {SAFE_WEIGHTS_NAME} in '{hf_hub_id}' "
            f"({e.__class__.__name__}; for a private repo, log in with `hf auth login` or set HF_TOKEN). "
            f"timm-spe loads only safetensors from the Hub, never pickled pytorch_model.bin. "
            + _how_to_publish(variant, tag)) from e
    except HfHubHTTPError as e:  # any other answer (server error, rate limit, forbidden...)
        raise PretrainedWeightsNotFound(
            f"Could not download weights for '{name}' ({hf_hub_id}/{SAFE_WEIGHTS_NAME}): the Hub answered "
            f"'{e}'. Retry later, check HF_ENDPOINT / your token, or pass "
            f"pretrained_cfg_overlay=dict(file='path/to/model.safetensors').") from e


def _why_not_downloaded(e: BaseException) -> str:
    """What kept huggingface_hub from downloading: it turns a server's error answer (HTTP 5xx, ...), a connection
    failure and offline mode alike into ``LocalEntryNotFoundError``, with the real reason as its cause."""
    if isinstance(e, OfflineModeIsEnabled) or hf_constants.is_offline_mode():
        return f"offline mode is on (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '1')})"
    cause = e.__cause__ or e.__context__
    if isinstance(cause, HfHubHTTPError):
        status = getattr(getattr(cause, 'response', None), 'status_code', None)
        what = 'a server error: retry later' if status is not None and status >= 500 else 'check HF_ENDPOINT / your token'
        return f"the Hub at {hf_constants.ENDPOINT} answered HTTP {status} ({what})"
    return f"the Hub at {hf_constants.ENDPOINT} cannot be reached (no connection: check the network / HF_ENDPOINT)"


def check_safetensors(path: str, source: str) -> None:
    """A readable safetensors file, or a one-line error naming it and the fix (nothing loaded into a model)."""
    try:
        load_file(path, device='cpu')
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainedWeightsCorrupt(
            f"'{path}' (from {source}) is not a readable safetensors file ({e}). It may be truncated or corrupt: "
            f"delete it (for a Hub download, re-download with huggingface_hub's force_download=True) and retry.") from e


def weights_sha256(model) -> str:
    """sha256 of ``model``'s weights serialized as :func:`stage_hub_folder` writes them (``model.safetensors``).

    Lets an eval result be matched to the exact published file without writing it first.
    """
    return hashlib.sha256(safetensors_bytes({k: v.contiguous() for k, v in model.state_dict().items()})).hexdigest()


def stage_hub_folder(
        model,
        out_dir: PathLike,
        card: Union[str, Callable[[str], str]],
        figures: Optional[Dict[str, PathLike]] = None,
        extra_files: Optional[Dict[str, PathLike]] = None,
        force: bool = False,
        extra_texts: Optional[Dict[str, str]] = None,
) -> Path:
    """Write a Hub-ready folder: ``model.safetensors`` + ``config.json`` (timm's ``save_for_hf``) + ``README.md``.

    Everything is written to a temporary sibling folder first and moved into place at the end, so a
    failure never leaves a half-staged folder behind.

    Args:
        model: The timm model with its final weights and ``pretrained_cfg``.
        out_dir: Target folder; must be empty or absent unless ``force``.
        card: Rendered model card (markdown with YAML front matter), or a function of the sha256 of the
            written ``model.safetensors`` returning it.
        figures: ``{name_in_folder: source_path}`` images to copy next to the card.
        extra_files: ``{name_in_folder: source_path}`` other files (e.g. the eval JSON).
        force: Replace the folder's previous contents.
        extra_texts: ``{name_in_folder: text}`` files written from memory (e.g. the eval JSON without absolute paths).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force or not out.is_dir():
            raise FileExistsError(
                f"Output folder '{out}' is not empty; choose another --out or pass --force to replace its contents.")
    files = {**(figures or {}), **(extra_files or {})}
    for name in (extra_texts or {}):
        if name in (SAFE_WEIGHTS_NAME, 'config.json', 'README.md') or Path(name).name != name or name in files:
            raise ValueError(f"cannot stage a text as '{name}'.")
    for name, src in files.items():
        if not Path(src).is_file():
            raise FileNotFoundError(f"'{src}' (to be staged as {name}) does not exist.")
        if name in (SAFE_WEIGHTS_NAME, 'config.json', 'README.md') or Path(name).name != name:
            raise ValueError(f"cannot stage '{src}' as '{name}': a plain file name other than the model files is needed.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f'.{out.name}.staging-{os.getpid()}'
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        labels = label_names_for(model)  # config.json label_names: timm's inference.py prints class names
        save_for_hf(model, tmp, safe_serialization=True,
                    model_config={'label_names': list(labels)} if labels else None)
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
        for name, text in (extra_texts or {}).items():
            (tmp / name).write_text(text)
        text = card(sha256_file(tmp / SAFE_WEIGHTS_NAME)) if callable(card) else card
        (tmp / 'README.md').write_text(text)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


# what an upload may hold: weights as safetensors, timm's config, the card, its figures and tables. Anything else
# (pickles .bin .pt .pth .pkl .pickle .pt2 .ckpt .tar, archives, scripts, dot files such as .gitattributes: the Hub
# makes its own) is refused, at any depth, before any network call.
UPLOAD_SUFFIXES = ('.safetensors', '.json', '.md', '.png', '.csv', '.yaml', '.yml')
_TAG = re.compile(r'[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}')


def validate_tag(tag: str, what: str = '--tag') -> str:
    """A pretrained tag names folders (``hub_cards/<model>.<tag>``) and Hub repos: no path, only a plain word.

    Letters, digits, ``_``, ``-`` and ``.`` (not first, never ``..``), at most 64 characters.
    """
    if not isinstance(tag, str) or not _TAG.fullmatch(tag) or '..' in tag:
        raise ValueError(
            f"{what} {tag!r} is not a valid tag: use letters, digits, '_', '-' and '.' (not first, no '..', no '/' "
            f"or '\\', at most 64 characters), e.g. cifar10_e30.")
    return tag


def check_upload_files(folder: PathLike, limit: int = 5) -> None:
    """Refuse a folder holding anything but :data:`UPLOAD_SUFFIXES` files, at any depth (links included)."""
    folder = Path(folder)
    refused = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(dirs):
            if os.path.islink(os.path.join(root, name)):
                refused.append(Path(root, name))
        for name in sorted(files):
            path = Path(root, name)
            if path.is_symlink() or not path.is_file() or path.suffix.lower() not in UPLOAD_SUFFIXES \
                    or any(part.startswith('.') for part in path.relative_to(folder).parts):
                refused.append(path)
    if refused:
        names = [str(p.relative_to(folder)) + ('/' if p.is_dir() else '') for p in refused]
        more = f' and {len(names) - limit} more' if len(names) > limit else ''
        raise ValueError(
            f"'{folder}' holds files that are never uploaded: {', '.join(names[:limit])}{more}. Only "
            f"{' '.join(UPLOAD_SUFFIXES)} files (no pickle weights, no links, no dot files) are published: remove "
            f"them, or stage a clean folder with `timm-spe publish ... --dry-run`.")


def check_staged_folder(folder: PathLike) -> Dict[str, Any]:
    """A staged folder must hold readable safetensors weights, timm's config.json and a card quoting their sha256,
    and nothing that is not published (:func:`check_upload_files`).

    Returns the folder's ``config.json``.
    """
    folder = Path(folder)
    names = ('config.json', SAFE_WEIGHTS_NAME, 'README.md')
    if not folder.is_dir() or not all((folder / n).is_file() for n in names):
        raise FileNotFoundError(
            f"'{folder}' is not a staged Hub folder (needs {', '.join(names)}); stage one with "
            f"`timm-spe publish ... --dry-run --out {folder}`.")
    check_upload_files(folder)
    check_safetensors(str(folder / SAFE_WEIGHTS_NAME), 'the staged folder')
    for path in sorted(folder.rglob('*.safetensors')):  # every other safetensors file: a readable header
        if path.name != SAFE_WEIGHTS_NAME or path.parent != folder:
            try:
                with safe_open(str(path), framework='pt'):
                    pass
            except (SafetensorError, OSError, ValueError) as e:
                raise ValueError(f"'{path}' is not a readable safetensors file ({e}): remove it or write it "
                                 f"again.") from e
    if sha256_file(folder / SAFE_WEIGHTS_NAME) not in (folder / 'README.md').read_text():
        raise ValueError(
            f"'{folder}/README.md' does not quote the sha256 of {SAFE_WEIGHTS_NAME}: the card is not of these "
            f"weights. Stage the folder again with `timm-spe publish`.")
    try:
        config = json.loads((folder / 'config.json').read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"'{folder}/config.json' is not JSON ({e}): stage the folder again with "
                         f"`timm-spe publish`.") from e
    if not isinstance(config, dict) or 'architecture' not in config:
        raise ValueError(f"'{folder}/config.json' is not timm's Hub config (no 'architecture').")
    return config


NO_TOKEN_MESSAGE = ("no Hugging Face token: log in with `hf auth login` (or set HF_TOKEN) using a token with write "
                    "access (https://huggingface.co/settings/tokens).")


def check_hub_access(api: HfApi) -> None:
    """Before any upload call: refuse offline mode, and a missing token (never read beyond "is there one").

    Only for a real ``HfApi`` (tests pass mocks).
    """
    import huggingface_hub  # the class itself, even where tests patch this module's HfApi
    if not isinstance(api, huggingface_hub.HfApi):
        return
    if hf_constants.is_offline_mode():
        raise OfflineModeIsEnabled(
            f"offline mode is on (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')}): uploading needs the Hub.")
    if api.token is None and get_token() is None:
        raise LocalTokenNotFoundError(NO_TOKEN_MESSAGE)


def hub_api() -> HfApi:
    """An ``HfApi`` identifying timm-spe; the token is huggingface_hub's own business."""
    from .version import __version__
    return HfApi(library_name='timm-spe', library_version=__version__)


def check_upload_allowed(repo_id: str, overwrite: bool = False, create_pr: bool = False,
                         api: Optional[HfApi] = None, revision: Optional[str] = None) -> None:
    """Refuse (before anything is staged or sent) to replace weights already in ``repo_id`` by accident; refuse
    offline mode or a missing token first (:func:`check_hub_access`)."""
    api = api or hub_api()
    check_hub_access(api)
    if create_pr or overwrite:
        return
    exists = (api.file_exists(repo_id, SAFE_WEIGHTS_NAME, revision=revision) if revision else
              api.file_exists(repo_id, SAFE_WEIGHTS_NAME))  # False for a repo (or branch) that does not exist yet
    if exists:
        raise FileExistsError(
            f"'{repo_id}'{f' ({revision})' if revision else ''} already has {SAFE_WEIGHTS_NAME}. Pass --create-pr to propose the new weights as a pull "
            f"request, or --overwrite to replace them.")


def upload_hub_folder(
        folder: PathLike,
        repo_id: str,
        overwrite: bool = False,
        create_pr: bool = False,
        private: bool = False,
        commit_message: Optional[str] = None,
        api: Optional[HfApi] = None,
        revision: Optional[str] = None,
) -> Any:
    """Upload a staged folder with huggingface_hub, refusing to replace existing weights silently.

    Args:
        folder: A folder staged by :func:`stage_hub_folder`.
        repo_id: ``<org>/<model>.<tag>``; created if absent (``exist_ok``).
        overwrite: Replace a ``model.safetensors`` already in the repo.
        create_pr: Open a pull request instead of committing to ``main`` (never replaces anything).
        private: Create the repo private (otherwise the account's / organisation's default).
        commit_message: Commit (or pull request) title.
        api: An ``HfApi`` (tests pass a mock).
        revision: Branch to commit to (created from ``main`` if absent), or the base of the pull request.

    The token comes from huggingface_hub's usual places (``HF_TOKEN``, ``hf auth login``) and is
    never read, printed or written here.
    """
    folder = Path(folder)
    check_staged_folder(folder)
    api = api or hub_api()
    check_hub_access(api)
    api.create_repo(repo_id, exist_ok=True, private=True if private else None)
    if revision and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    check_upload_allowed(repo_id, overwrite=overwrite, create_pr=create_pr, api=api, revision=revision)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message or f'Add {folder.name} (timm-spe publish)',
        create_pr=create_pr,
        **({'revision': revision} if revision else {}),
    )


def read_eval_json(path: Optional[PathLike]) -> Optional[Dict[str, Any]]:
    """The result file of ``timm-spe eval --out`` (None if ``path`` is None); checks it is one."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"--eval-json '{path}' does not exist (write it with `timm-spe eval ... --out FILE`).")
    try:
        with open(path) as f:
            result = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--eval-json '{path}' is not JSON ({e}); write it with `timm-spe eval ... --out FILE`.") from e
    for key in ('top1', 'top5', 'num_images', 'data'):
        if key not in result:
            raise ValueError(f"'{path}' is not a `timm-spe eval` result (missing '{key}').")
    return result
