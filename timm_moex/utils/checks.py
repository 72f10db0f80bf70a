"""Checks of the arguments that the package's constructors share, each with one error message."""
import math
from typing import Sequence, TypeVar

import torch

__all__ = ['check_unit_interval', 'check_beta_alpha', 'check_choice', 'check_class_indices']

T = TypeVar('T')


def check_unit_interval(name: str, value: float) -> float:
    """A probability or mixing weight: a number in [0, 1] (booleans refused).

    Args:
        name: The argument's name, for the error message.
        value: The value given.

    Returns:
        ``value`` as a float.

    Raises:
        ValueError: ``value`` is not a number in [0, 1].
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f'{name} must be a number in [0, 1]; got {value!r}')
    return float(value)


def check_beta_alpha(alpha: float, paper_value: float) -> float:
    """The parameter of a symmetric Beta(alpha, alpha): a finite number > 0 (booleans refused).

    Args:
        alpha: The value given.
        paper_value: The paper's value, quoted in the error message.

    Returns:
        ``alpha`` as a float.

    Raises:
        ValueError: ``alpha`` is not a finite number > 0.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ValueError(f'alpha must be a finite number > 0 (Beta(alpha, alpha); the paper uses {paper_value:g}); '
                         f'got {alpha!r}')
    return float(alpha)


def check_choice(name: str, value: T, choices: Sequence[T]) -> T:
    """One of a fixed set of options.

    Args:
        name: The argument's name, for the error message.
        value: The value given.
        choices: The accepted values.

    Returns:
        ``value``, unchanged.

    Raises:
        ValueError: ``value`` is not one of ``choices``.
    """
    if value not in choices:
        raise ValueError(f'{name} must be one of {choices}; got {value!r}')
    return value


def check_class_indices(target: torch.Tensor, num_classes: int, source: str) -> None:
    """Refuse a class index outside [0, num_classes), where that costs no device synchronization.

    The check runs on CPU tensors in eager mode only: on CUDA, under vmap and inside
    ``torch.compile`` reading a value back to the host would stall every step, so there the
    caller's own handling stands (a NaN row, or the indexing's device-side assert).

    Args:
        target: Integer class indices.
        num_classes: K.
        source: What has the K classes, for the error message ('the logits', say).

    Raises:
        ValueError: A class index is negative or >= K.
    """
    if (target.device.type != 'cpu' or target.numel() == 0 or torch.compiler.is_compiling()
            or torch._C._functorch.is_functorch_wrapped_tensor(target)):
        return
    bad = (target < 0) | (target >= num_classes)
    if bad.any():
        raise ValueError(f'target holds class index {target[bad][0].item()}, outside the {num_classes} classes of '
                         f'{source}: class indices must be in 0..{num_classes - 1}')
