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

    For each training batch, with probability ``moex.prob`` the task draws a permutation of the
    batch, arms the hook and returns the MoEx loss
    ``lam * criterion(out, target) + (1 - lam) * criterion(out, target[perm])``; otherwise the
    plain loss. ``moex`` (a :class:`~timm_moex.MoExMixing`, kept as ``self.moex``) holds the
    settings, as for ``SnapMixTask`` and ``AutoMixTask``; by default the paper's CIFAR recipe
    (prob 0.25, lam 0.5) at the model's hook. Its ImageNet recipe:
    ``MoExClassificationTask(model, moex=MoExMixing(get_moex_hook(model), **MOEX_RECIPES['imagenet']))``.
    With ``timm.data.Mixup`` / CutMix in front, give the mixing ``pairing='flip'``: Mixup/CutMix
    and MoEx then share one pairing, and with Mixup's soft targets the loss is exactly the
    three-term CutMix + MoEx loss of the paper's code.

    The result dict holds 'loss', 'output', 'moex' (whether MoEx was applied) and, when
    applied, 'perm' (sample i took the moments of sample perm[i]).

    Args:
        model: The model; it must carry a MoEx hook (a ``*_moex`` model, or
            ``timm_moex.attach_moex(model)``) unless ``moex`` is given.
        moex: When, along which pairing and with which lam a batch is moment-exchanged; default
            ``MoExMixing(get_moex_hook(model))``.
        criterion, criterion_kwargs, device, dtype, verbose: as ``timm.task.ClassificationTask``.

    Raises:
        TypeError: ``moex`` is not a ``MoExMixing``.
        ValueError: ``moex`` is None and the model has no MoEx hook.
    """

    def __init__(
            self,
            model: nn.Module,
            moex: Optional[MoExMixing] = None,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        if moex is None:
            hook = get_moex_hook(model)
            if hook is None:
                raise ValueError(
                    f'{type(model).__name__} has no MoEx hook: create a *_moex model, call '
                    'timm_moex.attach_moex(model) before building the task, or pass moex=MoExMixing(hook)')
            moex = MoExMixing(hook)
        elif not isinstance(moex, MoExMixing):
            raise TypeError(f'moex must be a timm_moex MoExMixing; got {type(moex).__name__}')
        super().__init__(model, criterion=criterion, criterion_kwargs=criterion_kwargs,
                         device=device, dtype=dtype, verbose=verbose)
        self.moex = moex
        if self.verbose:
            _logger.info(f'{type(self).__name__}: {moex}')

    @property
    def hook(self) -> MoExHook:
        """The model's MoEx hook."""
        return self.moex.hook

    def draw_perm(self, batch_size: int, device: torch.device) -> Optional[torch.Tensor]:
        """The donors of the batch with probability ``moex.prob`` (training mode only).

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
