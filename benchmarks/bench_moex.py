"""How fast is MoEx? Prints figures, asserts nothing.

1. forward+backward time of ``moment_exchange`` (its fused Triton kernels where the device has
   them, and its PyTorch ops) against a naive PONO exchange written as separate steps (mean,
   var, subtract, divide, multiply, add), and the effective memory bandwidth, as a share of a
   device-to-device copy measured in the same run;
2. the training-step time with MoEx armed on every step over the same step without MoEx.

The arms of each comparison run interleaved in this one process, and the ratio of their
medians is reported: on a noisy machine only a side-by-side ratio means something.

    python benchmarks/bench_moex.py                      # CPU: fp32, resnet18 at 32 px, batch 64
    python benchmarks/bench_moex.py --device cuda        # GPU: bf16, adds resnet50 at 224 px, batch 128
"""
import argparse
import platform
import statistics
import sys
import time
from functools import partial
from typing import Callable, Dict, List

import timm
import torch

from timm_moex import MoExClassificationTask, MoExMixing, attach_moex, moment_exchange


def naive_moment_exchange(x: torch.Tensor, perm: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = x.float().mean(dim=1, keepdim=True)
    std = (x.float().var(dim=1, keepdim=True) + eps).sqrt()
    return ((x.float() - mean) / std * std[perm] + mean[perm]).to(x.dtype)


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def interleaved(arms: Dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int = 3
                ) -> Dict[str, float]:
    """Median seconds per call of each arm, the arms alternating call by call."""
    for fn in arms.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """Bytes per second of a large device-to-device copy: the bandwidth a streaming op can reach."""
    src = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = interleaved({'copy': lambda: dst.copy_(src)}, device, repeats)['copy']
    return 2 * src.numel() / t


def op_arms(device: torch.device) -> Dict[str, Callable]:
    """The implementations of the op to time on ``device``: the Triton kernels only where they run."""
    arms = {impl: partial(moment_exchange, impl=impl) for impl in fused_impls(device)}
    arms['torch'] = partial(moment_exchange, impl='torch')
    arms['naive'] = naive_moment_exchange
    return arms


def fused_impls(device: torch.device) -> List[str]:
    """['triton'] where moment_exchange's Triton kernels run (a CUDA device, Triton installed)."""
    if device.type != 'cuda':
        return []
    try:
        import timm_moex.ops.moex_triton  # noqa: F401
    except ImportError:
        return []
    return ['triton']


# Bytes moved per element of x, forward + backward, in units of x's size: any implementation
# reads x and writes out, then reads x and grad_out and writes grad_in (5); the Triton kernels
# read x twice forward (own and donor tile) and g and x twice backward (donor pass, input pass).
PASSES = {'minimum': 5, 'triton': 8}


def bench_op(shape, dtype: torch.dtype, device: torch.device, repeats: int, copy_bw: float,
             channels_last: bool = False) -> None:
    x = torch.randn(shape, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    perm = torch.randperm(shape[0], device=device)
    grad = torch.randn_like(x)

    def step(fn):
        def run():
            x.grad = None
            fn(x, perm).backward(grad)
        return run

    t = interleaved({name: step(fn) for name, fn in op_arms(device).items()}, device, repeats)
    size = x.numel() * x.element_size()
    print(f'  op {tuple(shape)}{" channels_last" if channels_last else ""} {str(dtype)[6:]}: '
          + ', '.join(f'{name} {sec * 1e3:.3f} ms' for name, sec in t.items()))
    for name in t:
        if name == 'naive':
            continue
        bw = PASSES['minimum'] * size / t[name]
        line = (f'    {name}: naive/{name} = {t["naive"] / t[name]:.2f}x; {bw / 1e9:.1f} GB/s = {bw / copy_bw:.0%} of copy '
                f'counting the 5 passes over x any implementation needs')
        if name in PASSES:
            moved = PASSES[name] * size / t[name]
            line += f'; {moved / 1e9:.1f} GB/s = {moved / copy_bw:.0%} of copy counting the {PASSES[name]} it makes'
        print(line)


def bench_step(model_name: str, img_size: int, batch_size: int, dtype: torch.dtype, device: torch.device,
               repeats: int, channels_last: bool) -> None:
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=100).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (batch_size,), device=device)
    hook = attach_moex(model)
    moex = MoExClassificationTask(model, MoExMixing(hook, prob=1.0, lam=0.5), verbose=False, device=device)
    arms = {'plain': ('torch', MoExClassificationTask(model, MoExMixing(hook, prob=0.0, lam=0.5), verbose=False,
                                                      device=device))}
    for impl in fused_impls(device) + ['torch']:
        arms[f'moex {impl}'] = (impl, moex)

    def step(impl, task):
        def run():
            hook.impl = impl
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = task(x, y)['loss']
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return run

    t = interleaved({name: step(*arm) for name, arm in arms.items()}, device, repeats)
    print(f'  train step {model_name} {img_size}px batch {batch_size} {str(dtype)[6:]}'
          f'{" channels_last" if channels_last else ""}: '
          + ', '.join(f'{name} {sec * 1e3:.1f} ms' for name, sec in t.items()) + '; '
          + ', '.join(f'{name}/plain = {t[name] / t["plain"]:.3f}' for name in t if name != 'plain'))


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return 'not installed'
    return triton.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--repeats', type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == 'cuda'
    dtype = torch.bfloat16 if on_gpu else torch.float32

    name = torch.cuda.get_device_name(device) if on_gpu else f'{platform.processor() or platform.machine()} CPU'
    print(f'command: python {" ".join(sys.argv)}')
    print(f'device: {name}, {torch.get_num_threads()} CPU threads')
    print(f'python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, '
          f'triton {triton_version()}')

    copy_bw = copy_bandwidth(device, args.repeats)
    print(f'device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)')
    print(f'moment_exchange (PONO), forward + backward, implementations {", ".join(op_arms(device))}:')
    shapes = [(128, 16, 32, 32), (64, 64, 56, 56)] + ([(128, 64, 32, 32), (256, 64, 112, 112)] if on_gpu else [])
    for shape in shapes:
        bench_op(shape, dtype, device, args.repeats, copy_bw)
        if on_gpu:
            bench_op(shape, dtype, device, args.repeats, copy_bw, channels_last=True)

    print('training step, MoEx armed on every step (prob 1) over no MoEx:')
    bench_step('resnet18', 32, 64, dtype, device, args.repeats, channels_last=False)
    if on_gpu:
        bench_step('resnet50', 224, 128, dtype, device, args.repeats, channels_last=True)


if __name__ == '__main__':
    main()
