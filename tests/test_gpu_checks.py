"""benchmarks/gpu_checks.sh refuses what it cannot run, before it installs or writes anything."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import ROOT

SCRIPT = ROOT / 'benchmarks' / 'gpu_checks.sh'
pytestmark = pytest.mark.skipif(shutil.which('bash') is None, reason='needs bash')


def run(tmp_path: Path, *steps: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(tmp_path / 'out'))
    return subprocess.run(['bash', str(SCRIPT), *steps], capture_output=True, text=True, env=env, timeout=120)


def test_unknown_step_is_named_with_the_known_ones(tmp_path):
    proc = run(tmp_path, 'tests', 'speed-resnet-18')
    assert proc.returncode == 2
    assert "unknown step 'speed-resnet-18'" in proc.stderr
    assert 'speed-resnet18' in proc.stderr and 'compile-pyramidnet' in proc.stderr
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow  # runs the shell script, which starts python twice
@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal without a GPU')
def test_without_cuda_it_stops_before_any_step(tmp_path):
    proc = run(tmp_path, 'moex-op')
    assert proc.returncode == 6
    assert 'no CUDA device' in proc.stdout
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['env.txt']
