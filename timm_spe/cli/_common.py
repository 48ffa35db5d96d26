""" What every ``timm-spe`` command shares: its subparser's layout and help, and the model from ``MODEL[.TAG]``

``add_command`` is how each command module adds its subparser: the same description, examples epilog, help
formatter and ``--debug`` option for every command but ``run``.
"""
import argparse
import shlex
from typing import Optional

import timm
import torch
from timm.models import split_model_name_tag

from ..card import registered_cfg
from ..convert import load_checkpoint_file, load_weights
from ..hub import validate_tag

DEBUG_HELP = 'on an error, print the traceback before the one-line message (default: off)'


def _create(model: str, checkpoint: Optional[str], use_ema: bool = False) -> torch.nn.Module:
    """A model from ``MODEL[.TAG]``: weights from ``checkpoint`` if given, else the tag's pretrained weights."""
    name, tag = split_model_name_tag(model)
    if not timm.is_model(name):
        raise SystemExit(f"unknown model '{name}'; see timm.list_models('*spe*') / timm.list_models('resnet*').")
    if tag:
        validate_tag(tag, f"the tag of '{model}'")
    known_tag = not tag or registered_cfg(model) is not None
    if not known_tag and not checkpoint:
        tags = [t.split('.', 1)[1] for t in timm.list_pretrained(f'{name}.*')]
        raise SystemExit(f"'{name}' has no pretrained tag '{tag}' (tags with weights: {tags}); give --checkpoint "
                         f"for new weights.")
    if checkpoint:
        state_dict, _ = load_checkpoint_file(checkpoint, use_ema=use_ema)
        kwargs = {'num_classes': state_dict['fc.weight'].shape[0]} if 'fc.weight' in state_dict else {}
        _check_classes(model, kwargs.get('num_classes'), checkpoint)
        if not known_tag:  # weights for a tag not registered yet (e.g. a new training budget)
            model, kwargs['pretrained_cfg_overlay'] = name, {'tag': tag}
        m = timm.create_model(model, **kwargs)
        load_weights(m, checkpoint, use_ema=use_ema)
        return m
    return timm.create_model(model, pretrained=True)


def _check_classes(model_tag: str, num_classes: Optional[int], checkpoint: str) -> None:
    """A checkpoint's classifier must fit the tag it is used as (no CIFAR-100 weights as '.cifar10')."""
    cfg = registered_cfg(model_tag) if '.' in model_tag else None
    if cfg is not None and num_classes is not None and cfg.num_classes != num_classes:
        raise SystemExit(
            f"'{checkpoint}' has a {num_classes}-class classifier but '{model_tag}' is a {cfg.num_classes}-class "
            f"tag: check --model/--tag (e.g. .cifar100 for 100 classes).")


def _command(args) -> str:
    """The command line that ran, quoted so it can be pasted into a shell."""
    return shlex.join(['timm-spe', *(getattr(args, 'argv', None) or [])])


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout and appends '(default: X)' to optional options whose help does not state it (a
    required one has no default to show)."""

    def _get_help_string(self, action):
        text = action.help or ''
        flags = (argparse._StoreTrueAction, argparse._HelpAction, argparse._VersionAction)
        if (action.option_strings and 'default' not in text and action.default is not argparse.SUPPRESS
                and not action.required and not isinstance(action, flags)):
            text += ' (default: %(default)s)'
        return text


def _examples(*lines: str) -> str:
    return 'example:\n' + '\n'.join(f'  {line}' for line in lines)


def add_command(subparsers, name, help, *examples) -> argparse.ArgumentParser:
    """Add command ``name`` to ``subparsers``: ``help`` as its description, ``examples`` as its epilog."""
    p = subparsers.add_parser(name, help=help, description=help, epilog=_examples(*examples),
                              formatter_class=_HelpFormatter)
    if name != 'run':  # `timm-spe run` passes everything after the script to it
        p.add_argument('--debug', action='store_true', default=argparse.SUPPRESS, help=DEBUG_HELP)
    return p
