"""MoEx as a timm training task."""
import logging
import math
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn as nn
from timm.task import ClassificationTask

from .hooks import MoExHook, get_moex_hook
from .losses import MoExLoss

__all__ = ['MoExClassificationTask', 'PAIRINGS']

PAIRINGS = ('random', 'flip')

_logger = logging.getLogger(__name__)


def coin(prob: float) -> bool:
    """True with probability ``prob``, tossed on the CPU generator: no device sync, reproducible under set_seed."""
    return prob == 1.0 or (prob > 0.0 and torch.rand(()).item() < prob)


def draw_pairing(pairing: str, batch_size: int, device: torch.device) -> torch.Tensor:
    """Sample i's partner: ``perm[i]``, a random permutation ('random') or B-1-i ('flip')."""
    if pairing == 'flip':
        return torch.arange(batch_size - 1, -1, -1, device=device)
    return torch.randperm(batch_size, device=device)


def _check_unit_interval(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f'{name} must be a number in [0, 1]; got {value!r}')
    return float(value)


def _check_beta_alpha(alpha: float, paper_value: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ValueError(f'alpha must be a finite number > 0 (Beta(alpha, alpha); the paper uses {paper_value:g}); '
                         f'got {alpha!r}')
    return float(alpha)


class MoExClassificationTask(ClassificationTask):
    """Classification with Moment Exchange at the model's MoEx hook.

    For each training batch, with probability ``prob`` the task draws a permutation of the
    batch, arms the hook and returns the MoEx loss
    ``lam * criterion(out, target) + (1 - lam) * criterion(out, target[perm])``; otherwise the
    plain loss. Defaults are the paper's CIFAR recipe (lam 0.5, prob 0.25); its ImageNet
    recipe is lam 0.9, prob 1.0.

    Args:
        model: The model; it must carry a MoEx hook unless ``hook`` is given.
        hook: The model's hook; default ``get_moex_hook(model)``.
        prob: Probability that a batch is moment-exchanged (decided per batch and process).
        lam: Weight of the sample's own target.
        pairing: Who gives sample i its moments: 'random' (a random permutation, the paper's
            choice) or 'flip' (sample B-1-i, the pairing of ``timm.data.Mixup``: Mixup/CutMix and
            MoEx then share one pairing, and with Mixup's soft targets the loss is exactly the
            three-term CutMix + MoEx loss of the paper's code; shuffled batches keep it random).
        criterion, criterion_kwargs, device, dtype, verbose: as ``timm.task.ClassificationTask``.

    The result dict holds 'loss', 'output', 'moex' (whether MoEx was applied) and, when
    applied, 'perm' (sample i took the moments of sample perm[i]).
    """

    def __init__(
            self,
            model: nn.Module,
            hook: Optional[MoExHook] = None,
            prob: float = 0.25,
            lam: float = 0.5,
            pairing: str = 'random',
            criterion: Optional[Union[nn.Module, Callable]] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        prob = _check_unit_interval('prob', prob)
        lam = _check_unit_interval('lam', lam)
        if pairing not in PAIRINGS:
            raise ValueError(f'pairing must be one of {PAIRINGS}; got {pairing!r}')
        hook = hook if hook is not None else get_moex_hook(model)
        if hook is None:
            raise ValueError(
                f'{type(model).__name__} has no MoEx hook: create a *_moex model, call timm_moex.attach_moex(model) '
                'before building the task, or pass hook=')
        super().__init__(model, criterion=criterion, criterion_kwargs=criterion_kwargs,
                         device=device, dtype=dtype, verbose=verbose)
        self.hook = hook
        self.prob = prob
        self.lam = lam
        self.pairing = pairing
        self.moex_loss = MoExLoss(self.criterion)
        if self.verbose:
            _logger.info(f'{type(self).__name__}: {hook}, prob={self.prob}, lam={self.lam}, pairing={pairing}')

    def draw_perm(self, batch_size: int, device: torch.device) -> Optional[torch.Tensor]:
        """The donors of the batch with probability ``prob`` (training mode only), else None."""
        if not self.get_trainable_module().training or not coin(self.prob):
            return None
        return draw_pairing(self.pairing, batch_size, device)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, Any]:
        perm = self.draw_perm(input.shape[0], input.device)
        if perm is None:
            output = self.trainable_module(input)
            return {'loss': self.criterion(output, target), 'output': output, 'moex': False}
        self.hook.arm(perm)
        output = self.trainable_module(input)
        loss = self.moex_loss(output, target, perm, self.lam)
        return {'loss': loss, 'output': output, 'moex': True, 'perm': perm}
