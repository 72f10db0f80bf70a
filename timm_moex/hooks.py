"""Where MoEx happens: a forward hook on one module's output, armed one forward at a time."""
import re
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from timm.models import FeatureDictNet, FeatureGraphNet, FeatureHookNet
from timm.models._features import FeatureGetterNet

from .moex import check_impl, moment_exchange, parse_norm
from .wrappers import unwrap_model

__all__ = [
    'MoExHook', 'attach_moex', 'get_moex_hook', 'strip_moex', 'resolve_moex_layer', 'feature_wrapper_layer',
    'STEM_LAYERS',
]

STEM_LAYERS: Dict[str, str] = {
    'ResNet': 'maxpool',  # resnet, resnext, seresnet, wide_resnet, ...
    'ConvNeXt': 'stem',
    'RegNet': 'stem',
    'ResNetV2': 'stem',
    'EfficientNet': 'bn1',
    'MobileNetV3': 'bn1',
    'DenseNet': 'features.pool0',
    'VisionTransformer': 'norm_pre',
    'SwinTransformer': 'patch_embed',
}
"""timm model class (or a base class of it) -> the module whose output is the stem's output."""

_HOOK_ATTR = '_moex_hook'


def _top_level_names(model: nn.Module) -> List[str]:
    return [name for name, _ in model.named_children()]


# timm's features_only wrappers (timm.models._features*): where each keeps the modules it wraps.
_FEATURE_WRAPPERS = (FeatureDictNet, FeatureGetterNet, FeatureGraphNet, FeatureHookNet)


def _flattened(name: str) -> str:
    """A module name after ``flatten_sequential``: the first two levels are joined by '_'."""
    parts = name.split('.')
    return '.'.join(['_'.join(parts[:2])] + parts[2:]) if len(parts) > 1 else name


def feature_wrapper_layer(wrapper: nn.Module, model: nn.Module, layer: str) -> str:
    """The name, inside a timm ``features_only`` wrapper, of the module named ``layer`` in ``model``.

    timm's wrappers rename what they keep: ``FeatureListNet`` joins the first two levels of
    sequential containers (``features.pool0`` becomes ``features_pool0``), ``FeatureGetterNet``
    keeps the model as ``model``, ``FeatureGraphNet`` as ``graph_module``, ``FeatureHookNet``
    either flattens or keeps it as ``body``.

    Args:
        wrapper: The wrapper timm built with ``features_only=True``.
        model: The same architecture without the wrapper (its weights do not matter: one built
            on the ``meta`` device will do).
        layer: A dotted module name of ``model``.

    Returns:
        The dotted name of the same module in ``wrapper``.
    """
    expected = type(model.get_submodule(layer))
    for name in (layer, _flattened(layer), f'model.{layer}', f'graph_module.{layer}', f'body.{layer}'):
        try:
            found = wrapper.get_submodule(name)
        except AttributeError:
            continue
        if type(found) is expected:
            return name
    raise ValueError(
        f'{type(wrapper).__name__} does not keep the module {layer!r} ({expected.__name__}) of '
        f'{type(model).__name__}; pass layer= one of its modules: {_top_level_names(wrapper)}')


def _stem_from_group_matcher(model: nn.Module) -> Optional[str]:
    """The last outermost module that ``group_matcher()['stem']`` names, in registration order."""
    matcher = getattr(model, 'group_matcher', None)
    if matcher is None:
        return None
    patterns = matcher().get('stem')
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    regexes = [re.compile(p if isinstance(p, str) else p[0]) for p in patterns]
    found = None
    for name, _ in model.named_modules():
        if not name or (found and name.startswith(found + '.')):
            continue  # the children of a matched stem module are inside the stem
        if any(r.match(name) for r in regexes):
            found = name
    return found


def resolve_moex_layer(model: nn.Module, layer: str = 'stem') -> str:
    """The dotted name of the module whose output MoEx changes.

    Args:
        model: The model (also inside DDP or torch.compile wrappers, or a timm
            ``features_only`` wrapper made by ``timm.create_model(..., features_only=True)``).
        layer: ``'stem'``, looked up by model class in ``STEM_LAYERS``, then through the
            model's ``group_matcher()['stem']``; any other value must name a module of the model.

    Returns:
        The dotted module name.

    Raises:
        ValueError: The stem cannot be found, or ``layer`` is not a module of the model.
    """
    model = unwrap_model(model)
    if layer == 'stem' and isinstance(model, FeatureGetterNet):
        return 'model.' + resolve_moex_layer(model.model, layer)
    if layer == 'stem' and isinstance(model, _FEATURE_WRAPPERS):
        raise ValueError(
            f"Cannot find the stem of {type(model).__name__}: timm's features_only wrapper does not keep the "
            f"model's class. Create it as timm.create_model('<name>_moex', features_only=True) or with "
            f"timm_moex.create_model, or pass layer= one of its modules: {_top_level_names(model)}")
    if layer == 'stem':
        for cls in type(model).__mro__:
            if cls.__name__ in STEM_LAYERS:
                return STEM_LAYERS[cls.__name__]
        name = _stem_from_group_matcher(model)
        if name is None:
            raise ValueError(
                f"Cannot find the stem of {type(model).__name__}: it is not in timm_moex.STEM_LAYERS and has no "
                f"group_matcher()['stem']. Pass layer= one of its modules, e.g. one of "
                f"{_top_level_names(model)}")
        return name
    try:
        model.get_submodule(layer)
    except AttributeError:
        raise ValueError(
            f"layer={layer!r} is not a module of {type(model).__name__}; use 'stem' or a dotted module name. "
            f"Its top-level modules are {_top_level_names(model)}") from None
    return layer


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
