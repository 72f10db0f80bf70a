"""How a training task moment-exchanges a batch: the coin, the pairing, arming the hook and the loss."""
from types import MappingProxyType
from typing import Callable, Mapping, Optional

import torch

from ..hooks.moex import MoExHook
from ..loss.moex import interpolated_loss
from ..utils.checks import check_choice, check_unit_interval
from ..utils.random import coin

__all__ = ['MoExMixing', 'MOEX_RECIPES', 'PAIRINGS', 'draw_pairing', 'check_moex_argument']

MOEX_RECIPES: Mapping[str, Mapping[str, float]] = MappingProxyType({
    'cifar': MappingProxyType(dict(prob=0.25, lam=0.5)),
    'imagenet': MappingProxyType(dict(prob=1.0, lam=0.9)),
    'imagenet_cutmix': MappingProxyType(dict(prob=0.25, lam=0.9)),
})
"""The paper's MoEx settings (Li et al., CVPR 2021, and the authors' released code), by recipe.

- 'cifar': PyramidNet-200 on CIFAR-100: a quarter of the batches, lam 0.5.
  The default of :class:`MoExMixing` and of ``moex-train`` (``TrainConfig``), whose runs are CIFAR-sized.
- 'imagenet': ResNet-50 and DenseNet-265 on ImageNet: every batch, lam 0.9. The default of
  ``moex-timm-train``, which runs timm's ImageNet training script.
- 'imagenet_cutmix': CutMix + MoEx on ImageNet: a quarter of the batches, lam 0.9.

Each entry holds MoExMixing's ``prob`` and ``lam``: ``MoExMixing(hook, **MOEX_RECIPES['imagenet'])``.
"""

PAIRINGS = ('random', 'flip')
"""Who gives sample i its moments: a random permutation, or sample B-1-i."""


def draw_pairing(pairing: str, batch_size: int, device: torch.device) -> torch.Tensor:
    """Sample i's partner, ``perm[i]``.

    Args:
        pairing: 'random' (a random permutation) or 'flip' (B-1-i, drawing nothing).
        batch_size: B.
        device: Where the permutation lives.

    Returns:
        ``perm``, an int64 tensor of shape (B,).
    """
    if pairing == 'flip':
        return torch.arange(batch_size - 1, -1, -1, device=device)
    return torch.randperm(batch_size, device=device)


class MoExMixing:
    """MoEx in a training task: when a batch is moment-exchanged, along which pairing, and its loss.

    Defaults are the paper's CIFAR recipe (``MOEX_RECIPES['cifar']``: prob 0.25, lam 0.5, random
    pairing); its ImageNet recipe is ``MoExMixing(hook, **MOEX_RECIPES['imagenet'])`` (prob 1.0,
    lam 0.9). The arguments are checked here, once; the per-batch methods trust them. Per training
    batch a task calls :meth:`draw_perm` (or :meth:`fires` when it pairs the samples itself), then
    :meth:`arm` before the forward and :meth:`loss` after it.

    Args:
        hook: The model's MoEx hook (``get_moex_hook(model)``, ``attach_moex(model)``).
        prob: Probability that a training batch is moment-exchanged (decided per batch and process).
        lam: Weight of the sample's own target; ``1 - lam`` goes to its moment donor's.
        pairing: Who gives sample i its moments: 'random' (a random permutation, the paper's
            choice) or 'flip' (sample B-1-i, the pairing of ``timm.data.Mixup``: Mixup/CutMix and
            MoEx then share one pairing, and with Mixup's soft targets the loss is exactly the
            three-term CutMix + MoEx loss of the paper's code; shuffled batches keep it random).

    Raises:
        TypeError: ``hook`` is not a ``MoExHook``.
        ValueError: ``prob`` or ``lam`` is outside [0, 1], or ``pairing`` is unknown.
    """

    def __init__(
            self,
            hook: MoExHook,
            prob: float = MOEX_RECIPES['cifar']['prob'],
            lam: float = MOEX_RECIPES['cifar']['lam'],
            pairing: str = 'random',
    ):
        prob = check_unit_interval('prob', prob)
        lam = check_unit_interval('lam', lam)
        check_choice('pairing', pairing, PAIRINGS)
        if not isinstance(hook, MoExHook):
            raise TypeError(f'hook must be a timm_moex MoExHook (see get_moex_hook); got {type(hook).__name__}')
        self.hook = hook
        hook.warn_unarmed = False  # this arms it, or leaves it unarmed on purpose (prob 0)
        self.prob = prob
        self.lam = lam
        self.pairing = pairing

    def __repr__(self) -> str:
        return f'MoExMixing({self.hook}, prob={self.prob}, lam={self.lam}, pairing={self.pairing!r})'

    def fires(self, training: bool) -> bool:
        """Whether this batch is moment-exchanged.

        Args:
            training: Whether the model is in training mode; outside it nothing is drawn.

        Returns:
            True with probability ``prob`` in training mode (a :func:`coin`), else False.
        """
        return training and coin(self.prob)

    def draw_perm(self, batch_size: int, device: torch.device, training: bool) -> Optional[torch.Tensor]:
        """The moment donors of a batch, when it is moment-exchanged.

        Args:
            batch_size: B.
            device: Where the permutation lives.
            training: Whether the model is in training mode.

        Returns:
            ``perm`` (sample i takes the moments of sample ``perm[i]``) drawn with ``pairing``
            when :meth:`fires`, else None.
        """
        if not self.fires(training):
            return None
        return draw_pairing(self.pairing, batch_size, device)

    def arm(self, perm: torch.Tensor) -> None:
        """Exchange moments along ``perm`` in the model's next forward.

        Args:
            perm: Sample i takes the moments of sample ``perm[i]``.
        """
        self.hook.arm(perm)

    def loss(self, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], output: torch.Tensor,
             target: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """The MoEx loss of a moment-exchanged batch (see ``MoExLoss``).

        Args:
            criterion: The loss of a batch of outputs against a batch of targets.
            output: The outputs of the forward that :meth:`arm` armed.
            target: Class indices or soft targets.
            perm: The permutation the hook was armed with.

        Returns:
            ``lam * criterion(output, target) + (1 - lam) * criterion(output, target[perm])``.
        """
        return interpolated_loss(criterion, output, target, perm, self.lam)



def check_moex_argument(task: str, moex: Optional[MoExMixing], pairing: str) -> Optional[MoExMixing]:
    """A mixing task's ``moex=`` argument: None (no MoEx), or a :class:`MoExMixing` along the task's pairing.

    The task draws one pairing for its own mixing and MoEx shares it.

    Args:
        task: The task's class name, for the message.
        moex: The ``moex=`` argument.
        pairing: The task's pairing; ``moex.pairing`` must be the same.

    Returns:
        ``moex``, unchanged.

    Raises:
        TypeError: ``moex`` is not a :class:`MoExMixing` or None.
        ValueError: ``moex.pairing`` is not ``pairing``.
    """
    if moex is None:
        return None
    if not isinstance(moex, MoExMixing):
        raise TypeError(f'moex must be a timm_moex MoExMixing or None; got {type(moex).__name__}')
    if moex.pairing != pairing:
        raise ValueError(f'{task} pairs the samples {pairing!r} for its mixing and MoEx alike; got '
                         f'moex=MoExMixing(..., pairing={moex.pairing!r}): make it {pairing!r}')
    return moex
