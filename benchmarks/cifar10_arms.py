"""MoEx against the baseline on CIFAR-10 (JPEG): four arms, several seeds, one table and one plot.

Every run is ``train_moex.py`` with the CIFAR-10 recipe of ``hparams/cifar10_resnet18_cifar_moex.yaml``
(SGD Nesterov, lr 0.1, batch 128, weight decay 5e-4, cosine, RandomCrop pad 4 + flip) on the
ImageFolder copy of CIFAR-10; the arms differ only in their mixing keys:

    baseline      moex false
    moex          moex true  (lam 0.5, prob 0.25: the paper's CIFAR values)
    cutmix        cutmix beta 1, prob 0.5
    cutmix_moex   both (one shared pairing, the three-term loss)

``--arm-set`` picks other sets of arms (``ARM_SETS`` below): ``moex_sweep`` (MoEx's lam, prob, layer
and norm; its CutMix + MoEx arms are compared with ``cutmix`` when both are in ``--arms``), ``automix``
(Mixup, MoEx, AutoMix, AutoMix + MoEx), ``style`` (baseline, MoEx, MixStyle, DSU, MoEx + MixStyle) and
``label_noise``.

It prints (and writes to OUT/results.md) the mean and std over seeds of the last-epoch and the
best-epoch top-1 error, and each arm's last-epoch difference from the arm it adds to (CutMix for
CutMix + MoEx, else the first arm) paired by seed; with ``-- --eval-corruptions all`` also the mean
error over the corruptions and severities and its paired difference; it plots test error against epoch
(OUT/test_error.png, if matplotlib is installed). It asserts nothing about who wins.

    # GPU (the figures of the README):
    python benchmarks/cifar10_arms.py --data-dir data/cifar10 --epochs 30 --seeds 0 1 2 --parallel 12
    # CPU-sized (minutes on 2 cores: a 1,000-image subset, 8 epochs, one seed):
    python benchmarks/cifar10_arms.py --data-dir data/cifar10 --cpu-sized
    # Cross-entropy against the bi-tempered loss under 20% / 40% symmetric label noise:
    python benchmarks/cifar10_arms.py --data-dir data/cifar10 --arm-set label_noise --cpu-sized
    # MoEx's lam / prob / layer / norm around the paper's CIFAR values:
    python benchmarks/cifar10_arms.py --data-dir data/cifar10 --arm-set moex_sweep --epochs 100 --parallel 7
    # baseline / MoEx / MixStyle / DSU / MoEx + MixStyle, clean and corruption error:
    python benchmarks/cifar10_arms.py --data-dir data/cifar10 --arm-set style --model resnet10t --epochs 10 \
        --parallel 2 -- --train-limit 5000 --eval-limit 2000 --loader device --batch-size 128 --lr 0.1 \
        --warmup-epochs 1 --eval-corruptions all --eval-corruptions-limit 1000
    # Mixup / MoEx / AutoMix / AutoMix + MoEx:
    python benchmarks/cifar10_arms.py --data-dir data/cifar10 --arm-set automix --cpu-sized

``data/cifar10`` is CIFAR-10 as JPEG files in train/<class>/ and test/<class>/ (an ImageFolder).
"""
import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from timm_moex.train import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
_CUTMIX = ['--cutmix', '1.0', '--mixup-prob', '0.5']  # the CutMix paper's CIFAR values: beta 1, prob 0.5
_BI_TEMPERED = ['--loss', 'bi_tempered', '--bitempered-t1', '0.8', '--bitempered-t2', '1.2']
# AutoMix as OpenMixup's CIFAR configs: no lam channel in the Mix Block, a constant mask-area weight
_AUTOMIX = ['--mix', 'automix', '--automix-lam-embed', 'none', '--automix-area-decay', 'false']
ARM_SETS: Dict[str, Dict[str, List[str]]] = {
    'moex': {
        'baseline': ['--moex', 'false'],
        'moex': ['--moex', 'true'],
        'cutmix': ['--moex', 'false', *_CUTMIX],
        'cutmix_moex': ['--moex', 'true', *_CUTMIX],
    },
    # a small sweep of MoEx's lam, prob, layer and norm around the paper's CIFAR values (lam 0.5, prob 0.25).
    'moex_sweep': {
        'baseline': ['--moex', 'false'],
        'moex': ['--moex', 'true'],
        'moex_prob0.5': ['--moex', 'true', '--moex-prob', '0.5'],
        'moex_prob1_lam0.9': ['--moex', 'true', '--moex-prob', '1.0', '--moex-lam', '0.9'],
        'moex_lam0.9': ['--moex', 'true', '--moex-lam', '0.9'],
        'moex_layer1': ['--moex', 'true', '--moex-layer', 'layer1'],
        'moex_norm_in': ['--moex', 'true', '--moex-norm', 'in'],
        'cutmix_moex_norm_in': ['--moex', 'true', '--moex-norm', 'in', *_CUTMIX],
        # lam 0.9: the paper's MoEx label weight when it is paired with CutMix (its ImageNet code).
        'cutmix_moex_norm_in_lam0.9': ['--moex', 'true', '--moex-norm', 'in', '--moex-lam', '0.9', *_CUTMIX],
    },
    # learned mixing (AutoMix) against Mixup and MoEx, and the two together.
    'automix': {
        'mixup': ['--moex', 'false', '--mixup', '1.0'],
        'moex': ['--moex', 'true'],
        'automix': ['--moex', 'false', *_AUTOMIX],
        'automix_moex': ['--moex', 'true', *_AUTOMIX],
    },
    # the moment-based methods that keep the label (MixStyle, DSU) beside MoEx, for clean and corruption error
    # (run with -- --eval-corruptions all).
    'style': {
        'baseline': ['--moex', 'false'],
        'moex': ['--moex', 'true'],
        'mixstyle': ['--moex', 'false', '--mixstyle', 'true'],
        'dsu': ['--moex', 'false', '--dsu', 'true'],
        'moex_mixstyle': ['--moex', 'true', '--mixstyle', 'true'],
    },
    # Cross-entropy against the bi-tempered loss under symmetric label noise (no MoEx).
    'label_noise': {
        'ce_noise20': ['--moex', 'false', '--label-noise', '0.2'],
        'bitempered_noise20': ['--moex', 'false', '--label-noise', '0.2', *_BI_TEMPERED],
        'ce_noise40': ['--moex', 'false', '--label-noise', '0.4'],
        'bitempered_noise40': ['--moex', 'false', '--label-noise', '0.4', *_BI_TEMPERED],
    },
}
ARMS = {name: extra for arms in ARM_SETS.values() for name, extra in arms.items()}
# An arm that adds a method to another is compared with that one (paired by seed), the rest with the first arm.
COUNTERPARTS = {**{arm: 'cutmix' for arm in ARMS if arm.startswith('cutmix_moex')}, 'automix_moex': 'automix',
                'bitempered_noise20': 'ce_noise20', 'bitempered_noise40': 'ce_noise40'}


def versions() -> str:
    import accelerate
    import timm
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or 'CPU'
    return (f'device: {device}; python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, '
            f'accelerate {accelerate.__version__}')


def run_one(args, arm: str, seed: int) -> Path:
    out = args.out / f'{arm}-seed{seed}'
    if (out / 'results.json').exists():
        return out  # done by an earlier call of this script
    cmd = [sys.executable, str(ROOT / 'train_moex.py'), '--config', str(args.config), '--dataset', 'imagefolder',
           '--data-dir', str(args.data_dir), '--img-size', '32', '--epochs', str(args.epochs), '--seed', str(seed),
           '--output-dir', str(out), '--progress', 'false', '--checkpoint-keep', '1', '--resume', 'auto',
           '--model', args.model, '--moex-lam', str(args.moex_lam), '--moex-prob', str(args.moex_prob),
           *ARMS[arm], *args.extra]
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    with open(out / 'log.txt', 'a') as log:
        log.write(' '.join(cmd) + '\n')
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        print(f'{arm} seed {seed}: train_moex.py failed (exit {proc.returncode}); see {out / "log.txt"}')
    return out


def curve(out: Path) -> List[float]:
    with open(out / 'summary.csv', newline='') as f:
        return [float(r['eval_top1_err']) for r in csv.DictReader(f)]


def mean_std(values: List[float], signed: bool = False) -> str:
    """'mean ± sample std' to two decimals ('n/a' for no values); ``signed`` writes the mean's sign."""
    if not values:
        return 'n/a'
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):{"+" if signed else ""}.2f} ± {std:.2f}'


def reference_arm(arm: str, arms: List[str]) -> Optional[str]:
    """The arm that ``arm`` is compared with: its counterpart without the added method when that
    ran too (CutMix for CutMix + MoEx), else the first arm; None for the first arm itself."""
    ref = COUNTERPARTS.get(arm)
    ref = ref if ref in arms else arms[0]
    return None if ref == arm else ref


def last_top1_err(result: dict) -> float:
    return result['last']['top1_err']


def mean_corruption_error(result: dict) -> float:
    """The run's top-1 error over every corruption and severity (``--eval-corruptions``); NaN without it."""
    return result['corruptions']['mean_corruption_error'] if 'corruptions' in result else math.nan


def paired_difference(runs: Dict[int, dict], results: Dict[str, Dict[int, dict]], ref: Optional[str],
                      metric: Callable[[dict], float]) -> str:
    """mean ± std over seeds of ``metric(run) - metric(the run of arm ref with the same seed)``;
    '' for the reference arm itself (``ref`` None)."""
    if ref is None:
        return ''
    differences = [metric(r) - metric(results[ref][s]) for s, r in runs.items() if s in results[ref]]
    return mean_std([d for d in differences if not math.isnan(d)], signed=True) + f' vs {ref}'


def load_results(arms: List[str], seeds: List[int], outs: Dict[Tuple[str, int], Path]) -> Dict[str, Dict[int, dict]]:
    """{arm: {seed: results.json}} of the finished runs (those with a results.json)."""
    return {arm: {s: json.loads((outs[(arm, s)] / 'results.json').read_text())
                  for s in seeds if (outs[(arm, s)] / 'results.json').exists()} for arm in arms}


def summarize(arms: List[str], results: Dict[str, Dict[int, dict]], outs: Dict[Tuple[str, int], Path]
              ) -> Tuple[List[str], Dict[str, List[List[float]]]]:
    """The results table (markdown lines) and each arm's test-error curves, over the finished runs
    (``results``: :func:`load_results`).

    Besides mean ± std over seeds, each arm but the first gets the difference of its last-epoch
    error from its ``reference_arm``'s, paired seed by seed (one seed: the same initial weights and
    data order), which separates an arm's effect from the spread between seeds. Runs evaluated on
    corruptions add two columns: the mean corruption error and its paired difference.
    """
    corrupted = any('corruptions' in r for runs in results.values() for r in runs.values())
    rows, curves = [], {}
    for arm in arms:
        runs = results[arm]
        curves[arm] = [curve(outs[(arm, s)]) for s in runs]
        ref = reference_arm(arm, arms)
        rows.append([arm, str(len(runs)),
                     mean_std([r['last']['top1_err'] for r in runs.values()]),
                     mean_std([r['best']['top1_err'] for r in runs.values()]),
                     paired_difference(runs, results, ref, last_top1_err),
                     mean_std([r['last']['top5_err'] for r in runs.values()]),
                     mean_std([r['last']['loss'] for r in runs.values() if 'loss' in r['last']]),
                     mean_std([r['last']['ece'] for r in runs.values() if 'ece' in r['last']]),
                     mean_std([r['last']['train_loss'] for r in runs.values()])])
        if corrupted:
            rows[-1] += [mean_std([mean_corruption_error(r) for r in runs.values() if 'corruptions' in r]),
                         paired_difference(runs, results, ref, mean_corruption_error)]
    table = ['| arm | runs | last-epoch top-1 err (%) | best-epoch top-1 err (%) | last-epoch difference, paired by '
             'seed | last top-5 err (%) | last test NLL | last ECE (%) | last train loss |'
             + (' mean corruption err (%) | its difference, paired by seed |' if corrupted else ''),
             '|---|---|---|---|---|---|---|---|---|' + ('---|---|' if corrupted else '')]
    table += ['| ' + ' | '.join(r) + ' |' for r in rows]
    return table, curves


def corruption_table(arms: List[str], results: Dict[str, Dict[int, dict]]) -> List[str]:
    """Markdown lines: one row per corruption (then 'clean' on the same images), one column per arm,
    each cell the mean over seeds of the run's error averaged over severities, and the gap between
    the mean corruption error and the clean error; [] when no run has a corruption evaluation."""
    found = {arm: [r['corruptions'] for r in results[arm].values() if 'corruptions' in r] for arm in arms}
    names = next((r['corruptions'] for runs in found.values() for r in runs), None)
    if names is None:
        return []

    def cell(arm: str, value: Callable[[dict], float]) -> str:
        return f'{statistics.mean(value(r) for r in found[arm]):.2f}' if found[arm] else 'n/a'

    lines = ['| corruption | ' + ' | '.join(arms) + ' |', '|---' * (len(arms) + 1) + '|']
    for name in names:
        lines.append(f'| {name} | ' + ' | '.join(cell(a, lambda r: r['mean_top1_err'][name]) for a in arms) + ' |')
    lines.append('| mean | ' + ' | '.join(cell(a, lambda r: r['mean_corruption_error']) for a in arms) + ' |')
    lines.append('| clean (same images) | ' + ' | '.join(cell(a, lambda r: r['clean_top1_err']) for a in arms) + ' |')
    lines.append('| mean - clean | ' + ' | '.join(
        cell(a, lambda r: r['mean_corruption_error'] - r['clean_top1_err']) for a in arms) + ' |')
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-dir', type=Path, default=Path(os.environ.get('TIMM_MOEX_CIFAR10_JPEG', 'data/cifar10')))
    parser.add_argument('--config', type=Path, default=ROOT / 'hparams' / 'cifar10_resnet18_cifar_moex.yaml')
    parser.add_argument('--model', default='resnet18_cifar')
    parser.add_argument('--arm-set', default='moex', choices=list(ARM_SETS),
                        help="'moex': baseline / MoEx / CutMix / CutMix + MoEx; 'label_noise': cross-entropy against "
                             'the bi-tempered loss (t1 0.8, t2 1.2) at 20%% and 40%% symmetric label noise; '
                             "'automix': Mixup (alpha 1) / MoEx / AutoMix / AutoMix + MoEx; 'style': baseline / MoEx / "
                             "MixStyle / DSU / MoEx + MixStyle; 'moex_sweep': MoEx's lam, "
                             'prob, layer and norm around the paper\'s CIFAR values')
    parser.add_argument('--arms', nargs='+', default=None, choices=list(ARMS), help='default: every arm of the set')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=None, help='default 30 (8 with --cpu-sized)')
    parser.add_argument('--moex-lam', type=float, default=0.5)
    parser.add_argument('--moex-prob', type=float, default=0.25)
    parser.add_argument('--parallel', type=int, default=1, help='runs at a time (they share the device)')
    parser.add_argument('--threads', type=int, default=1, help='OMP threads per run')
    parser.add_argument('--cpu-sized', action='store_true',
                        help='1,000 train / 1,000 test images, batch 64, lr 0.05 with 1 warm-up epoch, 8 epochs '
                             '(unless --epochs), seed 0')
    parser.add_argument('--out', type=Path, default=ROOT / 'runs' / 'cifar10_arms')
    parser.add_argument('extra', nargs=argparse.REMAINDER, help='after --: more train_moex.py arguments')
    args = parser.parse_args()
    args.extra = [a for a in args.extra if a != '--']
    args.arms = args.arms or list(ARM_SETS[args.arm_set])
    if args.cpu_sized:  # lr 0.1 without warm-up diverges in the first epoch on so few images
        args.epochs, args.seeds = args.epochs or 8, [0]
        args.extra = ['--train-limit', '1000', '--eval-limit', '1000', '--workers', '1', '--batch-size', '64',
                      '--lr', '0.05', '--warmup-epochs', '1', *args.extra]
    args.epochs = args.epochs or 30
    if not (args.data_dir / 'train').is_dir():
        sys.exit(f'{args.data_dir}/train is missing: unpack cifar10_jpeg.tar.gz there or pass --data-dir')

    header = [f'command: python {" ".join(sys.argv)}', versions(),
              f'model {args.model}, {args.epochs} epochs, seeds {args.seeds}, moex lam {args.moex_lam} prob '
              f'{args.moex_prob} (unless an arm sets its own), config {args.config.name}, extra {args.extra}',
              *(f'arm {arm}: {" ".join(ARMS[arm])}' for arm in args.arms)]
    print('\n'.join(header), flush=True)
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.parallel) as pool:
        outs = dict(zip(jobs, pool.map(lambda job: run_one(args, *job), jobs)))
    elapsed = time.perf_counter() - start

    results = load_results(args.arms, args.seeds, outs)
    table, curves = summarize(args.arms, results, outs)
    per_corruption = corruption_table(args.arms, results)
    if per_corruption:
        table += ['', 'Top-1 error (%) per corruption, the mean over severities, then over seeds:', ''] + per_corruption
    text = '\n'.join(header + [f'wall time {elapsed:.0f} s, {args.parallel} run(s) at a time', ''] + table) + '\n'
    print('\n'.join(table))
    atomic_write_text(args.out / 'results.md', text)
    atomic_write_text(args.out / 'curves.json', json.dumps(curves))
    plot(curves, args.out / 'test_error.png', f'{args.model}, CIFAR-10 (JPEG), {len(args.seeds)} seed(s)')


def plot(curves: Dict[str, List[List[float]]], path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print(f'matplotlib is not installed: no plot ({path.name}); the curves are in curves.json')
        return
    import numpy as np
    from matplotlib.ticker import ScalarFormatter
    fig, (ax_all, ax_end) = plt.subplots(1, 2, figsize=(11, 4.5))
    for arm, runs in curves.items():
        if not runs:
            continue
        n = min(len(r) for r in runs)
        values = np.array([r[:n] for r in runs])
        epochs, mean = np.arange(1, n + 1), values.mean(0)
        std = values.std(0, ddof=1) if len(runs) > 1 else None  # the table's sample std
        tail = slice(int(n * 0.6), n)  # the last 40% of the epochs, where the arms separate
        for ax, part in ((ax_all, slice(0, n)), (ax_end, tail)):
            line, = ax.plot(epochs[part], mean[part], label=f'{arm} ({len(runs)} seeds)')
            if std is not None:
                ax.fill_between(epochs[part], (mean - std)[part], (mean + std)[part], color=line.get_color(), alpha=0.2)
    ax_all.set_yscale('log')  # early epochs are far above the final errors
    ax_all.yaxis.set_major_formatter(ScalarFormatter())  # 30, 40, 60 rather than 3 x 10^1 ...
    ax_all.yaxis.set_minor_formatter(ScalarFormatter())
    ax_all.set_title(title)
    ax_end.set_title('last 40% of the epochs (linear scale)')
    for ax in (ax_all, ax_end):
        ax.set_xlabel('epoch')
        ax.set_ylabel('test top-1 error (%)')
        ax.grid(alpha=0.3)
    ax_end.legend()
    fig.tight_layout()
    tmp = path.with_name(f'.{path.name}.tmp.png')
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


if __name__ == '__main__':
    main()
