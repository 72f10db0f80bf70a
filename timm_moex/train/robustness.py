"""Corruption robustness: top-1 error on corrupted copies of the evaluation set (CIFAR-10-C style).

Hendrycks & Dietterich (ICLR 2019) measure a classifier on 15 corruptions at 5 severities
(:mod:`timm_moex.train.corruptions`). :func:`evaluate_corruptions` makes the corrupted copies on the
fly, a batch at a time, from the evaluation images at the model's input size (after the eval
transform's resize and crop, before its normalization) and reports:

- ``top1_err``: the top-1 error (%) per corruption and severity;
- ``mean_top1_err``: per corruption, the mean over the severities;
- ``mean_corruption_error``: the mean over every corruption and severity. It is *not* the paper's
  mCE, which divides each corruption's summed error by AlexNet's before averaging: AlexNet's
  errors on these images are not available here, so this is the unnormalized mean;
- ``clean_top1_err``: the error on the same images uncorrupted, for reference.

Every image's copy is seeded by (corruption, severity, index in the evaluation set), so runs and
processes see the same copies. Under several processes each takes every n-th image and the
counts are summed; the model runs unwrapped (no DDP collectives), in eval mode, under the run's
autocast.
"""
import copy
import csv
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from tqdm import tqdm

from .config import TrainConfig
from .corruptions import BENCHMARK, CORRUPTIONS, UNAVAILABLE, Corruption, corruption_rng, parse_corruptions
from .device_data import DeviceImageDataset, augment_batch
from .files import atomic_write_bytes, atomic_write_text

__all__ = ['CleanImages', 'clean_images', 'evaluate_corruptions', 'write_corruption_report', 'summary_line',
           'corruption_robustness']

NOTE = ('mean_corruption_error is the unnormalized mean top-1 error over the corruptions and severities; the mCE '
        'of Hendrycks & Dietterich (2019) divides each corruption\'s summed error by AlexNet\'s, whose errors on '
        'these images are not available here')


@dataclass
class CleanImages:
    """Evaluation images at the model's input size, before normalization.

    Attributes:
        images: uint8 (N, H, W, 3).
        targets: int64 (N,).
        index: (N,) the images' positions in the evaluation set, which seed their corrupted copies.
        normalize: uint8 (B, 3, H, W) on the device -> the model's float input, exactly as the
            evaluation loader normalizes.
    """

    images: np.ndarray
    targets: np.ndarray
    index: np.ndarray
    normalize: Callable[[torch.Tensor], torch.Tensor]


def _subset_positions(n: int, limit: int) -> np.ndarray:
    """A fixed random subset (seed 0) of ``limit`` positions out of ``n``, sorted; all when 0 or not smaller."""
    if not limit or limit >= n:
        return np.arange(n)
    return np.sort(torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit].numpy())


def _split_eval_transform(transform) -> (Callable, Callable):
    """(the steps before ToTensor, ToTensor + Normalize as a batch function) of an eval transform."""
    steps = list(getattr(transform, 'transforms', [transform]))
    cut = next((i for i, t in enumerate(steps) if isinstance(t, (transforms.ToTensor, transforms.PILToTensor))),
               None)
    rest = steps[cut:] if cut is not None else []
    if len(rest) != 2 or not isinstance(rest[0], transforms.ToTensor) or not isinstance(rest[1], transforms.Normalize):
        raise ValueError(f'the corruption evaluation needs an eval transform of image steps, ToTensor and Normalize; '
                         f'got {transform}')
    norm = rest[1]
    return transforms.Compose(steps[:cut]), lambda x: norm(x.float().div(255))


def clean_images(eval_set: Dataset, limit: int = 0, process_index: int = 0, num_processes: int = 1) -> CleanImages:
    """This process's share of the evaluation images (every ``num_processes``-th of a fixed subset of
    ``limit``, 0 = all) at the model's input size, uint8.

    Args:
        eval_set: The evaluation set of :func:`~timm_moex.train.data.create_datasets`: a
            :class:`~timm_moex.train.device_data.DeviceImageDataset` or a dataset of PIL images whose
            ``transform`` is image steps (resize, crop), ToTensor and Normalize.
        limit: Use a fixed random subset (seed 0) of this many images; 0 = all.
        process_index: This process's rank.
        num_processes: The number of processes sharing the work.

    Returns:
        The images, their targets and positions, and the normalization of the evaluation loader.
    """
    positions = _subset_positions(len(eval_set), limit)[process_index::num_processes]
    if isinstance(eval_set, DeviceImageDataset):
        chosen = torch.as_tensor(positions, dtype=torch.long, device=eval_set.images.device)
        images = eval_set.images[chosen].permute(0, 2, 3, 1).cpu().numpy()
        targets = eval_set.targets[chosen].cpu().numpy()
        scale, shift, channels_last = eval_set.scale, eval_set.shift, eval_set.channels_last

        def normalize(x):
            x = augment_batch(x, scale.to(x.device), shift.to(x.device))
            return x if channels_last else x.contiguous()

        return CleanImages(images, targets, positions, normalize)
    resize, normalize = _split_eval_transform(eval_set.transform)
    # A copy that stops before ToTensor; the evaluation loader keeps using the original.
    raw = copy.copy(eval_set)
    if isinstance(eval_set, Subset):
        raw.dataset = copy.copy(eval_set.dataset)
        raw.dataset.transform = resize
    else:
        raw.transform = resize
    pairs = [raw[int(i)] for i in positions]
    arrays = [np.asarray(img.convert('RGB'), dtype=np.uint8) for img, _ in pairs]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f'the eval transform gives images of several sizes {sorted({a.shape for a in arrays})[:3]}')
    images = np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), np.uint8)
    targets = np.asarray([t for _, t in pairs], dtype=np.int64)
    return CleanImages(images, targets, positions, normalize)


@torch.no_grad()
def evaluate_corruptions(
        model: torch.nn.Module,
        clean: CleanImages,
        names: Sequence[str],
        severities: Sequence[int],
        accelerator,
        batch_size: int = 256,
        channels_last: bool = False,
        seed: int = 0,
        registry: Optional[Dict[str, Corruption]] = None,
        progress: bool = False,
) -> Dict:
    """Top-1 error of ``model`` on every (corruption, severity) copy of ``clean``, made batch by batch.

    Args:
        model: The classifier (an Accelerate-prepared one is unwrapped: no collective runs per batch).
        clean: This process's images (:func:`clean_images`).
        names: Corruption names of ``registry``.
        severities: Severities 1-5.
        accelerator: The run's Accelerator: device, autocast and the sum over processes.
        batch_size: Images per forward.
        channels_last: Feed channels-last tensors.
        seed: Seeds the corrupted copies with the images' positions (:func:`~timm_moex.train.corruptions.corruption_rng`).
        registry: name -> corruption; default :data:`~timm_moex.train.corruptions.CORRUPTIONS`.
        progress: A progress bar (main process).

    Returns:
        ``images``, ``seed``, ``corruptions``, ``severities``, ``clean_top1_err``, ``top1_err`` ({corruption:
        {severity as a string: error %}}), ``mean_top1_err`` ({corruption: error %}), ``mean_corruption_error``,
        ``not_available`` (benchmark corruptions that cannot be computed, with the reason) and ``note``; the
        same on every process.
    """
    registry = CORRUPTIONS if registry is None else registry
    device = accelerator.device
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    runs = [(None, 0)] + [(name, severity) for name in names for severity in severities]
    correct = torch.zeros(len(runs) + 1, dtype=torch.long, device=device)  # the last entry: the image count
    correct[-1] = len(clean.images)
    targets = torch.as_tensor(clean.targets, dtype=torch.long, device=device)
    starts = range(0, len(clean.images), batch_size)
    bar = tqdm(total=len(runs) * len(starts), desc='corruptions', dynamic_ncols=True,
               disable=not (progress and accelerator.is_main_process))
    for k, (name, severity) in enumerate(runs):
        for start in starts:
            batch = clean.images[start:start + batch_size]
            if name is not None:
                fn = registry[name]
                batch = np.stack([fn(image, severity, corruption_rng(name, severity, int(i), seed))
                                  for image, i in zip(batch, clean.index[start:start + batch_size])])
            x = clean.normalize(torch.from_numpy(batch).to(device).permute(0, 3, 1, 2))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with accelerator.autocast():
                output = net(x)
            correct[k] += (output.argmax(-1) == targets[start:start + batch_size]).sum()
            bar.update()
    bar.close()
    net.train(was_training)
    totals = accelerator.reduce(correct, 'sum').tolist()
    count = max(totals[-1], 1)
    errors = [100.0 * (1.0 - c / count) for c in totals[:-1]]
    table = {name: {} for name in names}
    for (name, severity), err in zip(runs[1:], errors[1:]):
        table[name][str(severity)] = err
    means = {name: float(np.mean(list(row.values()))) for name, row in table.items()}
    return dict(images=totals[-1], seed=seed, corruptions=list(names), severities=list(severities),
                clean_top1_err=errors[0], top1_err=table, mean_top1_err=means,
                mean_corruption_error=float(np.mean(errors[1:])) if len(errors) > 1 else None,
                not_available={n: UNAVAILABLE[n] for n in BENCHMARK if n in UNAVAILABLE}, note=NOTE)


def summary_line(results: Dict) -> str:
    """One line: the mean corruption error, the clean error, the worst corruption.

    Args:
        results: What :func:`evaluate_corruptions` returned, with at least one corruption.

    Returns:
        The line, without a newline.
    """
    worst = max(results['mean_top1_err'], key=results['mean_top1_err'].get)
    return (f"corruptions: mean top-1 error {results['mean_corruption_error']:.2f}% over "
            f"{len(results['corruptions'])} corruption(s) x severities {results['severities']} on "
            f"{results['images']} images (clean {results['clean_top1_err']:.2f}%; worst {worst} "
            f"{results['mean_top1_err'][worst]:.2f}%)")


def write_corruption_report(results: Dict, folder: Path) -> List[Path]:
    """``corruptions.csv`` (corruption, severity, top-1 error; severity 0 = clean) and, when matplotlib is
    installed, ``corruptions.png`` (errors per corruption and severity), both written atomically.

    Args:
        results: What :func:`evaluate_corruptions` returned.
        folder: An existing folder the files go to; files of these names are replaced.

    Returns:
        The files written, the CSV first.
    """
    folder = Path(folder)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator='\n')
    writer.writerow(['corruption', 'severity', 'top1_err'])
    writer.writerow(['clean', 0, f"{results['clean_top1_err']:.4f}"])
    for name, row in results['top1_err'].items():
        for severity, err in row.items():
            writer.writerow([name, severity, f'{err:.4f}'])
    atomic_write_text(folder / 'corruptions.csv', text.getvalue())
    written = [folder / 'corruptions.csv']
    if importlib.util.find_spec('matplotlib') is not None:
        atomic_write_bytes(folder / 'corruptions.png', _plot(results))
        written.append(folder / 'corruptions.png')
    return written


def _plot(results: Dict) -> bytes:
    """A PNG table of colours: rows the corruptions (and their mean), columns the severities (and the mean)."""
    from matplotlib.figure import Figure  # optional dependency: imported only to draw

    names, severities = results['corruptions'], [str(s) for s in results['severities']]
    grid = np.array([[results['top1_err'][n][s] for s in severities] + [results['mean_top1_err'][n]] for n in names])
    grid = np.vstack([grid, grid.mean(0)])
    rows, cols = names + ['mean'], severities + ['mean']
    fig = Figure(figsize=(1.2 + 0.75 * len(cols), 1.2 + 0.38 * len(rows)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap='viridis', vmin=0, vmax=100, aspect='auto')
    for (r, c), value in np.ndenumerate(grid):
        ax.text(c, r, f'{value:.1f}', ha='center', va='center', fontsize=8, color='white' if value < 60 else 'black')
    ax.set_xticks(range(len(cols)), ['severity ' + s if i == 0 else s for i, s in enumerate(cols)], fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.axhline(len(names) - 0.5, color='white', lw=2)
    ax.axvline(len(severities) - 0.5, color='white', lw=2)
    fig.colorbar(image, ax=ax, label='top-1 error (%)')
    ax.set_title(f"mean corruption error {results['mean_corruption_error']:.2f}% (clean "
                 f"{results['clean_top1_err']:.2f}%), {results['images']} images", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=120)
    return buffer.getvalue()


def corruption_robustness(cfg: TrainConfig, model: torch.nn.Module, eval_set: Dataset, accelerator,
                          out: Path) -> Optional[Dict]:
    """The corruption evaluation of a run as its configuration asks; every process calls it.

    The main process writes ``corruptions.csv`` / ``.png`` in ``out`` and prints :func:`summary_line`.

    Args:
        cfg: The run's configuration (``eval_corruptions``, its limit and severities, batch sizes).
        model: The classifier, prepared or not.
        eval_set: The evaluation set (see :func:`clean_images`).
        accelerator: The run's Accelerator.
        out: The folder of the report.

    Returns:
        :func:`evaluate_corruptions`'s results, or None when ``eval_corruptions`` names none.
    """
    names = parse_corruptions(cfg.eval_corruptions)
    if not names:
        return None
    clean = clean_images(eval_set, cfg.eval_corruptions_limit, accelerator.process_index, accelerator.num_processes)
    results = evaluate_corruptions(model, clean, names, cfg.eval_corruptions_severities, accelerator,
                                   batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                                   channels_last=cfg.channels_last, progress=cfg.progress)
    if accelerator.is_main_process:
        written = write_corruption_report(results, out)
        missing = '' if len(written) > 1 else ' (matplotlib is not installed: no corruptions.png)'
        print(f'{summary_line(results)} | {written[0]}{missing}')
    return results
