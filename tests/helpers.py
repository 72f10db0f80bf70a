"""What several test files share: paths, small models and batches, checks, and the files found outside the repository.

The test files import this module (``from helpers import ...``); pytest puts ``tests/`` on ``sys.path`` because it
is not a package. ``conftest.py`` keeps only pytest's fixtures and hooks.

Some tests need files that are not part of the repository. Each is named by an environment variable, and the tests
that need it skip, naming the variable, when it is unset or names nothing there:

    TIMM_TRAIN_PY            timm's ``train.py`` (tests/test_moex_timm_train.py)
    TIMM_TEST_MODELS_PY      timm's ``tests/test_models.py``, in its ``tests/`` folder (tests/test_timm_conformance.py)
    TIMM_MOEX_CIFAR10_JPEG   CIFAR-10 as JPEG, ``train/`` and ``test/`` class folders (default: ``data/cifar10``)
"""
import csv
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Optional, Tuple

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from timm_moex import attach_moex

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_JPEG = Path(os.environ.get('TIMM_MOEX_CIFAR10_JPEG', ROOT / 'data' / 'cifar10'))


def fixture_file(variable: str, what: str) -> Tuple[Optional[Path], pytest.MarkDecorator]:
    """The file that the environment variable ``variable`` names, and a mark that skips a test without it.

    Args:
        variable: The environment variable.
        what: What the file is, for the skip reason.

    Returns:
        The path (None when the variable is unset) and a ``skipif`` mark whose reason names the variable.
    """
    value = os.environ.get(variable)
    path = Path(value) if value else None
    if path is None:
        reason = f'set {variable} to {what} to run this test'
    else:
        reason = f'{variable}={path} is not a file; it should be {what}'
    return path, pytest.mark.skipif(path is None or not path.is_file(), reason=reason)


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


def read_summary(out: Path) -> list:
    """The rows of a training run's summary.csv, as dicts of strings."""
    with open(out / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- models and batches

def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def calibrate_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set BN running stats to the batch stats of x, so eval outputs have a sane scale."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch gives exactly its statistics
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def freeze_batch_stats(model: nn.Module) -> nn.Module:
    """Training mode with BN running statistics untouched, so forwards are comparable."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    return model


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The flattened gradient of the cross-entropy of ``model(x)``, its random draws (dropout, ShakeDrop) seeded."""
    model.zero_grad()
    torch.manual_seed(seed)  # the same draws in the runs that are compared
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def make(name: str = 'resnet18', size: int = 64, seed: int = 0, **kwargs):
    """A timm model (10 classes unless ``kwargs`` say otherwise) and a batch of 4 images, both seeded."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **{'num_classes': 10, **kwargs})
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def cifar_model(moex: bool = False, seed: int = 0, num_classes: int = 5, **kwargs) -> nn.Module:
    """A seeded ``resnet18_cifar`` (``kwargs`` to ``timm.create_model``), with a MoEx hook when ``moex``."""
    torch.manual_seed(seed)
    model = timm.create_model('resnet18_cifar', num_classes=num_classes, **kwargs)
    if moex:
        attach_moex(model)
    return model


def batch(n: int = 6, size: int = 32, seed: int = 0, num_classes: int = 5):
    """``n`` random images of ``size`` and their labels, from their own generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g)
