"""Losses for training on moment-exchanged features."""
from typing import Callable

import torch
import torch.nn as nn

from ..utils.checks import check_perm

__all__ = ['MoExLoss', 'interpolated_loss']

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def interpolated_loss(criterion: Criterion, output: torch.Tensor, target: torch.Tensor, perm: torch.Tensor,
                      lam: float) -> torch.Tensor:
    """``lam * criterion(output, target) + (1 - lam) * criterion(output, target[perm])``.

    The arguments are not checked here: their callers check ``lam`` where it enters
    (:class:`MoExLoss`, ``MoExMixing``'s constructor), not on every step.

    Args:
        criterion: The loss of a batch of outputs against a batch of targets.
        output: The model's outputs.
        target: Class indices (with any criterion, label smoothing included) or soft targets,
            such as ``timm.data.Mixup`` makes; soft targets are permuted row-wise.
        perm: Sample i's partner is ``perm[i]``.
        lam: Weight of each sample's own target, in [0, 1]; at 1 the criterion runs once.

    Returns:
        The interpolated loss.
    """
    if lam == 1.0:
        return criterion(output, target)
    return lam * criterion(output, target) + (1.0 - lam) * criterion(output, target[perm])


class MoExLoss(nn.Module):
    """λ-interpolated loss of a sample's own target and its moment donor's target.

    ``loss_fn(output, target, perm, lam)`` is :func:`interpolated_loss`:
    ``lam * criterion(output, target) + (1 - lam) * criterion(output, target[perm])``.
    ``target`` may be class indices (with any criterion, label smoothing included) or the soft
    targets that ``timm.data.Mixup`` makes; soft targets are permuted row-wise, so a
    CutMix + MoEx batch that shares ``perm`` gets the paper's three-term loss.

    Args:
        criterion: The loss of a batch of outputs against a batch of targets.

    Raises:
        TypeError: ``criterion`` is not callable.
    """

    def __init__(self, criterion: Criterion):
        super().__init__()
        if not callable(criterion):
            raise TypeError(f'criterion must be a callable loss(output, target), e.g. torch.nn.CrossEntropyLoss(); '
                            f'got {type(criterion).__name__} {criterion!r:.60}')
        self.criterion = criterion

    def forward(self, output: torch.Tensor, target: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
        """The interpolated loss.

        Args:
            output: The model's outputs.
            target: Class indices or soft targets.
            perm: Sample i took the moments of sample ``perm[i]``.
            lam: Weight of each sample's own target, in [0, 1].

        Returns:
            ``lam * criterion(output, target) + (1 - lam) * criterion(output, target[perm])``.

        Raises:
            TypeError: ``perm`` is not a tensor of integer indices.
            ValueError: ``lam`` is outside [0, 1], or ``perm`` is not one index per sample (an
                index out of range is refused where ``perm`` is on the CPU, see ``check_perm``).
        """
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f'lam must be in [0, 1]; got {lam}')
        check_perm(perm, output.shape[0])
        return interpolated_loss(self.criterion, output, target, perm, lam)
