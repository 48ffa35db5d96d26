""" ``timm-spe``'s errors: one line on stderr, with the fix; the traceback only with ``--debug``

``_error_message`` turns what a command raised into the message with its fix (a Hub HTTP error's from its status,
never from the exception's text: a server may echo request headers); ``_fail`` prints it, token-free (``_scrub``).
"""
import errno
import importlib
import os
import re
import socket
import sys
import traceback

from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled
from safetensors import SafetensorError

from ..hub import NO_TOKEN_MESSAGE

_TOKEN_LIKE = re.compile(r"""(hf_[A-Za-z0-9]{16,}|api_org_[A-Za-z0-9]{16,})"""
                         r"""|((?i:authorization['"]?\s*[:=]\s*['"]?(?:bearer\s+)?|bearer\s+))[^\s'",]+""")


def _scrub(text: str) -> str:
    """``text`` without anything token-like: the token of HF_TOKEN / HUGGING_FACE_HUB_TOKEN, ``hf_...`` /
    ``api_org_...`` strings, ``Bearer ...`` / ``Authorization: ...`` values."""
    for var in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN'):
        token = (os.environ.get(var) or '').strip()
        if len(token) >= 4:
            text = text.replace(token, '***')
    return _TOKEN_LIKE.sub(lambda m: m.group(2) + '***' if m.group(2) else 'hf_***', text)


def _one_line(text: str, limit: int = 2000) -> str:
    text = ' '.join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _network_error_types() -> tuple:
    types = [ConnectionError, TimeoutError, socket.gaierror]
    for module, names in (('httpx2', ('TransportError',)), ('httpx', ('TransportError',)),
                          ('requests', ('ConnectionError', 'Timeout'))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        types += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(types)


def _is_network_error(e: BaseException, chain: bool = False) -> bool:
    """``e`` (with ``chain``: or its cause / context) is a failure to reach a server."""
    for err in (e, e.__cause__, e.__context__) if chain else (e,):
        if err is None or isinstance(err, HfHubHTTPError):  # an answer from the server, not a network failure
            continue
        if isinstance(err, _network_error_types()) or (
                isinstance(err, OSError) and err.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN)):
            return True
    return False


def _hub_http_message(e: HfHubHTTPError) -> str:
    """Built here, never from the exception's text (a server may echo request headers)."""
    status = getattr(getattr(e, 'response', None), 'status_code', None)
    fix = '`hf auth login` or HF_TOKEN'
    if status == 401:
        return (f"the Hub rejected the token (HTTP 401 Unauthorized: invalid, expired or revoked): log in again "
                f"with {fix} using a token with write access.")
    if status == 403:
        return (f"the token may not do this (HTTP 403 Forbidden): use a token with write access to the repo's "
                f"organisation ({fix}), pass --repo-id ORG/NAME of a namespace you can write to, or --create-pr.")
    if status == 404:
        return (f"the Hub has no such repo, branch or file, or the token may not see it (HTTP 404): check --repo-id "
                f"/ --revision and that the token ({fix}) belongs to an account with access.")
    if status == 429:
        return 'the Hub is rate-limiting these requests (HTTP 429 Too Many Requests): wait a few minutes and retry.'
    if status is not None and status >= 500:
        return (f"the Hub failed to answer (HTTP {status}): retry later (HF_ENDPOINT is {hf_constants.ENDPOINT}).")
    said = _one_line(_scrub(str(getattr(e, 'server_message', None) or '')), 200)
    return (f"the Hub refused the request (HTTP {status}{': ' + said if said else ''}): check --repo-id / --revision "
            f"and the token ({fix}).")


def _error_message(e: BaseException) -> str:
    """The one-line message, with the fix, of an exception a command may raise."""
    if isinstance(e, LocalTokenNotFoundError):
        return NO_TOKEN_MESSAGE
    if isinstance(e, OfflineModeIsEnabled):
        return (f"the Hub cannot be reached in offline mode (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '1')}): "
                f"unset HF_HUB_OFFLINE to upload, or stage only (publish --dry-run) and `timm-spe upload` later.")
    if isinstance(e, HfHubHTTPError):
        return _hub_http_message(e)
    if _is_network_error(e):
        return (f"cannot reach the Hugging Face Hub at {hf_constants.ENDPOINT} ({type(e).__name__}): check the "
                f"network connection and HF_ENDPOINT / proxy settings, then retry; a staged folder can be uploaded "
                f"later with `timm-spe upload DIR`.")
    if isinstance(e, SafetensorError):
        return (f"not a readable safetensors file ({e}): it is truncated or corrupt; write it again (timm-spe "
                f"convert) or download it again.")
    if isinstance(e, KeyError):
        return f'missing entry {e} (rerun with --debug for the traceback).'
    if isinstance(e, (FileNotFoundError, FileExistsError, ValueError, RuntimeError)) and str(e):
        return str(e)  # our own checks' messages (they name the fix)
    if _is_network_error(e, chain=True):
        return _error_message(ConnectionError())
    if isinstance(e, OSError):
        return f'{e} (rerun with --debug for the traceback).'
    return f'unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback, and please report it).'


def _fail(command: str, message: str, debug: bool) -> None:
    """Exit 1 with ``timm-spe COMMAND: error: MESSAGE`` (one line, token-free) on stderr; with ``debug`` the
    traceback of the exception being handled comes first."""
    if debug:
        sys.stderr.write(_scrub(traceback.format_exc()))
        sys.stderr.flush()
    raise SystemExit(f'timm-spe {command}: error: {_one_line(_scrub(message))}')

