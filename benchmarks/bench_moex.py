"""How fast is MoEx? Prints figures, asserts nothing.

1. forward+backward time of ``moment_exchange`` against a naive PONO exchange written as
   separate steps (mean, var, subtract, divide, multiply, add), and the op's effective memory
   bandwidth (bytes read and written by forward and backward / time);
2. the training-step time with MoEx armed on every step over the same step without MoEx.

Both arms of each comparison run interleaved in this one process, and the ratio of their
medians is reported: on a noisy machine only a side-by-side ratio means something.

    python benchmarks/bench_moex.py                      # CPU: fp32, resnet18 at 32 px, batch 64
    python benchmarks/bench_moex.py --device cuda        # GPU: bf16, adds resnet50 at 224 px, batch 128
"""
import argparse
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import timm
import torch

from timm_moex import MoExClassificationTask, attach_moex, moment_exchange


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


def bench_op(shape, dtype: torch.dtype, device: torch.device, repeats: int, channels_last: bool = False) -> None:
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

    t = interleaved({'moex': step(moment_exchange), 'naive': step(naive_moment_exchange)}, device, repeats)
    # Forward reads x, writes out; backward reads x and grad_out, writes grad_in: 5 tensors of x's size
    # at the least, whatever the implementation.
    traffic = 5 * x.numel() * x.element_size()
    print(f'  op {tuple(shape)}{" channels_last" if channels_last else ""} {str(dtype)[6:]}: moment_exchange {t["moex"] * 1e3:.3f} ms, '
          f'naive {t["naive"] * 1e3:.3f} ms, naive/moment_exchange = {t["naive"] / t["moex"]:.2f}x, '
          f'moment_exchange at {traffic / t["moex"] / 1e9:.1f} GB/s (fwd+bwd, 5 passes over x)')


def bench_step(model_name: str, img_size: int, batch_size: int, dtype: torch.dtype, device: torch.device,
               repeats: int, channels_last: bool) -> None:
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=100).to(device)
    attach_moex(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (batch_size,), device=device)
    tasks = {
        'moex': MoExClassificationTask(model, prob=1.0, lam=0.5, verbose=False, device=device),
        'plain': MoExClassificationTask(model, prob=0.0, lam=0.5, verbose=False, device=device),
    }

    def step(task):
        def run():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = task(x, y)['loss']
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return run

    t = interleaved({name: step(task) for name, task in tasks.items()}, device, repeats)
    print(f'  train step {model_name} {img_size}px batch {batch_size} {str(dtype)[6:]}'
          f'{" channels_last" if channels_last else ""}: plain {t["plain"] * 1e3:.1f} ms, '
          f'MoEx {t["moex"] * 1e3:.1f} ms, MoEx/plain = {t["moex"] / t["plain"]:.3f}')


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
    print(f'python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}')

    print('moment_exchange (PONO), forward + backward:')
    shapes = [(128, 16, 32, 32), (64, 64, 56, 56)] + ([(128, 64, 32, 32), (256, 64, 112, 112)] if on_gpu else [])
    for shape in shapes:
        bench_op(shape, dtype, device, args.repeats)
        if on_gpu:
            bench_op(shape, dtype, device, args.repeats, channels_last=True)

    print('training step, MoEx armed on every step (prob 1) over no MoEx:')
    bench_step('resnet18', 32, 64, dtype, device, args.repeats, channels_last=False)
    if on_gpu:
        bench_step('resnet50', 224, 128, dtype, device, args.repeats, channels_last=True)


if __name__ == '__main__':
    main()
