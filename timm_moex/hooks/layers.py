"""Where a hook goes: the stem of a timm model, a named layer, and the same layer inside timm's feature wrappers."""
import re
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from timm.models import FeatureDictNet, FeatureGraphNet, FeatureHookNet
from timm.models._features import FeatureGetterNet

from ..utils.checks import check_model
from ..utils.model import unwrap_model

__all__ = ['STEM_LAYERS', 'resolve_moex_layer', 'feature_wrapper_layer', 'top_level_names', 'hookable_model']

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

def top_level_names(model: nn.Module) -> List[str]:
    """The names of ``model``'s direct children, for error messages that suggest a layer."""
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
        f'{type(model).__name__}; pass layer= one of its modules: {top_level_names(wrapper)}')


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


def _has_module(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is a module of ``model``: ``get_submodule('')`` is the model itself, not one of them."""
    if name == '':
        return False
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


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
        ValueError: The stem cannot be found, or ``layer`` is not a module of the model (the
            empty name, which ``get_submodule`` reads as the whole model, included).
    """
    model = unwrap_model(model)
    if layer == 'stem' and isinstance(model, FeatureGetterNet):
        return 'model.' + resolve_moex_layer(model.model, layer)
    if layer == 'stem' and isinstance(model, _FEATURE_WRAPPERS):
        raise ValueError(
            f"Cannot find the stem of {type(model).__name__}: timm's features_only wrapper does not keep the "
            f"model's class. Create it as timm.create_model('<name>_moex', features_only=True) or with "
            f"timm_moex.create_model, or pass layer= one of its modules: {top_level_names(model)}")
    if layer == 'stem':
        for cls in type(model).__mro__:
            if cls.__name__ in STEM_LAYERS:
                return STEM_LAYERS[cls.__name__]
        name = _stem_from_group_matcher(model)
        if name is None:
            raise ValueError(
                f"Cannot find the stem of {type(model).__name__}: it is not in timm_moex.STEM_LAYERS and has no "
                f"group_matcher()['stem']. Pass layer= one of its modules, e.g. one of "
                f"{top_level_names(model)}")
        return name
    if not _has_module(model, layer):
        raise ValueError(
            f"layer={layer!r} is not a module of {type(model).__name__}; use 'stem' or a dotted module name. "
            f"Its top-level modules are {top_level_names(model)}")
    return layer


def hookable_model(model: nn.Module, attr: str, caller: str, what: str) -> nn.Module:
    """The plain model that ``caller`` attaches hooks to, refusing what a hook cannot work on.

    Args:
        model: What the user passed (also inside DDP / DataParallel wrappers).
        attr: The model attribute that keeps such hooks (one set per model).
        caller: The attaching function, for the messages (``'attach_moex'``).
        what: What is attached, for the messages (``'MoEx'``).

    Returns:
        The model inside its wrappers.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        ValueError: ``model`` is compiled (a hook added after compiling is not traced), or already has such hooks.
    """
    check_model(model)
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError(
            f'{caller} got a torch.compile()d model: a hook added after compiling is not traced. '
            f'Attach {what} to the plain model first, then compile it.')
    model = unwrap_model(model)
    existing = getattr(model, attr, None)
    if existing is not None:
        raise ValueError(f'{type(model).__name__} already has {existing}; call .remove() on it first')
    return model
