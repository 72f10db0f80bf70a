"""PyramidNet-200 at the paper's CIFAR recipe: images/s of one training step, side by side. Asserts nothing.

Every arm trains the same network from the same weights on one synthetic CIFAR-100 batch already
on the device, with the recipe of the MoEx authors' CIFAR code: batch 64, SGD lr 0.25, Nesterov
momentum 0.9, weight decay 1e-4 on every parameter, MoEx (PONO after conv1 + bn1) on a quarter
of the batches with lam 0.5. The arms:

1. ``authors``: a rewrite of the training step of the authors' ``train_moex.py`` with their
   ``pyramidnet_moex.PyramidNet`` (Li et al., CVPR 2021, github.com/Boyiliee/MoEx, CIFAR/): fp32,
   eager, the model in ``nn.DataParallel``; per step the coin ``np.random.rand(1) < prob``, a CPU
   ``randperm`` moved to the device, inputs that require grad, the stem run a second time on the
   shuffled batch and its PONO moments given to the batch, the interpolated loss
   ``lam * CE(out, y) + (1 - lam) * CE(out, y[perm])``, ``loss.item()`` and the top-1 / top-5
   errors read on the host every step (their per-step print of those is left out). Their network
   is this package's ``pyramidnet200``, given the same weights;
2. ``fp32``: ``timm.create_model('pyramidnet200_moex')`` + ``MoExClassificationTask``, fp32, eager;
3. ``bf16``: the same under bf16 autocast, model and batch channels_last;
4. ``compile-BACKEND`` (``--compile-backend``): arm 3 with ``torch.compile(model, backend=BACKEND)``.

The arms alternate (1 2 3 4 1 2 3 4 ...) ``--repeats`` times, ``--steps`` steps each; the table
gives each arm's median images/s and its ratio to the first arm. "first steps" is the time from
building the arm (model, weights, optimizer, compilation) to the end of its first two steps, one
with MoEx and one without (a compiled arm compiles a graph for each): the launch-to-first-step
cost, kept out of the images/s.

    python benchmarks/bench_pyramidnet_step.py                                   # on a GPU
    python benchmarks/bench_pyramidnet_step.py --compile-backend cudagraphs inductor
    python benchmarks/bench_pyramidnet_step.py --model pyramidnet110_a48 --batch-size 8 --steps 2   # CPU-sized
"""
import argparse
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn

from timm_moex import MoExClassificationTask

NUM_CLASSES = 100
LR, MOMENTUM, WEIGHT_DECAY = 0.25, 0.9, 1e-4
MOEX_PROB, MOEX_LAM, PONO_EPS = 0.25, 0.5, 1e-5
EAGER_ARMS = ('authors', 'fp32', 'bf16')
COMPILE_BACKENDS = ('cudagraphs', 'inductor', 'aot_eager', 'eager')

Step = Callable[[Optional[bool]], None]
"""One training step; its argument forces MoEx on (True) or off (False) instead of the coin (None)."""


def pono_normalize(h: torch.Tensor, eps: float = PONO_EPS) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PONO as the authors' model computes it: (h - mean) / std over channels, with mean and std."""
    mean = h.mean(dim=1, keepdim=True)
    std = (h.var(dim=1, keepdim=True) + eps).sqrt()
    return (h - mean) / std, mean, std


class AuthorsPyramidNet(nn.Module):
    """The forward of the authors' CIFAR PyramidNet with MoEx, around this package's PyramidNet.

    With a second input, the stem (conv1, bn1) also runs on it, both stem outputs are
    PONO-normalized and the first is given the second's moments in place; then the stages,
    the final BN-ReLU, the pooling and the classifier.

    Args:
        net: A CIFAR ``PyramidNet`` (``timm.create_model('pyramidnet200')``).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, donors: Optional[torch.Tensor] = None) -> torch.Tensor:
        net = self.net
        h = net.bn1(net.conv1(x))
        if donors is not None:
            h_donor = net.bn1(net.conv1(donors))
            h, _, _ = pono_normalize(h)
            _, mean, std = pono_normalize(h_donor)
            h = h.mul_(std).add_(mean)
        for i in range(net.num_stages):
            h = getattr(net, f'layer{i + 1}')(h)
        return net.forward_head(net.final_norm(h))


def top_errors(output: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> List[torch.Tensor]:
    """Top-k error in percent for each k, as (1,)-shaped tensors (the authors' ``accuracy``)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    batch = target.shape[0]
    return [(batch - correct[:k].reshape(-1).float().sum(0, keepdim=True)).mul_(100.0 / batch) for k in topk]


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=True)


def authors_arm(args, weights: dict, device: torch.device, x: torch.Tensor, y: torch.Tensor) -> Step:
    net = timm.create_model(args.model, num_classes=NUM_CLASSES)
    net.load_state_dict(weights)
    model = AuthorsPyramidNet(net).to(device)
    if device.type == 'cuda':  # on the CPU DataParallel only calls the module
        model = nn.DataParallel(model, device_ids=[device.index if device.index is not None else 0])
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = sgd(model)
    model.train()
    meters = {'loss': [], 'top1': [], 'top5': []}  # the authors' AverageMeters, fed from the host

    def step(force: Optional[bool]) -> None:
        input, target = x.to(device), y.to(device)
        r = np.random.rand(1)
        if (r < MOEX_PROB) if force is None else force:
            rand_index = torch.randperm(input.size()[0]).to(device)
            target_a, target_b = target, target[rand_index]
            output = model(input.detach().requires_grad_(), input[rand_index].detach().requires_grad_())
            loss = criterion(output, target_a) * MOEX_LAM + criterion(output, target_b) * (1. - MOEX_LAM)
        else:
            output = model(input.detach().requires_grad_())
            loss = criterion(output, target)
        err1, err5 = top_errors(output.data, target)
        meters['loss'].append(loss.item())
        meters['top1'].append(err1.item())
        meters['top5'].append(err5.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def task_arm(args, weights: dict, device: torch.device, x: torch.Tensor, y: torch.Tensor, bf16: bool,
             backend: Optional[str] = None) -> Step:
    model = timm.create_model(f'{args.model}_moex', num_classes=NUM_CLASSES)
    model.load_state_dict(weights)
    model.to(device)
    if bf16:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    task = MoExClassificationTask(model, verbose=False)
    task.moex.prob, task.moex.lam = MOEX_PROB, MOEX_LAM
    optimizer = sgd(model)
    if backend is not None:
        task.compile(backend=backend, dynamic=False)
    task.train()
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    def step(force: Optional[bool]) -> None:
        if force is not None:
            task.moex.prob = float(force)
        with autocast():
            loss = task(x, y)['loss']
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        task.moex.prob = MOEX_PROB
    return step


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def versions(device: torch.device) -> str:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = 'not installed'
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'CPU'
    return (f'device: {device} ({name}); python {platform.python_version()}, torch {torch.__version__}, '
            f'timm {timm.__version__}, triton {triton_version}')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='pyramidnet200', help='a CIFAR PyramidNet with a *_moex variant')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--steps', type=int, default=20, help='training steps per arm and repeat')
    parser.add_argument('--repeats', type=int, default=3, help='rounds of the arms; the table gives medians')
    parser.add_argument('--warmup', type=int, default=3, help='coin-tossed steps per arm before timing')
    parser.add_argument('--device', default='auto', help="'auto' (CUDA where there is one), 'cuda', 'cuda:1', 'cpu'")
    parser.add_argument('--arms', default=','.join(EAGER_ARMS),
                        help=f'comma-separated eager arms among {",".join(EAGER_ARMS)}; the first is the baseline')
    parser.add_argument('--compile-backend', nargs='*', default=[], choices=COMPILE_BACKENDS,
                        help='add the bf16 arm compiled with each of these torch.compile backends')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(',') if a]
    unknown = [a for a in arms if a not in EAGER_ARMS]
    if unknown or not arms and not args.compile_backend:
        parser.error(f'--arms {args.arms!r}: give one or more of {",".join(EAGER_ARMS)}')
    args.arm_names = arms + [f'compile-{b}' for b in args.compile_backend]
    for name, value in (('--batch-size', args.batch_size), ('--steps', args.steps), ('--repeats', args.repeats)):
        if value < 1:
            parser.error(f'{name} {value}: must be at least 1')
    if args.warmup < 0:
        parser.error(f'--warmup {args.warmup}: must be 0 or more')
    if not timm.is_model(f'{args.model}_moex'):
        parser.error(f'--model {args.model}: no {args.model}_moex in timm\'s registry; use a CIFAR PyramidNet, '
                     'e.g. pyramidnet200 or pyramidnet110_a48')
    if args.device == 'auto':
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f'--device {args.device}: not a device; use auto, cpu, cuda or cuda:N')
    if args.device.type == 'cuda' and not torch.cuda.is_available():
        parser.error(f'--device {args.device}: this torch sees no CUDA device; use --device cpu')
    return args


def build(args, name: str, weights: dict, x: torch.Tensor, y: torch.Tensor) -> Step:
    if name == 'authors':
        return authors_arm(args, weights, args.device, x, y)
    backend = name[len('compile-'):] if name.startswith('compile-') else None
    return task_arm(args, weights, args.device, x, y, bf16=name != 'fp32', backend=backend)


def main(argv=None) -> Dict[str, float]:
    """Run the arms; print and return each arm's median images/s."""
    args = parse_args(argv)
    device = args.device
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.backends.cudnn.benchmark = True  # as the authors' script sets it
    print(versions(device))
    print('command: python ' + ' '.join(sys.argv if argv is None else ['benchmarks/bench_pyramidnet_step.py', *argv]))
    print(f'{args.model}, CIFAR-100 shapes, batch {args.batch_size}, SGD lr {LR} Nesterov {MOMENTUM} '
          f'wd {WEIGHT_DECAY}, MoEx pono prob {MOEX_PROB} lam {MOEX_LAM}; {args.steps} steps x {args.repeats} '
          'repeats per arm', flush=True)

    weights = timm.create_model(args.model, num_classes=NUM_CLASSES).state_dict()
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    steps: Dict[str, Step] = {}
    first: Dict[str, float] = {}
    for name in args.arm_names:
        sync(device)
        start = time.perf_counter()
        steps[name] = build(args, name, weights, x, y)
        steps[name](True)
        steps[name](False)
        sync(device)
        first[name] = time.perf_counter() - start
        print(f'  {name}: built, first MoEx and plain steps in {first[name]:.1f} s', flush=True)
        for _ in range(args.warmup):
            steps[name](None)

    rates: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(None)
            sync(device)
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - start))

    medians = {name: statistics.median(r) for name, r in rates.items()}
    base = args.arm_names[0]
    rows = [('arm', 'img/s (median)', 'min..max', f'vs {base}', 'first steps (s)')]
    for name in args.arm_names:
        r = rates[name]
        rows.append((name, f'{medians[name]:.1f}', f'{min(r):.1f}..{max(r):.1f}',
                     f'{medians[name] / medians[base]:.2f}', f'{first[name]:.1f}'))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print('| ' + ' | '.join(cell.ljust(w) for cell, w in zip(row, widths)) + ' |')
        if i == 0:
            print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    return medians


if __name__ == '__main__':
    main()
