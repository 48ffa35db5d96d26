"""Build hook: the shipped pretrained weights become package data of the wheel, without a second copy in git.

The weights live once, in the committed Hub folder ``hub_cards/<model>.<tag>/model.safetensors``. For every tag
that ``timm_spe/registry.py`` marks ``'shipped': True``, ``build_py`` copies that file to
``timm_spe/weights/<model>.<tag>.safetensors`` in the build tree (so into the wheel) after checking its sha256
against the registry; ``sdist`` adds the same files to the source archive so a wheel can be built from it.
The registry is read with ``ast`` (no torch / timm import at build time). All other settings: pyproject.toml.
"""
import ast
import hashlib
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent


def shipped_weights():
    """``{'<model>.<tag>': (source file in hub_cards/, sha256)}`` of the tags the registry ships."""
    tree = ast.parse((ROOT / 'timm_spe' / 'registry.py').read_text(encoding='utf-8'))
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, 'target', None)
        if isinstance(target, ast.Name) and target.id == 'PRETRAINED_TAGS':
            table = ast.literal_eval(node.value)
            return {tag: (Path('hub_cards') / tag / 'model.safetensors', e['sha256'])
                    for tag, e in table.items() if e.get('shipped')}
    raise SystemExit('timm_spe/registry.py has no PRETRAINED_TAGS literal')


def _checked(src: Path, sha256: str) -> Path:
    if not src.is_file():
        raise SystemExit(f'{src} is missing: the registry ships it (restore the Hub folder, or unset "shipped").')
    actual = hashlib.sha256(src.read_bytes()).hexdigest()
    if actual != sha256:
        raise SystemExit(f'{src} has sha256 {actual} but timm_spe/registry.py records {sha256}.')
    return src


class BuildPyWithWeights(build_py):
    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):  # editable install: timm_spe reads hub_cards/ in the clone
            return
        out = Path(self.build_lib) / 'timm_spe' / 'weights'
        out.mkdir(parents=True, exist_ok=True)
        for tag, (src, sha) in shipped_weights().items():
            shutil.copyfile(_checked(ROOT / src, sha), out / f'{tag}.safetensors')

    def get_outputs(self, include_bytecode=True):
        weights = [str(Path(self.build_lib) / 'timm_spe' / 'weights' / f'{t}.safetensors') for t in shipped_weights()]
        return super().get_outputs(include_bytecode) + ([] if getattr(self, 'editable_mode', False) else weights)


class SdistWithWeights(sdist):
    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        for src, sha in shipped_weights().values():
            dst = Path(base_dir) / src
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_checked(ROOT / src, sha), dst)


if __name__ == '__main__':  # setuptools runs this file as __main__; tests import it for shipped_weights()
    setup(cmdclass={'build_py': BuildPyWithWeights, 'sdist': SdistWithWeights})
