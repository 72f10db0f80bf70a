"""Where MoEx happens: a forward hook on one module's output, armed one forward at a time."""
import logging
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import convert_sync_batchnorm as _timm_convert_sync_batchnorm
from timm.models._features import FeatureGetterNet

from ..ops.moex import check_impl, exchange_parsed, parse_norm
from ..utils.checks import check_eps, check_model
from ..utils.model import unwrap_model
from .layers import hookable_model, resolve_moex_layer

__all__ = ['MoExHook', 'attach_moex', 'get_moex_hook', 'strip_moex', 'reattach_moex', 'convert_sync_batchnorm']

_HOOK_ATTR = '_moex_hook'
_LAYER_ATTR = '_moex_layer_hook'  # on the hooked module: the MoExHook that its forward hook runs
_logger = logging.getLogger(__name__)

UNARMED_WARNING_AFTER = 100
"""Training forwards of a hook never armed after which it says, once, that MoEx is off."""


class MoExHook:
    """A forward hook that exchanges moments in one module's output when armed.

    ``arm(perm)`` arms it for the next forward only: that forward consumes the permutation
    and changes the output if the module is in training mode; every later forward (an EMA
    or eval pass, say) is untouched until the next ``arm``. Usually made by :func:`attach_moex`.
    The settings are checked here, once (``norm`` is parsed and kept parsed, so it is read-only;
    ``impl`` may be changed, and is checked when it is); each forward checks only its tensors.

    Args:
        model: The model that holds the module (DDP / DataParallel wrappers are opened).
        layer: ``'stem'`` or the dotted name of the module whose output is changed (see
            :func:`resolve_moex_layer`).
        norm: Which moments are exchanged (see ``moment_exchange``).
        eps: Added to the variance inside the square root; >= 0.
        detach: Stop gradients through the donor's moments.
        channel_dim: The channel dimension of the output; None finds it from the output's rank
            and ``model.output_fmt`` (NCHW, NHWC, or tokens (B, N, C)).
        impl: The implementation of ``moment_exchange`` (``MOEX_IMPLS``).

    Attributes:
        warn_unarmed: Log once when the module has run ``UNARMED_WARNING_AFTER`` training
            forwards (eager ones) and the hook was never armed, i.e. when a training loop does
            not drive it (timm's plain task, say). Arming, or a ``MoExMixing`` that will arm
            it, turns this off.
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
        model = unwrap_model(check_model(model))
        self._norm_spec = parse_norm(norm)
        check_eps(eps)
        self.impl = impl
        self.layer = layer = resolve_moex_layer(model, layer)
        self._norm = norm
        self.eps = eps
        self.detach = detach
        self.channel_dim = channel_dim
        # a getter wrapper's output_fmt is the format it returns, not the one the model computes in
        layout_model = model.model if isinstance(model, FeatureGetterNet) else model
        self._nhwc = getattr(layout_model, 'output_fmt', 'NCHW') == 'NHWC'
        self._model = model
        self._module = model.get_submodule(layer)
        self._perm: Optional[torch.Tensor] = None
        self.warn_unarmed = True
        self._unarmed_forwards = 0
        existing = getattr(self._module, _LAYER_ATTR, None)
        if existing is not None and existing.attached:
            raise ValueError(f'module {layer!r} already has {existing}; call .remove() on it first')
        # The hook finds this object on its module (a plain function, so that TorchScript compiles it).
        setattr(self._module, _LAYER_ATTR, self)
        # The id, not a RemovableHandle, so that deep copies (EMA) remove their own hook.
        self._hook_id = self._module.register_forward_hook(_moex_forward_hook).id

    def __repr__(self) -> str:
        return (f'MoExHook(layer={self.layer!r}, norm={self.norm!r}, eps={self.eps}, '
                f'detach={self.detach}, armed={self.armed})')

    @property
    def norm(self) -> str:
        """Which moments are exchanged (see ``moment_exchange``)."""
        return self._norm

    @property
    def impl(self) -> str:
        """The implementation of ``moment_exchange`` (``MOEX_IMPLS``)."""
        return self._impl

    @impl.setter
    def impl(self, impl: str) -> None:
        self._impl = check_impl(impl)

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
        self.warn_unarmed = False

    def disarm(self) -> None:
        self._perm = None

    def remove(self) -> None:
        """Detach the hook; the model is exactly as it was before ``attach_moex``."""
        self._perm = None
        self._module._forward_hooks.pop(self._hook_id, None)
        if getattr(self._model, _HOOK_ATTR, None) is self:
            delattr(self._model, _HOOK_ATTR)
        if getattr(self._module, _LAYER_ATTR, None) is self:
            delattr(self._module, _LAYER_ATTR)

    def _forward_hook(self, module: nn.Module, args, output):
        perm = self._perm
        if perm is None:
            # Counted in eager mode only: torch.compile would guard on the count, one graph per value.
            if not torch.compiler.is_compiling() and self.warn_unarmed and module.training:
                self._unarmed_forwards += 1
                if self._unarmed_forwards >= UNARMED_WARNING_AFTER:
                    self.warn_unarmed = False
                    _logger.warning(
                        f'The MoEx hook at {self.layer!r} ran {self._unarmed_forwards} training forwards and was never '
                        'armed, so no moments were exchanged: train with timm_moex.MoExClassificationTask (timm\'s '
                        'train.py: moex-timm-train), or call hook.arm(perm) before each forward')
            return output
        self._perm = None
        if not module.training:
            return output
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f'MoEx layer {self.layer!r} returns {type(output).__name__}, not a tensor; choose another layer')
        channel_dim = self.channel_dim
        if channel_dim is None:
            channel_dim = -1 if output.dim() == 3 or (output.dim() == 4 and self._nhwc) else 1
        return exchange_parsed(output, perm, self._norm, self._norm_spec, self.eps, channel_dim, self.detach,
                               self._impl)


def _moex_forward_hook(module: nn.Module, args: Tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    """The forward hook of a :class:`MoExHook`'s module, which holds the hook object.

    ``torch.jit.script`` compiles a module's forward hooks, so this one is a plain function that
    it can compile: a scripted model (for inference and export) leaves the output as it is,
    as MoEx only acts in training, eagerly or under ``torch.compile``.
    """
    if torch.jit.is_scripting():
        return output
    return _run_moex_hook(module, args, output)


@torch.jit.unused  # TorchScript parses each function it compiles, even a branch it never takes: not this one
def _run_moex_hook(module: nn.Module, args: Tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    return getattr(module, _LAYER_ATTR)._forward_hook(module, args, output)


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
        TypeError: ``model`` is not a ``torch.nn.Module``.
        ValueError: ``model`` is compiled or already has a hook, or ``layer`` cannot be found.
    """
    model = hookable_model(model, _HOOK_ATTR, 'attach_moex', 'MoEx')
    hook = MoExHook(model, layer, norm=norm, eps=eps, detach=detach, channel_dim=channel_dim, impl=impl)
    setattr(model, _HOOK_ATTR, hook)
    return hook


def get_moex_hook(model: nn.Module) -> Optional[MoExHook]:
    """The MoEx hook attached to ``model``.

    Args:
        model: A model, also inside DDP or torch.compile wrappers.

    Returns:
        Its hook, or None when it has none.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
    """
    return getattr(unwrap_model(check_model(model)), _HOOK_ATTR, None)


def strip_moex(model: nn.Module) -> nn.Module:
    """The plain model: removes the MoEx hook (if any) in place and returns the model.

    A hooked model already scripts, traces and exports (TorchScript compiles the hook to a
    no-op, and it changes no forward that is not an armed training one); this gives the model
    with no trace of MoEx left, e.g. for a model file or a training without MoEx:
    ``torch.jit.script(timm_moex.strip_moex(timm.create_model('resnet50_moex')))``. The
    weights and ``state_dict`` are untouched, and outputs in eval mode are unchanged.

    Args:
        model: A model with or without a MoEx hook (also inside DDP or torch.compile wrappers).

    Returns:
        The plain model (the one inside DDP / DataParallel / torch.compile wrappers).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
    """
    model = unwrap_model(check_model(model))
    hook = getattr(model, _HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
    return model


def reattach_moex(model: nn.Module) -> Optional[MoExHook]:
    """Move the model's MoEx hook onto the module now at its layer, when a conversion replaced that module.

    A BatchNorm conversion (SyncBatchNorm, timm's split BN) builds new modules: a hook left on a
    replaced one would never fire. The new hook has the same settings (layer, norm, eps,
    detach, channel_dim, impl).

    Args:
        model: A model with or without a MoEx hook (also inside DDP or torch.compile wrappers).

    Returns:
        The hook on the module that runs (the same one when its module was not replaced), or
        None when the model has none.
    """
    model = unwrap_model(model)
    hook = getattr(model, _HOOK_ATTR, None)
    if hook is None or model.get_submodule(hook.layer) is hook._module:
        return hook
    settings = dict(layer=hook.layer, norm=hook.norm, eps=hook.eps, detach=hook.detach, channel_dim=hook.channel_dim,
                    impl=hook.impl)
    hook.remove()
    return attach_moex(model, **settings)


def convert_sync_batchnorm(model: nn.Module, process_group: Optional[object] = None) -> nn.Module:
    """SyncBatchNorm for every BatchNorm of ``model``, its MoEx hook kept working.

    timm's ``convert_sync_batchnorm`` (its BatchNormAct layers keep their activation), then
    :func:`reattach_moex`. Convert before ``torch.compile`` and DDP.

    Args:
        model: The plain model, with or without a MoEx hook.
        process_group: The group that synchronizes the statistics; None for the default group.

    Returns:
        The converted model, its hook (if any) on the converted module with the same settings.
    """
    model = _timm_convert_sync_batchnorm(model, process_group)
    reattach_moex(model)
    return model
