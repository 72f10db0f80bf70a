"""Fixtures of the training-script tests: a tiny generated ImageFolder and a run helper."""
import gc
import importlib.util
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

# Without a GPU, Triton kernels (timm_moex.ops.moex_triton) run in Triton's CPU interpreter. Triton
# reads this when it is first imported, which timm does: it must be set before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from PIL import Image  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_finish(session):
    """Under mutmut (benchmarks/mutation.py), move what collection allocated out of the garbage collector's sight.

    mutmut forks one process per mutant from a process that has collected the tests, and pytest ends every
    session with five full collections: without this, each mutant's process walks (and so copies) the whole
    torch and timm heap, seconds per mutant.
    """
    if 'MUTANT_UNDER_TEST' in os.environ:
        gc.freeze()


def load_benchmark(name: str) -> ModuleType:
    """The script benchmarks/NAME.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / 'benchmarks' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slow_cases(names, slow) -> list:
    """``names`` as parametrize values, those in ``slow`` marked slow (outside the fast subset)."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in names]


def check_timm_task_arguments(make_task, caplog) -> None:
    """A task built by ``make_task(**kwargs)`` hands timm's ClassificationTask its criterion, criterion_kwargs,
    device, dtype and verbose, and logs nothing with ``verbose=False``."""
    criterion = SoftTargetCrossEntropy()
    task = make_task(criterion=criterion, device=torch.device('cpu'), dtype=torch.float64, verbose=False)
    assert task.criterion is criterion and task.device == torch.device('cpu') and task.dtype == torch.float64
    assert make_task(device=torch.device('meta'), verbose=False).device == torch.device('meta')
    smoothed = make_task(criterion_kwargs=dict(smoothing=0.1), verbose=False)
    assert isinstance(smoothed.criterion, LabelSmoothingCrossEntropy) and smoothed.criterion.smoothing == 0.1
    caplog.clear()
    with caplog.at_level('INFO'):
        make_task(verbose=False)
    assert not caplog.records


def make_image_folder(root: Path, classes=('a', 'b'), train_per_class=16, test_per_class=9, size=32, seed=0):
    """train/<class>/*.png and test/<class>/*.png; class k is brighter in channel k, so it is learnable."""
    rng = np.random.default_rng(seed)
    for split, n in (('train', train_per_class), ('test', test_per_class)):
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 128, (size, size, 3), dtype=np.uint8)
                img[..., k % 3] += 100
                Image.fromarray(img).save(folder / f'{i:03d}.png')
    return root


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
