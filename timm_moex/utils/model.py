"""The plain model inside the wrappers that training puts around it (DDP, DataParallel, torch.compile)."""
import torch
import torch.nn as nn

__all__ = ['unwrap_model']


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / DataParallel / ``torch.compile`` wrappers, however nested.

    Unlike ``timm.utils.unwrap_model``, only those wrapper types are opened: a model that
    merely has a child named ``module`` is returned as it is.

    Args:
        model: A model, wrapped or not.

    Returns:
        The innermost wrapped model (``model`` itself when it is not wrapped).
    """
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model
