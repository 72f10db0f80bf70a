"""timm's own model test suite on a representative set of this package's models.

timm's ``tests/test_models.py`` (forward, backward, default cfgs, features_only, forward_intermediates,
TorchScript, FX) runs unmodified in a subprocess from the fixtures beside the checkout; its conftest imports
``timm_moex`` so that the package's models are listed. The set covers each model family of the package:
a CIFAR PyramidNet with basic blocks, one with bottlenecks, the CIFAR ResNet, and a ``*_moex`` variant. The
variants skip the two tests that script the model (a Python forward hook cannot be compiled by TorchScript;
``timm_moex.strip_moex`` returns the scriptable model, tested in test_moex_variants.py).
"""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

import pytest

from conftest import ROOT

TIMM_TESTS = ROOT.parent / 'shared' / 'timm' / 'tests' / 'test_models.py'
MODELS = ('pyramidnet110_a48', 'pyramidnet164_a270', 'resnet18_cifar', 'pyramidnet110_a48_moex')
VARIANT_SKIPS = ('test_model_forward_torchscript', 'test_model_forward_fx_torchscript')
# What each model must have passed. (timm runs its forward_intermediates tests on timm's own model modules
# only; test_cifar_models.py and test_pyramidnet.py test the package's.)
EXPECTED = {'test_model_forward', 'test_model_backward', 'test_model_default_cfgs', 'test_model_forward_features',
            'test_model_forward_fx', 'test_model_backward_fx'}


@pytest.mark.slow
@pytest.mark.skipif(not TIMM_TESTS.is_file(), reason=f"timm's test suite is not at {TIMM_TESTS} (fixtures absent)")
def test_timms_model_suite_passes_on_the_packages_models(tmp_path):
    names = ' or '.join(MODELS)
    skips = ' or '.join(VARIANT_SKIPS)
    report = tmp_path / 'report.xml'
    cmd = [sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider', '-q', '-x', str(TIMM_TESTS),
           '-k', f'({names}) and not (_moex and ({skips}))', f'--junitxml={report}']
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE='1', PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]

    passed = defaultdict(set)
    for case in ET.parse(report).getroot().iter('testcase'):
        if case.find('skipped') is None and case.find('failure') is None and case.find('error') is None:
            test, params = case.get('name').split('[', 1)
            passed[params.rstrip(']').split('-', 1)[1]].add(test)
    for model in MODELS:
        expected = EXPECTED if model.endswith('_moex') else EXPECTED | set(VARIANT_SKIPS)
        assert expected <= passed[model], (model, sorted(expected - passed[model]))
