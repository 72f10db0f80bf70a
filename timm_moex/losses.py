"""Losses for training on moment-exchanged features."""
from typing import Callable

import torch
import torch.nn as nn

__all__ = ['MoExLoss']


class MoExLoss(nn.Module):
    """λ-interpolated loss of a sample's own target and its moment donor's target.

    ``loss_fn(output, target, perm, lam)`` is
    ``lam * criterion(output, target) + (1 - lam) * criterion(output, target[perm])``.
    ``target`` may be class indices (with any criterion, label smoothing included) or the soft
    targets that ``timm.data.Mixup`` makes; soft targets are permuted row-wise, so a
    CutMix + MoEx batch that shares ``perm`` gets the paper's three-term loss.
    """

    def __init__(self, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.criterion = criterion

    def forward(self, output: torch.Tensor, target: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f'lam must be in [0, 1]; got {lam}')
        if lam == 1.0:
            return self.criterion(output, target)
        return lam * self.criterion(output, target) + (1.0 - lam) * self.criterion(output, target[perm])
