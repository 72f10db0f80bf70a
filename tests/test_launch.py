"""What a user sees of a user error under ``accelerate launch``, the README's headline form: with ``-q`` the one line
and nothing of accelerate's traceback (accelerate exits 1); without it, the line and then accelerate's traceback."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != 'linux', reason='launched on Linux')]

ERROR_LINE = 'train_moex.py: configuration error: epochs: must be positive, got 0'


def launch(*launcher_args, tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--cpu', '--num_processes', '1', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', *launcher_args, str(ROOT / 'train_moex.py'),
           '--config', 'quickstart', '--epochs', '0', '--output-dir', str(tmp_path / 'run')]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_quiet_launch_shows_the_one_line_alone(tmp_path):
    proc = launch('-q', tmp_path=tmp_path)
    assert proc.returncode == 1  # accelerate's own code for a failed process; the script's code is 2
    assert proc.stderr.strip().splitlines()[-1] == ERROR_LINE, proc.stderr
    assert 'Traceback' not in proc.stderr, proc.stderr
    assert not (tmp_path / 'run').exists()


def test_a_plain_launch_adds_accelerates_traceback(tmp_path):
    proc = launch(tmp_path=tmp_path)
    assert proc.returncode == 1
    assert ERROR_LINE in proc.stderr.splitlines(), proc.stderr
    assert 'CalledProcessError' in proc.stderr and 'returned non-zero exit status 2' in proc.stderr
