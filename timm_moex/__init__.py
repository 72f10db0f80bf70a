"""timm-moex: Moment Exchange (MoEx) for timm models.

Importing the package registers its models (the PyramidNet family, CIFAR baselines and the
``*_moex`` variants) with timm.
"""
from .automix import AutoMix, AutoMixTask, MixBlock, mask_area_loss
from .bitempered import BiTemperedLogisticLoss, bi_tempered_logistic_loss, tempered_softmax
from .hooks import STEM_LAYERS, MoExHook, attach_moex, get_moex_hook, resolve_moex_layer, strip_moex
from .losses import MoExLoss
from .models import create_model, is_moex_variant, register_moex_variant
from .moex import MOEX_IMPLS, MOEX_NORMS, moment_exchange
from .moex_mixing import MoExMixing
from .moments import mix_moments, moment_shape, perturb_moments
from .snapmix import SnapMixTask, snapmix_boxes, snapmix_weights
from .style_hooks import (MIXSTYLE_MIXES, DSUHook, MixStyleHook, StyleHook, attach_dsu, attach_mixstyle, dsu_layers,
                          get_dsu_hook, get_mixstyle_hook, mixstyle_layers)
from .tasks import MoExClassificationTask

__version__ = '0.1.0'

__all__ = [
    'moment_exchange', 'MOEX_NORMS', 'MOEX_IMPLS',
    'mix_moments', 'perturb_moments', 'moment_shape',
    'StyleHook', 'MixStyleHook', 'DSUHook', 'attach_mixstyle', 'attach_dsu', 'get_mixstyle_hook', 'get_dsu_hook',
    'mixstyle_layers', 'dsu_layers', 'MIXSTYLE_MIXES',
    'MoExHook', 'attach_moex', 'get_moex_hook', 'strip_moex', 'resolve_moex_layer', 'STEM_LAYERS',
    'MoExLoss', 'MoExMixing', 'MoExClassificationTask',
    'create_model', 'is_moex_variant', 'register_moex_variant',
    'BiTemperedLogisticLoss', 'bi_tempered_logistic_loss', 'tempered_softmax',
    'SnapMixTask', 'snapmix_boxes', 'snapmix_weights',
    'AutoMix', 'AutoMixTask', 'MixBlock', 'mask_area_loss',
]
