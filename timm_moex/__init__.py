"""timm-moex: Moment Exchange (MoEx) for timm models.

Importing the package registers its models (the PyramidNet family, CIFAR baselines and the
``*_moex`` variants) with timm. The library's layers, each a sub-package, bottom up: ``utils`` (shared
helpers), ``ops`` (the op and its kernels), ``hooks``, ``loss``, ``task``, ``models``; the applications
``train`` (``moex-train``, ``moex-timm-train``) and ``demo`` (``moex-demo``) sit on top and are not imported here.
"""
from .hooks import (MIXSTYLE_MIXES, STEM_LAYERS, DSUHook, MixStyleHook, MoExHook, StyleHook, attach_dsu, attach_mixstyle,
                    attach_moex, convert_sync_batchnorm, dsu_layers, get_dsu_hook, get_mixstyle_hook, get_moex_hook,
                    mixstyle_layers, reattach_moex, resolve_moex_layer, strip_moex)
from .loss import BiTemperedLogisticLoss, MoExLoss, bi_tempered_logistic_loss, tempered_softmax
from .models import create_model, is_moex_variant, register_moex_variant
from .ops import MOEX_IMPLS, MOEX_NORMS, mix_moments, moment_exchange, moment_shape, perturb_moments
from .task import MOEX_RECIPES, AutoMix, AutoMixTask, MixBlock, MoExClassificationTask, MoExMixing, SnapMixTask, \
    mask_area_loss, snapmix_boxes, snapmix_weights

__version__ = '0.1.0'

__all__ = [
    'moment_exchange', 'MOEX_NORMS', 'MOEX_IMPLS',
    'mix_moments', 'perturb_moments', 'moment_shape',
    'StyleHook', 'MixStyleHook', 'DSUHook', 'attach_mixstyle', 'attach_dsu', 'get_mixstyle_hook', 'get_dsu_hook',
    'mixstyle_layers', 'dsu_layers', 'MIXSTYLE_MIXES',
    'MoExHook', 'attach_moex', 'get_moex_hook', 'strip_moex', 'reattach_moex', 'convert_sync_batchnorm',
    'resolve_moex_layer', 'STEM_LAYERS',
    'MoExLoss', 'MoExMixing', 'MOEX_RECIPES', 'MoExClassificationTask',
    'create_model', 'is_moex_variant', 'register_moex_variant',
    'BiTemperedLogisticLoss', 'bi_tempered_logistic_loss', 'tempered_softmax',
    'SnapMixTask', 'snapmix_boxes', 'snapmix_weights',
    'AutoMix', 'AutoMixTask', 'MixBlock', 'mask_area_loss',
]
