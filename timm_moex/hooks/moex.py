"""Where MoEx happens: a forward hook on one module's output, armed one forward at a time."""
from typing import Optional

import torch
import torch.nn as nn
from timm.models._features import FeatureGetterNet

from ..ops.moex import check_impl, moment_exchange, parse_norm
from ..utils.model import unwrap_model
from .layers import resolve_moex_layer

__all__ = ['MoExHook', 'attach_moex', 'get_moex_hook', 'strip_moex']

_HOOK_ATTR = '_moex_hook'


class MoExHook:
    """A forward hook that exchanges moments in one module's output when armed.

    ``arm(perm)`` arms it for the next forward only: that forward consumes the permutation
    and changes the output if the module is in training mode; every later forward (an EMA
    or eval pass, say) is untouched until the next ``arm``. Usually made by :func:`attach_moex`.

    Args:
        model: The model that holds the module.
        layer: Dotted name of the module whose output is changed.
        norm: Which moments are exchanged (see ``moment_exchange``).
        eps: Added to the variance inside the square root; >= 0.
        detach: Stop gradients through the donor's moments.
        channel_dim: The channel dimension of the output; None finds it from the output's rank
            and ``model.output_fmt`` (NCHW, NHWC, or tokens (B, N, C)).
        impl: The implementation of ``moment_exchange`` (``MOEX_IMPLS``).
    """

    def __init__(
            self,
            model: nn.Module,
            layer: str,
            norm: str = 'pono',
            eps: float = 1e-5,
            detach: bool = False,
            channel_dim: Optional[int] = None,
            impl: str = 'auto',
    ):
        parse_norm(norm)
        if not eps >= 0:
            raise ValueError(f'eps must be >= 0; got {eps}')
        check_impl(impl)
        self.impl = impl
        self.layer = layer
        self.norm = norm
        self.eps = eps
        self.detach = detach
        self.channel_dim = channel_dim
        # a getter wrapper's output_fmt is the format it returns, not the one the model computes in
        layout_model = model.model if isinstance(model, FeatureGetterNet) else model
        self._nhwc = getattr(layout_model, 'output_fmt', 'NCHW') == 'NHWC'
        self._model = model
        self._module = model.get_submodule(layer)
        self._perm: Optional[torch.Tensor] = None
        # The id, not a RemovableHandle, so that deep copies (EMA) remove their own hook.
        self._hook_id = self._module.register_forward_hook(self._forward_hook).id

    def __repr__(self) -> str:
        return (f'MoExHook(layer={self.layer!r}, norm={self.norm!r}, eps={self.eps}, '
                f'detach={self.detach}, armed={self.armed})')

    @property
    def armed(self) -> bool:
        return self._perm is not None

    @property
    def attached(self) -> bool:
        return self._hook_id in self._module._forward_hooks

    def arm(self, perm: torch.Tensor) -> None:
        """Exchange moments along ``perm`` (sample i takes sample perm[i]'s) in the next forward."""
        if not self.attached:
            raise RuntimeError('This MoExHook was removed; attach a new one with timm_moex.attach_moex')
        if not isinstance(perm, torch.Tensor) or perm.dim() != 1:
            raise ValueError(f'perm must be a 1-D tensor of sample indices; got {perm!r:.80}')
        self._perm = perm

    def disarm(self) -> None:
        self._perm = None

    def remove(self) -> None:
        """Detach the hook; the model is exactly as it was before ``attach_moex``."""
        self._perm = None
        self._module._forward_hooks.pop(self._hook_id, None)
        if getattr(self._model, _HOOK_ATTR, None) is self:
            delattr(self._model, _HOOK_ATTR)

    def _forward_hook(self, module: nn.Module, args, output):
        perm = self._perm
        if perm is None:
            return None
        self._perm = None
        if not module.training:
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f'MoEx layer {self.layer!r} returns {type(output).__name__}, not a tensor; choose another layer')
        channel_dim = self.channel_dim
        if channel_dim is None:
            channel_dim = -1 if output.dim() == 3 or (output.dim() == 4 and self._nhwc) else 1
        return moment_exchange(output, perm, norm=self.norm, eps=self.eps, channel_dim=channel_dim, detach=self.detach,
                               impl=self.impl)


def attach_moex(
        model: nn.Module,
        layer: str = 'stem',
        norm: str = 'pono',
        eps: float = 1e-5,
        detach: bool = False,
        channel_dim: Optional[int] = None,
        impl: str = 'auto',
) -> MoExHook:
    """Attach a MoEx hook to ``model`` at ``layer``.

    Attach before ``torch.compile`` (a hook added to a compiled model is not traced) and
    before wrapping in DDP.

    Args:
        model: The model (DDP / DataParallel wrappers are opened; a compiled model is refused).
        layer: ``'stem'`` or a dotted module name (see :func:`resolve_moex_layer`).
        norm: Which moments are exchanged (see ``moment_exchange``).
        eps: Added to the variance inside the square root; >= 0.
        detach: Stop gradients through the donor's moments.
        channel_dim: Overrides the layout found from the output's rank and
            ``model.output_fmt``: NCHW, NHWC, or tokens (B, N, C).
        impl: The implementation of ``moment_exchange`` (the result is the same).

    Returns:
        The hook, also kept on the model (see :func:`get_moex_hook`).

    Raises:
        ValueError: ``model`` is compiled or already has a hook, or ``layer`` cannot be found.
    """
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError(
            'attach_moex got a torch.compile()d model: a hook added after compiling is not traced. '
            'Attach MoEx to the plain model first, then compile it.')
    model = unwrap_model(model)
    existing = getattr(model, _HOOK_ATTR, None)
    if existing is not None:
        raise ValueError(f'{type(model).__name__} already has {existing}; call .remove() on it first')
    hook = MoExHook(model, resolve_moex_layer(model, layer), norm=norm, eps=eps, detach=detach, channel_dim=channel_dim,
                    impl=impl)
    setattr(model, _HOOK_ATTR, hook)
    return hook


def get_moex_hook(model: nn.Module) -> Optional[MoExHook]:
    """The MoEx hook attached to ``model``.

    Args:
        model: A model, also inside DDP or torch.compile wrappers.

    Returns:
        Its hook, or None when it has none.
    """
    return getattr(unwrap_model(model), _HOOK_ATTR, None)


def strip_moex(model: nn.Module) -> nn.Module:
    """The plain model, for export: removes the MoEx hook (if any) in place and returns the model.

    A MoEx hook is a training-time Python forward hook; TorchScript, FX, ONNX and
    ``torch.export`` want the model without it, e.g.
    ``torch.jit.script(timm_moex.strip_moex(timm.create_model('resnet50_moex')))``. The
    weights and ``state_dict`` are untouched, and outputs in eval mode are unchanged.

    Args:
        model: A model with or without a MoEx hook (also inside DDP or torch.compile wrappers).

    Returns:
        The plain model (the one inside DDP / DataParallel / torch.compile wrappers).
    """
    model = unwrap_model(model)
    hook = getattr(model, _HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
    return model
