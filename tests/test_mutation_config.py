"""The mutation-testing setup stays valid: ``[tool.mutmut]`` of pyproject.toml names files that exist,
mutates library modules only, docs/mutation.md reports exactly those modules, and the driver
benchmarks/mutation.py reads mutmut's results correctly. Nothing here runs mutmut."""
import json
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT, load_benchmark

tomllib = pytest.importorskip('tomllib')

APPLICATION = ('timm_moex.train', 'train_moex')
"""The training application (a package and a script), which the library never imports."""


@pytest.fixture(scope='module')
def config():
    return tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['mutmut']


@pytest.fixture(scope='module')
def driver():
    return load_benchmark('mutation')


def module_names(config):
    return [path[:-len('.py')].replace('/', '.') for path in config['only_mutate']]


def test_every_configured_path_exists(config):
    assert config['only_mutate'], 'only_mutate is empty: mutmut would mutate the whole package'
    for key in ('only_mutate', 'also_copy', 'source_paths'):
        missing = [p for p in config[key] if not (ROOT / p).exists()]
        assert not missing, f'{key} names paths that do not exist: {missing}'
    selection = config['pytest_add_cli_args_test_selection']
    files = [arg for arg in selection if not arg.startswith('-')]
    assert files, 'no test file selected'
    missing = [f for f in files if not (ROOT / f).is_file()]
    assert not missing, f'pytest_add_cli_args_test_selection names test files that do not exist: {missing}'
    deselected = [arg.partition('=')[2] for arg in selection if arg.startswith('--deselect=')]
    for node in deselected:
        path, _, test = node.partition('::')
        assert path in files, f'{node} deselects from a file that is not selected'
        assert re.search(rf'^def {re.escape(test)}\(', (ROOT / path).read_text(), re.M), \
            f'{node} deselects a test that does not exist'


def test_mutated_files_are_library_modules(config):
    for path in config['only_mutate']:
        assert path.startswith('timm_moex/') and path.endswith('.py'), path
        name = path[:-len('.py')].replace('/', '.')
        assert not any(name == app or name.startswith(app + '.') for app in APPLICATION), \
            f'{name} belongs to the training application'


@pytest.mark.slow
def test_mutated_modules_import_without_the_training_application(config):
    """In a fresh interpreter, so that what the other tests imported does not count."""
    probe = ('import importlib, json, sys\n'
             f'for name in {module_names(config)!r}:\n'
             '    importlib.import_module(name)\n'
             'print(json.dumps(sorted(sys.modules)))\n')
    proc = subprocess.run([sys.executable, '-c', probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(module_names(config)) <= set(loaded)
    application = [m for m in loaded if any(m == app or m.startswith(app + '.') for app in APPLICATION)]
    assert not application, f'importing the mutated modules loads the training application: {application}'


def test_the_docs_table_lists_exactly_the_configured_modules(config):
    text = (ROOT / 'docs' / 'mutation.md').read_text()
    listed = re.findall(r'^\| `(timm_moex\.[\w.]+)` \|', text, re.M)
    assert sorted(listed) == sorted(module_names(config))
    assert len(listed) == len(set(listed)), 'a module is listed twice'


def test_the_driver_reads_the_configuration(config, driver):
    assert driver.configured_modules(driver.mutmut_config(ROOT)) == module_names(config)


SAMPLE_RESULTS = """\
    timm_moex.loss.moex.x_interpolated_loss__mutmut_1: killed
    timm_moex.loss.moex.x_interpolated_loss__mutmut_2: survived
    timm_moex.loss.moex.xǁMoExLossǁforward__mutmut_1: killed
    timm_moex.loss.moex.xǁMoExLossǁ__init____mutmut_3: timeout
    timm_moex.hooks.moex.xǁMoExHookǁarm__mutmut_2: survived
    timm_moex.hooks.moex.x_get_moex_hook__mutmut_1: no tests
    timm_moex.ops.moex.x_parse_norm__mutmut_1: not checked
    timm_moex.ops.moex.x_parse_norm__mutmut_2: killed
    timm_moex.utils.checks.x_check_choice__mutmut_1: not checked
Running stats
"""


def test_parse_results_groups_functions_and_methods_by_module(driver):
    by_module = driver.parse_results(SAMPLE_RESULTS)
    assert set(by_module) == {'timm_moex.loss.moex', 'timm_moex.hooks.moex', 'timm_moex.ops.moex', 'timm_moex.utils.checks'}
    assert by_module['timm_moex.loss.moex'] == {
        'timm_moex.loss.moex.x_interpolated_loss__mutmut_1': 'killed',
        'timm_moex.loss.moex.x_interpolated_loss__mutmut_2': 'survived',
        'timm_moex.loss.moex.xǁMoExLossǁforward__mutmut_1': 'killed',
        'timm_moex.loss.moex.xǁMoExLossǁ__init____mutmut_3': 'timeout',
    }
    assert by_module['timm_moex.hooks.moex'] == {'timm_moex.hooks.moex.xǁMoExHookǁarm__mutmut_2': 'survived',
                                            'timm_moex.hooks.moex.x_get_moex_hook__mutmut_1': 'no tests'}


def test_table_counts_timeouts_as_caught_and_leaves_unchecked_mutants_out(driver):
    rows = driver.table(driver.parse_results(SAMPLE_RESULTS),
                        ['timm_moex.loss.moex', 'timm_moex.hooks.moex', 'timm_moex.ops.moex', 'timm_moex.utils.checks', 'timm_moex.task.moex'])
    lines = rows.splitlines()
    assert lines[0] == '| module | mutants | killed | timeout | survived | other | score |'
    assert lines[2] == '| `timm_moex.loss.moex` | 4 | 2 | 1 | 1 | 0 | 75.0 % |'
    assert lines[3] == '| `timm_moex.hooks.moex` | 2 | 0 | 0 | 1 | 1 | 0.0 % |'
    assert lines[4] == '| `timm_moex.ops.moex` | 1 | 1 | 0 | 0 | 0 (+1 not checked) | 100.0 % |'
    assert lines[5] == '| `timm_moex.utils.checks` | not run | | | | | |'
    assert lines[6] == '| `timm_moex.task.moex` | not run | | | | | |'
    assert len(lines) == 7


def test_a_rerun_of_survivors_is_laid_over_the_runs_before(driver):
    previous = driver.parse_results(SAMPLE_RESULTS)
    # mutmut found new tests: everything else is 'not checked' again
    rerun = driver.parse_results('''\
    timm_moex.loss.moex.x_interpolated_loss__mutmut_1: not checked
    timm_moex.loss.moex.x_interpolated_loss__mutmut_2: killed
    timm_moex.hooks.moex.xǁMoExHookǁarm__mutmut_2: survived
    timm_moex.hooks.moex.x_get_moex_hook__mutmut_1: timeout
    timm_moex.ops.moex.x_parse_norm__mutmut_2: not checked
''')
    merged = driver.merge_rerun(previous, rerun)
    assert merged['timm_moex.loss.moex'] == {**previous['timm_moex.loss.moex'],
                                          'timm_moex.loss.moex.x_interpolated_loss__mutmut_2': 'killed'}
    assert merged['timm_moex.hooks.moex'] == {'timm_moex.hooks.moex.xǁMoExHookǁarm__mutmut_2': 'survived',
                                         'timm_moex.hooks.moex.x_get_moex_hook__mutmut_1': 'timeout'}
    assert merged['timm_moex.ops.moex'] == previous['timm_moex.ops.moex']
    assert merged['timm_moex.utils.checks'] == previous['timm_moex.utils.checks']
    assert previous == driver.parse_results(SAMPLE_RESULTS), 'the previous statuses are not changed in place'


def test_a_module_changed_since_its_last_run_is_named(driver, tmp_path):
    for name in ('loss/moex', 'hooks/moex', 'ops/moex'):
        (tmp_path / 'timm_moex' / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / 'timm_moex' / f'{name}.py').write_text('')
    for name, age in (('loss/moex', 0), ('hooks/moex', 100)):  # the copy's age relative to the source
        copy = tmp_path / 'mutants' / 'timm_moex' / f'{name}.py'
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text('')
        mtime = (tmp_path / 'timm_moex' / f'{name}.py').stat().st_mtime
        os.utime(copy, (mtime - age, mtime - age))
    modules = ['timm_moex.loss.moex', 'timm_moex.hooks.moex', 'timm_moex.ops.moex']
    assert driver.changed_modules(modules, tmp_path) == ['timm_moex.hooks.moex', 'timm_moex.ops.moex']


def test_survivors_of_a_changed_module_are_refused_in_one_line(driver, monkeypatch, capsys):
    monkeypatch.setattr(driver, 'changed_modules', lambda modules, root=ROOT: [m for m in modules if 'hooks' in m])
    with pytest.raises(SystemExit) as exit_info:
        driver.main(['--survivors', 'loss.moex', 'hooks.moex'])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].partition(': error: ')[2] == (
        'timm_moex.hooks.moex changed since the last mutation run, so the survivors it names are other '
        'mutants now; run the whole module: python benchmarks/mutation.py hooks.moex')
