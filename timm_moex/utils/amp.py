"""Autocast switched off around float32 arithmetic, on any device, the meta device included."""
import contextlib
from typing import ContextManager

import torch
from torch.amp.autocast_mode import is_autocast_available

__all__ = ['autocast_off']


def autocast_off(device_type: str) -> ContextManager:
    """A context in which autocast is off for ``device_type``.

    ``torch.autocast`` refuses a device type that has no autocast (the meta device, on which timm builds models
    and shape checks run); there is nothing to switch off then.

    Args:
        device_type: The tensors' device type (``x.device.type``).

    Returns:
        ``torch.autocast(device_type, enabled=False)``, or a context that does nothing.
    """
    if is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
