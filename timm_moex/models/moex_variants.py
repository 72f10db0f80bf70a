"""``<name>_moex``: timm models born with a MoEx hook on their stem.

``timm.create_model('resnet50_moex', pretrained=True, moex_norm='pono', moex_layer='stem')``
builds ``resnet50`` exactly as timm would (same weights, same state_dict keys) and attaches
``timm_moex.attach_moex`` before returning, so the hook exists before any ``torch.compile``.
Every ``moex_<name>`` argument (``moex_norm``, ``moex_layer``, ``moex_eps``, ``moex_detach``,
``moex_channel_dim``, ``moex_impl``) is ``attach_moex``'s ``<name>``, checked when the hook is made.
Each variant is registered with its base model's pretrained configs (same files, same hub
ids), so ``timm.list_pretrained('*_moex')`` and the tags (``resnet50_moex.a1_in1k``) work.

With ``features_only=True`` the hook sits on the same module inside timm's feature wrapper
(``FeatureListNet``, ``FeatureGetterNet``, ...), so a dense-task backbone still gets MoEx at
its stem in training. For TorchScript, FX, ONNX or ``torch.export``, ``timm_moex.strip_moex``
returns the plain model.
"""
from collections import deque
from typing import Any, Dict, Optional

import timm
import torch
import torch.nn as nn
from timm.models import register_model
from timm.models._pretrained import DefaultCfg
from timm.models._registry import get_arch_pretrained_cfgs, is_model, split_model_name_tag

from ..hooks.layers import feature_wrapper_layer, resolve_moex_layer
from ..hooks.moex import attach_moex

__all__ = ['create_model', 'register_moex_variant', 'is_moex_variant', 'MOEX_BASE_MODELS']

MOEX_BASE_MODELS = (
    # this package's CIFAR and PyramidNet models
    'pyramidnet110_a48', 'pyramidnet110_a270', 'pyramidnet164_a270', 'pyramidnet200_a240',
    'pyramidnet236_a220', 'pyramidnet272_a200', 'pyramidnet200', 'pyramidnet101_a360', 'pyramidnet200_a300',
    'resnet18_cifar', 'wide_resnet28_10_cifar',
    # timm families whose stem output is known (timm_moex.STEM_LAYERS)
    'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnext50_32x4d', 'resnext101_32x8d',
    'seresnet50', 'wide_resnet50_2', 'wide_resnet101_2',
    'densenet121', 'densenet161', 'densenet169', 'densenet201', 'densenet265',
    'convnext_tiny', 'convnext_small', 'convnext_base',
    'efficientnet_b0', 'efficientnet_b1', 'efficientnet_b2', 'efficientnet_b3', 'mobilenetv3_large_100',
    'regnety_016', 'resnetv2_50',
    'vit_tiny_patch16_224', 'vit_small_patch16_224', 'vit_base_patch16_224', 'swin_tiny_patch4_window7_224',
)

# Read by timm's register_model for the variants' pretrained configs.
default_cfgs: Dict[str, DefaultCfg] = {}

_MOEX_KWARGS = ('norm', 'layer', 'eps', 'detach', 'channel_dim', 'impl')
# create_model arguments that ask for (or configure) timm's features_only wrapper
_FEATURE_KWARGS = ('features_only', 'out_indices', 'feature_cls', 'feature_cfg')
_variant_base: Dict[str, str] = {}


def _attach(model: nn.Module, model_name: str, kwargs: Dict[str, Any], moex: Dict[str, Any]) -> None:
    """Attach the hook to ``model``, built by ``timm.create_model(model_name, **kwargs)``.

    A features_only wrapper does not keep the model's class, which finds the stem and the
    layout: those are read from the same architecture built without the wrapper on the meta
    device (no memory, no weights), then the layer is looked up under the wrapper's names.
    """
    if not kwargs.get('features_only', False):
        attach_moex(model, **moex)
        return
    plain_kwargs = {k: v for k, v in kwargs.items() if k not in _FEATURE_KWARGS + ('pretrained',)}
    with torch.device('meta'):
        plain = timm.create_model(model_name, pretrained=False, **plain_kwargs)
    moex = dict(moex)
    layer = resolve_moex_layer(plain, moex.pop('layer', 'stem'))
    if moex.get('channel_dim') is None and getattr(plain, 'output_fmt', 'NCHW') == 'NHWC':
        moex['channel_dim'] = -1  # channels last in both NHWC maps and (B, N, C) tokens
    attach_moex(model, layer=feature_wrapper_layer(model, plain, layer), **moex)


def _pop_moex_kwargs(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    moex = {}
    for key in [k for k in kwargs if k.startswith('moex_')]:
        name = key[len('moex_'):]
        if name not in _MOEX_KWARGS:
            raise TypeError(
                f'{variant}: unknown MoEx argument {key!r}; accepted: {", ".join("moex_" + k for k in _MOEX_KWARGS)}')
        moex[name] = kwargs.pop(key)
    return moex


def register_moex_variant(base: str) -> str:
    """Register ``<base>_moex`` in timm's registry, with the base model's pretrained configs.

    Args:
        base: A model name timm knows.

    Returns:
        The new name, ``<base>_moex``.

    Raises:
        ValueError: timm does not know ``base``.
    """
    if not is_model(base):
        raise ValueError(f'Cannot register a MoEx variant of {base!r}: timm does not know that model')
    variant = f'{base}_moex'
    base_cfgs = list(get_arch_pretrained_cfgs(base).values())
    tags = [cfg.tag or '' for cfg in base_cfgs]
    default_cfgs[variant] = DefaultCfg(tags=deque(tags), cfgs=dict(zip(tags, base_cfgs)))

    def create(pretrained: bool = False, **kwargs) -> nn.Module:
        moex = _pop_moex_kwargs(variant, kwargs)
        model = timm.create_model(base, pretrained=pretrained, **kwargs)
        _attach(model, base, kwargs, moex)
        return model

    create.__name__ = create.__qualname__ = variant
    create.__doc__ = f'{base} with a MoEx hook (timm_moex.attach_moex) attached at creation.'
    register_model(create)
    _variant_base[variant] = base
    return variant


def is_moex_variant(model_name: str) -> bool:
    """Whether ``model_name`` is a registered ``<base>_moex`` variant.

    Args:
        model_name: A model name; tags (``.a1_in1k``) allowed.

    Returns:
        True for a registered variant.
    """
    return split_model_name_tag(model_name)[0] in _variant_base


def create_model(model_name: str, moex: Optional[Dict[str, Any]] = None, **kwargs) -> nn.Module:
    """``timm.create_model`` for any timm model, with a MoEx hook attached.

    Args:
        model_name: Any timm model name (a ``*_moex`` variant too); tags like ``.a1_in1k`` work.
        moex: Arguments of ``timm_moex.attach_moex`` (norm, layer, eps, detach, channel_dim, impl);
            None for the defaults (PONO at the stem).
        **kwargs: Passed to ``timm.create_model``.

    Returns:
        The model, with its hook attached (see ``timm_moex.get_moex_hook``).

    Raises:
        TypeError: ``moex`` holds an unknown argument.
    """
    moex = dict(moex or {})
    unknown = sorted(set(moex) - set(_MOEX_KWARGS))
    if unknown:
        raise TypeError(f'unknown MoEx argument(s) {unknown}; accepted: {", ".join(_MOEX_KWARGS)}')
    if is_moex_variant(model_name):
        return timm.create_model(model_name, **{f'moex_{k}': v for k, v in moex.items()}, **kwargs)
    model = timm.create_model(model_name, **kwargs)
    _attach(model, model_name, kwargs, moex)
    return model


for _base in MOEX_BASE_MODELS:
    register_moex_variant(_base)
