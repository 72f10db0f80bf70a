"""Random draws that the hooks and tasks share."""
import torch

__all__ = ['coin']


def coin(prob: float) -> bool:
    """A coin toss on the CPU generator: no device sync, reproducible under ``torch.manual_seed``.

    Args:
        prob: Probability of True; at 0 and at 1 nothing is drawn.

    Returns:
        True with probability ``prob``.
    """
    return prob == 1.0 or (prob > 0.0 and torch.rand(()).item() < prob)
