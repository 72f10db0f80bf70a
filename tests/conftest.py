"""pytest's hooks and fixtures: a tiny generated ImageFolder, a run helper, a fresh state per test.

What test files import is in helpers.py.
"""
import gc
import logging
import os

import torch

# Without a GPU, Triton kernels (timm_moex.ops.moex_triton) run in Triton's CPU interpreter. Triton
# reads this when it is first imported, which timm does: it must be set before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

import pytest  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from helpers import make_image_folder  # noqa: E402


def pytest_collection_finish(session):
    """Under mutmut (benchmarks/mutation.py), move what collection allocated out of the garbage collector's sight.

    mutmut forks one process per mutant from a process that has collected the tests, and pytest ends every
    session with five full collections: without this, each mutant's process walks (and so copies) the whole
    torch and timm heap, seconds per mutant.
    """
    if 'MUTANT_UNDER_TEST' in os.environ:
        gc.freeze()


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('imagefolder'))


@pytest.fixture
def run_args(image_folder, tmp_path):
    """Command-line arguments of a 2-epoch run of a tiny model on the generated folder."""
    def args(*extra, out=None):
        out = out or tmp_path / 'run'
        return ['--dataset', 'imagefolder', '--data-dir', str(image_folder), '--model', 'resnet10t',
                '--epochs', '2', '--batch-size', '8', '--workers', '0', '--lr', '0.05', '--seed', '0',
                '--output-dir', str(out), '--progress', 'false', *extra]
    return args


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """train_moex.main runs in-process several times: give each run a fresh Accelerate state."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def restore_root_logger():
    """timm's train.py (run in-process by some tests) adds root-logger handlers bound to that test's captured
    stderr; left in place, they fail every later log record once that stream is closed."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
