"""How much does AutoMix cost? Training-step time against Mixup, side by side. Asserts nothing.

One training step (task forward, backward, SGD step) of the same model and batch, for:

    plain         cross-entropy on the clean batch
    mixup         timm's Mixup (alpha 1) + soft-target cross-entropy
    automix       AutoMixTask: momentum-encoder features, Mix Block, the momentum encoder's
                  forward + backward on its mixed images, the model on mixed + clean images
    automix_noclean  AutoMix without the clean-image loss (clean_weight 0: a batch of B, not 2B)
    automix_moex  AutoMix with MoEx armed on every step (prob 1)

The arms alternate call by call in this one process; medians and their ratios are printed
(the AutoMix paper reports about 2x the cost of Mixup).

    python benchmarks/bench_automix.py                       # CPU: fp32, resnet18_cifar at 32 px, batch 64
    python benchmarks/bench_automix.py --device cuda         # GPU: bf16, channels_last, batch 128
"""
import argparse
import platform
import sys

import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.task import ClassificationTask

from bench_moex import interleaved
from timm_moex import AutoMix, AutoMixTask, MoExMixing, attach_moex, get_moex_hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--model', default='resnet18_cifar')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--batch-size', type=int, default=None, help='default 128 on a GPU, 64 on the CPU')
    parser.add_argument('--repeats', type=int, default=None, help='default 30 on a GPU, 8 on the CPU')
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == 'cuda'
    dtype = torch.bfloat16 if on_gpu else torch.float32
    batch_size = args.batch_size or (128 if on_gpu else 64)
    repeats = args.repeats or (30 if on_gpu else 8)

    name = torch.cuda.get_device_name(device) if on_gpu else f'{platform.processor() or platform.machine()} CPU'
    print(f'command: python {" ".join(sys.argv)}')
    print(f'device: {name}, {torch.get_num_threads()} CPU threads')
    print(f'python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}')

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10).to(device)
    attach_moex(model)
    memory_format = torch.channels_last if on_gpu else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    automix = AutoMix(model, total_steps=10 ** 6, input_size=(3, args.img_size, args.img_size))
    optimizer = torch.optim.SGD([dict(params=list(model.parameters())), *automix.param_groups()], lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, args.img_size, args.img_size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch_size,), device=device)
    mixup = Mixup(mixup_alpha=1.0, num_classes=10)
    tasks = {
        'plain': ClassificationTask(model, verbose=False, device=device),
        'mixup': ClassificationTask(model, criterion=SoftTargetCrossEntropy(), verbose=False, device=device),
        'automix': AutoMixTask(model, automix, verbose=False, device=device),
        'automix_noclean': AutoMixTask(model, automix, clean_weight=0.0, verbose=False, device=device),
        'automix_moex': AutoMixTask(model, automix, moex=MoExMixing(get_moex_hook(model), prob=1.0), verbose=False,
                                    device=device),
    }

    def step(arm):
        def run():
            input, target = mixup(x, y) if arm == 'mixup' else (x, y)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = tasks[arm](input, target)['loss']
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return run

    t = interleaved({arm: step(arm) for arm in tasks}, device, repeats)
    print(f'training step, {args.model} {args.img_size}px batch {batch_size} {str(dtype)[6:]}'
          f'{" channels_last" if on_gpu else ""}, median of {repeats}:')
    for arm, seconds in t.items():
        print(f'  {arm:<16} {seconds * 1e3:8.1f} ms   {seconds / t["mixup"]:.2f}x mixup   '
              f'{seconds / t["plain"]:.2f}x plain')


if __name__ == '__main__':
    main()
