"""Checks of the arguments that the package's layers share (constructors and forwards), each with one error message."""
import math
from typing import Any, Optional, Sequence, TypeVar

import torch
import torch.nn as nn

__all__ = [
    'check_unit_interval', 'check_beta_alpha', 'check_choice', 'check_class_indices', 'check_perm', 'check_eps',
    'check_model',
]

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


def check_perm(perm: torch.Tensor, batch_size: int, device: Optional[torch.device] = None) -> None:
    """Refuse a pairing that is not one integer index per sample.

    An index outside [-B, B) is refused where ``perm`` is on the CPU; a check of a CUDA ``perm``
    would synchronize the device every step, so it is left to the indexing there (a device-side
    assert in PyTorch's ops, a NaN sample in the Triton kernels).

    Args:
        perm: The donors, ``perm[i]`` for sample i.
        batch_size: B.
        device: The features' device: ``perm`` must be on it or on the CPU.

    Raises:
        TypeError: ``perm`` is not an int64 or int32 tensor.
        ValueError: ``perm`` does not have shape (B,), is on another device, or holds an index
            out of range.
    """
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f'perm must be a tensor of sample indices; got {type(perm).__name__}')
    if perm.dtype not in (torch.int64, torch.int32):
        raise TypeError(f'perm must hold integer indices (torch.int64 or torch.int32); got {perm.dtype}')
    if perm.shape != (batch_size,):
        raise ValueError(
            f'perm must have shape ({batch_size},), one donor index per sample of the batch; '
            f'got shape {tuple(perm.shape)}')
    if device is not None and perm.device != device and perm.device.type != 'cpu':
        where = device if device.type == 'cpu' else f'{device} or the CPU'
        raise ValueError(f'perm is on {perm.device}, the features on {device}: put perm on {where}')
    if (perm.device.type == 'cpu' and batch_size and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(perm)):
        bad = (perm < -batch_size) | (perm >= batch_size)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f'perm[{i}] = {int(perm[i])} is not a sample of the batch of {batch_size}: donor '
                             f'indices must be in 0..{batch_size - 1} (or -{batch_size}..-1, from the end)')


def check_eps(eps: float) -> float:
    """The eps added to a variance inside a square root: a finite number >= 0 (booleans refused).

    Args:
        eps: The value given.

    Returns:
        ``eps`` as a float.

    Raises:
        ValueError: ``eps`` is negative, not finite or not a number (a NaN output otherwise).
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f'eps must be a finite number >= 0 (it is added to the variance); got {eps!r}')
    return float(eps)


def check_model(model: Any) -> nn.Module:
    """A model to hook: a ``torch.nn.Module`` (wrapped or not), not its name or None.

    Args:
        model: The value given.

    Returns:
        ``model``, unchanged.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
    """
    if not isinstance(model, nn.Module):
        name = model if isinstance(model, str) and model else 'resnet50'
        raise TypeError(f'model must be a torch.nn.Module; got {type(model).__name__} {model!r:.60}: build it '
                        f'first, e.g. timm.create_model({name!r})')
    return model
