"""timm's own model test suite on a representative set of this package's models.

timm's ``tests/test_models.py`` (forward, backward, default cfgs, features_only, forward_intermediates,
TorchScript, FX), which ``TIMM_TEST_MODELS_PY`` names, runs unmodified in a subprocess; the ``conftest.py``
beside it imports ``timm_moex`` so that the package's models are listed. The set covers each model family of the
package: a CIFAR PyramidNet with basic blocks, one with bottlenecks, the CIFAR ResNet, and ``*_moex`` variants of the
PyramidNet and the ResNet, which pass every test the plain models pass, the TorchScript ones included (scripting
compiles the MoEx forward hook, to a no-op).
"""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

import pytest

from helpers import ROOT, fixture_file

TIMM_TESTS, needs_timm_tests = fixture_file('TIMM_TEST_MODELS_PY', "timm's tests/test_models.py")
MODELS = ('pyramidnet110_a48', 'pyramidnet164_a270', 'resnet18_cifar', 'pyramidnet110_a48_moex',
          'resnet18_cifar_moex')
# What each model must have passed. (timm runs its forward_intermediates tests on timm's own model modules
# only; test_cifar_models.py and test_pyramidnet.py test the package's.)
EXPECTED = {'test_model_forward', 'test_model_backward', 'test_model_default_cfgs', 'test_model_forward_features',
            'test_model_forward_fx', 'test_model_backward_fx', 'test_model_forward_torchscript',
            'test_model_forward_fx_torchscript'}


@pytest.mark.slow
@needs_timm_tests
def test_timms_model_suite_passes_on_the_packages_models(tmp_path):
    names = ' or '.join(MODELS)
    report = tmp_path / 'report.xml'
    cmd = [sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider', '-q', '-x', str(TIMM_TESTS),
           '-k', names, f'--junitxml={report}']
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE='1', PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]

    passed = defaultdict(set)
    for case in ET.parse(report).getroot().iter('testcase'):
        if case.find('skipped') is None and case.find('failure') is None and case.find('error') is None:
            test, params = case.get('name').split('[', 1)
            passed[params.rstrip(']').split('-', 1)[1]].add(test)
    for model in MODELS:
        assert EXPECTED <= passed[model], (model, sorted(EXPECTED - passed[model]))
