"""MoEx as a timm training task."""
import logging
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn as nn
from timm.task import ClassificationTask

from ..hooks.moex import MoExHook, get_moex_hook
from .moex_mixing import PAIRINGS, MoExMixing

__all__ = ['MoExClassificationTask', 'PAIRINGS']

_logger = logging.getLogger(__name__)


class MoExClassificationTask(ClassificationTask):
    """Classification with Moment Exchange at the model's MoEx hook.

    For each training batch, with probability ``prob`` the task draws a permutation of the
    batch, arms the hook and returns the MoEx loss
    ``lam * criterion(out, target) + (1 - lam) * criterion(out, target[perm])``; otherwise the
    plain loss (:class:`~timm_moex.MoExMixing`, kept as ``self.moex``). Defaults are the
    paper's CIFAR recipe (lam 0.5, prob 0.25); its ImageNet recipe is lam 0.9, prob 1.0.

    The result dict holds 'loss', 'output', 'moex' (whether MoEx was applied) and, when
    applied, 'perm' (sample i took the moments of sample perm[i]).

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

    Raises:
        ValueError: ``prob`` or ``lam`` is outside [0, 1], ``pairing`` is unknown, or the model
            has no MoEx hook and none is given.
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
        hook = hook if hook is not None else get_moex_hook(model)
        if hook is None:
            raise ValueError(
                f'{type(model).__name__} has no MoEx hook: create a *_moex model, call timm_moex.attach_moex(model) '
                'before building the task, or pass hook=')
        moex = MoExMixing(hook, prob=prob, lam=lam, pairing=pairing)
        super().__init__(model, criterion=criterion, criterion_kwargs=criterion_kwargs,
                         device=device, dtype=dtype, verbose=verbose)
        self.moex = moex
        if self.verbose:
            _logger.info(f'{type(self).__name__}: {moex}')

    @property
    def hook(self) -> MoExHook:
        """The model's MoEx hook."""
        return self.moex.hook

    @property
    def prob(self) -> float:
        """Probability that a training batch is moment-exchanged."""
        return self.moex.prob

    @property
    def lam(self) -> float:
        """Weight of the sample's own target."""
        return self.moex.lam

    @property
    def pairing(self) -> str:
        """'random' or 'flip'."""
        return self.moex.pairing

    def draw_perm(self, batch_size: int, device: torch.device) -> Optional[torch.Tensor]:
        """The donors of the batch with probability ``prob`` (training mode only).

        Args:
            batch_size: B.
            device: Where the permutation lives.

        Returns:
            ``perm`` (sample i takes the moments of sample ``perm[i]``), or None for no MoEx.
        """
        return self.moex.draw_perm(batch_size, device, self.get_trainable_module().training)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, Any]:
        perm = self.draw_perm(input.shape[0], input.device)
        if perm is None:
            output = self.trainable_module(input)
            return {'loss': self.criterion(output, target), 'output': output, 'moex': False}
        self.moex.arm(perm)
        output = self.trainable_module(input)
        loss = self.moex.loss(self.criterion, output, target, perm)
        return {'loss': loss, 'output': output, 'moex': True, 'perm': perm}
