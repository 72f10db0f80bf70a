"""The package's shape: the library's sub-packages import only the layers below them and never the applications,
imports have no cycles, and no import of the package's own modules hides inside a function; a wheel holds the
applications, the demo's images and the recipes."""
import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT

PACKAGE = ROOT / 'timm_moex'
APPLICATIONS = ('timm_moex.train', 'timm_moex.demo')
# The library's sub-packages, bottom up: a module imports from its own sub-package or from one of a lower rank.
LAYERS = {'utils': 0, 'ops': 1, 'loss': 1, 'hooks': 2, 'task': 3, 'models': 3}
SCRIPT = ROOT / 'train_moex.py'


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


SOURCES = {module_name(p): p for p in [*sorted(PACKAGE.rglob('*.py')), SCRIPT]}


def imports(path: Path):
    """[(imported module of the project, whether the import is inside a function)] of one file.

    An import guarded by ``except ImportError`` (a module that needs an optional package, loaded when first
    used) does not count as inside a function."""
    name = module_name(path)
    package = name.split('.') if path.name == '__init__.py' else name.split('.')[:-1]
    found = []

    def resolve(target: str) -> None:
        while target and target not in SOURCES:  # 'timm_moex.hooks.moex.attach_moex' -> 'timm_moex.hooks.moex'
            target = target.rpartition('.')[0]
        return target or None

    class Visitor(ast.NodeVisitor):
        depth = 0

        def visit_FunctionDef(self, node):
            self.depth += 1
            self.generic_visit(node)
            self.depth -= 1

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_Try(self, node):
            optional = any(isinstance(h.type, ast.Name) and h.type.id in ('ImportError', 'ModuleNotFoundError')
                           for h in node.handlers)
            saved, self.depth = self.depth, (0 if optional else self.depth)
            for child in node.body:
                self.visit(child)
            self.depth = saved
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                self.visit(child)

        def visit_Import(self, node):
            for alias in node.names:
                target = resolve(alias.name)
                if target:
                    found.append((target, self.depth > 0))

        def visit_ImportFrom(self, node):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = '.'.join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                target = resolve(f'{module}.{alias.name}') or resolve(module)
                if target:
                    found.append((target, self.depth > 0))

    Visitor().visit(ast.parse(path.read_text(), str(path)))
    return found


def application_of(module: str):
    """The application a module belongs to (``timm_moex.train``, ``timm_moex.demo``, ``train_moex``), or None."""
    if module == 'train_moex':
        return module
    return next((app for app in APPLICATIONS if module == app or module.startswith(app + '.')), None)


def layer_of(module: str):
    """The library sub-package of a module (``timm_moex.hooks.moex`` -> 'hooks'), or None."""
    parts = module.split('.')
    return parts[1] if len(parts) > 1 and parts[0] == 'timm_moex' and parts[1] in LAYERS else None


def test_the_library_never_imports_the_application():
    for name, path in SOURCES.items():
        if application_of(name):
            continue
        bad = [t for t, _ in imports(path) if application_of(t)]
        assert not bad, f'{name} imports an application: {bad}'


def test_each_layer_imports_only_the_layers_below_it():
    assert {layer_of(name) for name in SOURCES} - {None} == set(LAYERS), 'a sub-package of the library has no rank'
    for name, path in SOURCES.items():
        layer = layer_of(name)
        if layer is None:
            continue
        up = sorted({t for t, _ in imports(path) if layer_of(t) not in (None, layer)
                     and LAYERS[layer_of(t)] >= LAYERS[layer]})
        assert not up, f'{name} ({layer}) imports {up}: not below it'


def test_the_top_level_holds_sub_packages():
    modules = sorted(p.name for p in PACKAGE.glob('*.py'))
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / '__init__.py').is_file())
    assert modules == ['__init__.py'], modules
    assert set(packages) == set(LAYERS) | {'train', 'demo'}, packages


def test_no_import_inside_a_function_of_the_packages_own_modules():
    for name, path in SOURCES.items():
        nested = sorted({t for t, inside in imports(path) if inside})
        assert not nested, f'{name} imports {nested} inside a function'


def test_no_import_cycles():
    graph = {name: sorted({t for t, _ in imports(path) if t != name}) for name, path in SOURCES.items()}
    state = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail('import cycle: ' + ' -> '.join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_the_checker_finds_what_it_looks_for(tmp_path, monkeypatch):
    """The three checks above on a made-up package that breaks each rule."""
    fake = tmp_path / 'timm_moex'
    (fake / 'train').mkdir(parents=True)
    (fake / '__init__.py').write_text('from .a import f\n')
    (fake / 'a.py').write_text('from .b import g\n\ndef f():\n    from .train import config\n\n'
                               'def h():\n    try:\n        from . import c\n    except ImportError:\n        pass\n')
    (fake / 'c.py').write_text('')
    (fake / 'b.py').write_text('from timm_moex.a import f\n')
    (fake / 'train' / '__init__.py').write_text('')
    (fake / 'train' / 'config.py').write_text('import os\n')
    monkeypatch.setattr(sys.modules[__name__], 'ROOT', tmp_path)
    monkeypatch.setattr(sys.modules[__name__], 'SOURCES',
                        {module_name(p): p for p in sorted(fake.rglob('*.py'))})
    assert imports(fake / 'a.py') == [('timm_moex.b', False), ('timm_moex.train.config', True), ('timm_moex.c', False)]
    with pytest.raises(AssertionError, match='imports an application'):
        test_the_library_never_imports_the_application()
    with pytest.raises(AssertionError, match='inside a function'):
        test_no_import_inside_a_function_of_the_packages_own_modules()
    with pytest.raises(pytest.fail.Exception, match='timm_moex.a -> timm_moex.b -> timm_moex.a'):
        test_no_import_cycles()


@pytest.mark.slow
def test_a_wheel_holds_the_application_and_trains_from_a_recipe_name(tmp_path):
    """Built and installed here, then run away from the checkout: moex-train and --config NAME work."""
    wheels = tmp_path / 'wheels'
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(wheels),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel, = wheels.glob('timm_moex-*.whl')
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith('entry_points.txt'))
    assert {'train_moex.py', 'timm_moex/train/validate.py', 'timm_moex/hparams/quickstart.yaml',
            'timm_moex/hparams/cifar100_pyramidnet200_moex.yaml', 'timm_moex/demo/cli.py',
            'timm_moex/demo/assets/sample_features.png', 'timm_moex/ops/moex_triton.py'} <= names
    assert 'moex-train = train_moex:cli' in entry_points
    assert not any(n.startswith(('tests/', 'benchmarks/', 'docs/')) for n in names)

    site = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS='1')
    work = tmp_path / 'elsewhere'
    work.mkdir()
    probe = ('import json, timm_moex, train_moex; from timm_moex.train import load_config; '
             "cfg = load_config(['--config', 'cifar100_pyramidnet200_moex'], check_paths=False); "
             'print(json.dumps([timm_moex.__file__, train_moex.__file__, cfg.config_file, cfg.model, cfg.moex]))')
    proc = subprocess.run([sys.executable, '-c', probe], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    package, script, recipe, model, moex = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(Path(p).is_relative_to(site) for p in (package, script, recipe)), (package, script, recipe)
    assert (model, moex) == ('pyramidnet200', True)

    proc = subprocess.run([str(site / 'bin' / 'moex-train'), '--config', 'quickstart', '--epochs', '1',
                           '--train-limit', '64', '--eval-limit', '32', '--workers', '0', '--progress', 'false'],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((work / 'output' / 'quickstart' / 'results.json').read_text())
    assert results['last']['epoch'] == 1
