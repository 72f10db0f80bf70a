"""The training step never waits for the device: every variant of ``train_moex.train_step`` runs with the model,
optimizer state, EMA and batch on the meta device, where anything that reads a value back to the host (``.item()``,
``bool(tensor)``, ``.tolist()``, data-dependent shapes) raises. On a GPU such a read stalls the launch queue once
per step, which is what bounds a small-batch step."""
import pytest
import torch
from accelerate import Accelerator
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

import train_moex
from timm_moex.train import load_config
from timm_moex.train.builders import create_automix, create_model, create_task
from timm_moex.train.checkpoint import TrainState
from timm_moex.train.data import create_mixup

NUM_CLASSES = 4

VARIANTS = {
    'plain': [],
    'moex': ['--moex', '--moex-prob', '1'],
    'moex-cutmix': ['--moex', '--moex-prob', '1', '--cutmix', '1.0'],
    'moex-mixup': ['--moex', '--moex-prob', '1', '--mixup', '0.8'],
    'moex-snapmix': ['--moex', '--moex-prob', '1', '--snapmix', '--snapmix-prob', '1'],
    'moex-automix': ['--moex', '--moex-prob', '1', '--mix', 'automix'],
    'bi-tempered': ['--moex', '--moex-prob', '1', '--loss', 'bi_tempered'],
    'ema-clip-accumulate': ['--moex', '--moex-prob', '1', '--model-ema', '--clip-grad', '1.0',
                            '--grad-accum-steps', '2'],
    'mixstyle-dsu': ['--mixstyle', '--mixstyle-p', '1', '--dsu', '--dsu-p', '1'],
}


def meta_loop(*extra):
    """A Loop as train_moex.train builds it (without prepare), its tensors moved to the meta device."""
    cfg = load_config(['--model', 'resnet10t', '--img-size', '32', '--batch-size', '8', *extra], check_paths=False)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=cfg.grad_accum_steps)
    model = create_model(cfg, num_classes=NUM_CLASSES)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=0.1, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum)
    models = (model, create_automix(cfg, model, optimizer, lr=0.1)) if cfg.mix == 'automix' else (model,)
    mixup = create_mixup(cfg, NUM_CLASSES)
    task = create_task(cfg, models, mixup, accelerator, steps_per_epoch=4)
    model_ema = ModelEmaV3(model, decay=0.9) if cfg.model_ema else None
    for module in [*models, *([model_ema.module] if model_ema is not None else [])]:
        module.to('meta')  # in place: the optimizer keeps the same parameters
        module.train()
    return train_moex.Loop(cfg, accelerator, task, models, None, optimizer, None, mixup, model_ema, TrainState(None))


@pytest.mark.parametrize('variant', VARIANTS)
def test_the_training_step_never_reads_the_device(variant, monkeypatch):
    # The Beta draw of MixStyle (a Dirichlet sample) has no meta kernel: stand in a constant of the same shape,
    # after the distribution is made (making it is what could read the device back)
    monkeypatch.setattr(torch.distributions.Beta, 'rsample', lambda self, sample_shape=(): torch.full(
        self._extended_shape(sample_shape), 0.5, device=self.concentration1.device))
    loop = meta_loop(*VARIANTS[variant])
    images = torch.randn(8, 3, 32, 32, device='meta')
    targets = torch.randint(0, NUM_CLASSES, (8,), device='meta')
    for _ in range(loop.cfg.grad_accum_steps):
        result = train_moex.train_step(loop, images, targets)
    assert result['loss'].device.type == 'meta'
    assert loop.state.num_updates == 1
    if '--moex' in VARIANTS[variant]:
        assert result['moex'] is True  # prob 1: the exchange ran inside the step
    state = loop.optimizer.state[next(loop.models[0].parameters())]
    if 'momentum_buffer' in state:
        assert state['momentum_buffer'].device.type == 'meta'


def test_a_read_back_in_the_step_is_caught():
    """The check above can fail: a step that reads the loss back raises on the meta device."""
    loop = meta_loop()
    images = torch.randn(8, 3, 32, 32, device='meta')
    targets = torch.randint(0, NUM_CLASSES, (8,), device='meta')
    task = loop.task

    def reading_task(input, target):
        result = task(input, target)
        result['loss'].item()
        return result
    loop.task = reading_task
    with pytest.raises((RuntimeError, NotImplementedError), match='meta'):
        train_moex.train_step(loop, images, targets)
