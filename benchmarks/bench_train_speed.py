"""Training speed of train_moex.py: images/s of whole runs, compared side by side. Asserts nothing.

Each arm is a ``train_moex.py`` run of 2 epochs on a fixed subset of CIFAR-10 (JPEG); its
images/s is the second epoch's (the first pays for start-up, cuDNN autotuning and compilation).
The two arms of a comparison alternate (A B A B ...) in this one call and the ratio of their
medians is reported.

1. loader: the worker DataLoader (PIL transforms) against the device loader, CIFAR ResNet-18;
2. MoEx overhead: MoEx at prob 1 over MoEx off, CIFAR ResNet-18 and PyramidNet-200 (a240), bf16
   (on a GPU also with ``--moex-impl torch``, the PyTorch ops instead of the fused kernels);
3. PyramidNet-200 at batch 64: train_moex.py (bf16, channels_last, device loader, optionally
   compiled) against a plain fp32 eager PyTorch loop with a torchvision DataLoader, the setup of
   the paper's own code (``--reference``, below).

    python benchmarks/bench_train_speed.py --data-dir data/cifar10            # on a GPU
    python benchmarks/bench_train_speed.py --data-dir data/cifar10 --only compile
    python benchmarks/bench_train_speed.py --data-dir data/cifar10 --cpu-sized
"""
import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'hparams' / 'cifar10_resnet18_cifar_moex.yaml'


def versions() -> str:
    import accelerate
    import timm
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or 'CPU'
    return (f'device: {device}; python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, '
            f'accelerate {accelerate.__version__}; {os.cpu_count()} CPU cores')


def train_run(args, extra: List[str]) -> Optional[float]:
    """Images/s of the second epoch of a train_moex.py run."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / 'train_moex.py'), '--config', str(CONFIG), '--dataset', 'imagefolder',
               '--data-dir', str(args.data_dir), '--img-size', '32', '--epochs', '2', '--progress', 'false',
               '--output-dir', out, '--eval-limit', '1000', '--checkpoint-keep', '1', *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(f'    failed: {" ".join(extra)}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}', flush=True)
            return None
        with open(Path(out) / 'summary.csv', newline='') as f:
            return float(list(csv.DictReader(f))[1]['train_img_per_sec'])


def reference_run(args, images: int) -> Optional[float]:
    """Images/s of the plain fp32 eager loop (run in a fresh process, like the arms)."""
    cmd = [sys.executable, __file__, '--reference', '--data-dir', str(args.data_dir), '--images', str(images),
           '--workers', str(args.workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        print(f'    reference failed\n{proc.stderr[-3000:]}', flush=True)
        return None
    return float(proc.stdout.strip().splitlines()[-1])


def compare(title: str, arms, repeats: int, log) -> None:
    """Alternate the arms ``repeats`` times; print the medians and the ratio of each later arm over the first."""
    figures = {name: [] for name, _ in arms}
    for _ in range(repeats):
        for name, fn in arms:
            start = time.perf_counter()
            value = fn()
            if value is not None:
                figures[name].append(value)
            log(f'    {name}: {"failed" if value is None else f"{value:.4g}"} img/s ({time.perf_counter() - start:.0f} s '
                'wall)')
    medians = {name: statistics.median(v) if v else float('nan') for name, v in figures.items()}
    (a, ma), *others = medians.items()
    log(f'  {title}: {a} {ma:.4g} img/s, ' + ', '.join(f'{b} {mb:.4g} img/s, {b} / {a} = {mb / ma:.3f}'
                                                         for b, mb in others) + f' (medians of {repeats})')


def reference_loop(data_dir: Path, images: int, workers: int) -> float:
    """The paper's code's setup: fp32 eager PyTorch, torchvision transforms and DataLoader, SGD."""
    import timm
    import torch
    import torch.nn.functional as F
    from torchvision import datasets, transforms

    import timm_moex  # noqa: F401  (registers pyramidnet200)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(),
                             transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
    data = datasets.ImageFolder(str(data_dir / 'train'), tf)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, num_workers=workers, pin_memory=True,
                                         drop_last=True, persistent_workers=workers > 0)
    model = timm.create_model('pyramidnet200', num_classes=10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.9, nesterov=True, weight_decay=1e-4)
    model.train()
    steps, warmup, seen, start = images // 64, 10, 0, None
    for step, (x, y) in enumerate(loader):
        if step == warmup:
            if device.type == 'cuda':
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += x.shape[0]
        if step == warmup + steps:
            break
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-dir', type=Path, default=Path(os.environ.get('TIMM_MOEX_CIFAR10_JPEG', 'data/cifar10')))
    parser.add_argument('--repeats', type=int, default=None,
                        help='runs of each arm, alternating (default: 2 on a GPU, 1 with --cpu-sized)')
    parser.add_argument('--workers', type=int, default=8, help='DataLoader workers of the worker-loader arms')
    parser.add_argument('--only', nargs='+', default=['loader', 'moex-resnet18', 'moex-pyramidnet', 'pyramidnet'],
                        choices=['loader', 'moex-resnet18', 'moex-pyramidnet', 'pyramidnet', 'compile'],
                        help="'compile': comparison 3 with PyramidNet-200 compiled (one repeat; compiling takes minutes)")
    parser.add_argument('--compile-moex', action='store_true', help='compile the model in the MoEx comparisons')
    parser.add_argument('--compile-mode', default='default', help="train_moex.py's compile_mode for every compiled "
                                                                   "arm ('reduce-overhead': CUDA graphs)")
    parser.add_argument('--cpu-sized', action='store_true', help='small subsets, fp32, one repeat')
    parser.add_argument('--log', type=Path, default=None, help='also append the lines to this file')
    parser.add_argument('--reference', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--images', type=int, default=3200, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats is not None and args.repeats < 1:
        parser.error(f'--repeats {args.repeats}: give 1 or more')
    if args.reference:
        print(reference_loop(args.data_dir, args.images, args.workers))
        return

    def log(line: str) -> None:
        print(line, flush=True)
        if args.log:
            with open(args.log, 'a') as f:
                f.write(line + '\n')

    import torch
    gpu = torch.cuda.is_available() and not args.cpu_sized
    small = ['--train-limit', '10240' if gpu else '512']
    pyr = ['--train-limit', '6400' if gpu else '128']
    precision = ['--mixed-precision', 'bf16', '--channels-last'] if gpu else ['--mixed-precision', 'no']
    compiled = ['--compile', '--compile-mode', args.compile_mode]
    if args.compile_moex:
        precision += compiled
    log(f'command: python {" ".join(sys.argv)}')
    log(versions())
    repeats = args.repeats if args.repeats is not None else (2 if gpu else 1)
    if 'loader' in args.only:
        compare('CIFAR ResNet-18, batch 128, MoEx prob 0.25: worker loader -> device loader', [
            ('workers', lambda: train_run(args, [*small, *precision, '--loader', 'workers', '--workers',
                                                 str(args.workers), '--pin-memory', str(gpu).lower()])),
            ('device', lambda: train_run(args, [*small, *precision, '--loader', 'device'])),
        ], repeats, log)
    moex_arms = {'moex-resnet18': ('CIFAR ResNet-18, batch 128', small),
                 'moex-pyramidnet': ('PyramidNet-200 a240, batch 64',
                                     [*pyr, '--model', 'pyramidnet200', '--batch-size', '64', '--lr', '0.25'])}
    for key, (name, extra) in moex_arms.items():
        if key in args.only:
            arms = [
                ('off', lambda e=extra: train_run(args, [*e, *precision, '--loader', 'device', '--moex', 'false'])),
                ('moex', lambda e=extra: train_run(args, [*e, *precision, '--loader', 'device', '--moex-prob', '1.0'])),
            ]
            if gpu and not args.compile_moex:  # the fused Triton kernels ('auto') against the PyTorch ops
                arms.append(('moex-torch-ops', lambda e=extra: train_run(
                    args, [*e, *precision, '--loader', 'device', '--moex-prob', '1.0', '--moex-impl', 'torch'])))
            setup = 'bf16 channels_last' if gpu else 'fp32'
            setup += f' compiled ({args.compile_mode})' if args.compile_moex else ''
            compare(f'{name}, {setup}, device loader: MoEx off -> MoEx prob 1',
                    arms, repeats, log)
    pyr_run = [*pyr, '--model', 'pyramidnet200', '--batch-size', '64', '--lr', '0.25', '--loader', 'device',
               *precision]
    reference = ('fp32 eager, torchvision DataLoader', lambda: reference_run(args, int(pyr[1])))
    if 'pyramidnet' in args.only:
        compare('PyramidNet-200 a240, batch 64, MoEx prob 0.25: the paper-code setup -> train_moex.py', [
            reference, ('train_moex.py bf16 channels_last device loader', lambda: train_run(args, pyr_run))],
            repeats, log)
    if 'compile' in args.only:
        compare('PyramidNet-200 a240, batch 64, MoEx prob 0.25: the paper-code setup -> train_moex.py compiled', [
            reference, ('train_moex.py bf16 channels_last device loader compile',
                        lambda: train_run(args, [*pyr_run, *compiled]))], 1, log)

if __name__ == '__main__':
    main()
