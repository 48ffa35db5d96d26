"""The package's imports run one way, as timm's do: the weights stack from the registry up to the model files, the SPE
math below the layers that use it, nothing importing a model file, no circles, and no file too long to read."""
import ast
from pathlib import Path

import pytest
from helpers import ROOT

PACKAGE = ROOT / 'timm_spe'


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _package_imports(path: Path) -> set:
    """The timm_spe modules ``path`` imports anywhere in it (module level or inside a function)."""
    here = _module_name(path)
    package = here if path.name == '__init__.py' else here.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split('.')[0] == 'timm_spe'}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')[:len(package.split('.')) - node.level + 1]
                mod = '.'.join(base + ([node.module] if node.module else []))
            elif (node.module or '').split('.')[0] == 'timm_spe':
                mod = node.module
            else:
                continue
            for alias in node.names:  # `from . import hub` names a module
                sub = f'{mod}.{alias.name}'
                found.add(sub if _file_of(sub) else mod)
    return {m for m in found if _file_of(m) and m != here}


def _file_of(module: str):
    base = ROOT.joinpath(*module.split('.'))
    for f in (base.with_suffix('.py'), base / '__init__.py'):
        if f.is_file():
            return f
    return None


GRAPH = {_module_name(f): _package_imports(f) for f in PACKAGE.rglob('*.py')}


def test_the_registry_imports_nothing_from_the_package():
    assert GRAPH['timm_spe.registry'] == set()


@pytest.mark.parametrize('module, allowed', [
    ('timm_spe.pretrained', {'timm_spe.registry', 'timm_spe.labels', 'timm_spe._paths'}),
    ('timm_spe.hub', {'timm_spe.registry', 'timm_spe.labels', 'timm_spe.version', 'timm_spe._paths'}),
    ('timm_spe.builder', {'timm_spe.registry', 'timm_spe.hub'}),
])
def test_each_layer_of_the_weights_stack_imports_only_the_layers_below_it(module, allowed):
    assert GRAPH[module] <= allowed, f'{module} imports {sorted(GRAPH[module] - allowed)}'


def test_nothing_but_the_package_face_imports_a_model_file():
    importers = sorted(m for m, deps in GRAPH.items() if 'timm_spe.resnet' in deps)
    assert importers == ['timm_spe'], importers


def test_the_package_has_no_import_circle():
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError('import circle: ' + ' -> '.join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for d in sorted(GRAPH.get(m, ())):
            if d != 'timm_spe':  # every module's package face: importing it is not a dependency on a module
                visit(d)
        stack.pop()
        done.add(m)

    for m in sorted(GRAPH):
        visit(m)


@pytest.mark.parametrize('folder', ['timm_spe', 'benchmarks'])
def test_no_source_file_is_over_450_lines(folder):
    long = {str(f.relative_to(ROOT)): n for f in (ROOT / folder).rglob('*.py')
            if (n := len(f.read_text().splitlines())) > 450}
    assert not long, long
