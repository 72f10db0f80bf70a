"""DenseNet-265, the ImageNet DenseNet of the MoEx paper (Li et al., "On Feature Normalization
and Data Augmentation", CVPR 2021), built with timm's ``DenseNet``.

DenseNet-BC (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017) with growth
rate 32, dense blocks of (6, 12, 64, 48) layers and 64 initial features: the layout of
torchvision's ``DenseNet(growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64)``
with the same state_dict keys (``features.conv0``, ``features.denseblock1.denselayer1.norm1``,
..., ``features.norm5``, ``classifier``), so torchvision-style checkpoints load as they are.
MoEx goes after ``features.pool0`` (``timm_moex.STEM_LAYERS['DenseNet']``).
"""
from typing import Any, Dict

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.densenet import DenseNet, _filter_torchvision_pretrained

__all__ = ['DENSENET265_ARGS']

# growth_rate sets the initial features too: timm's DenseNet starts with 2 * growth_rate = 64
DENSENET265_ARGS: Dict[str, Any] = dict(growth_rate=32, block_config=(6, 12, 64, 48))


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'features.conv0', 'classifier': 'classifier',
        'paper_ids': 'arXiv:2002.11102',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'densenet265': _cfg(),
})


def _create_densenet(variant: str, pretrained: bool = False, **kwargs) -> DenseNet:
    return build_model_with_cfg(
        DenseNet,
        variant,
        pretrained,
        # the stem and blocks live in one Sequential, 'features': flatten it for features_only
        feature_cfg=dict(flatten_sequential=True),
        # older torchvision files name the layers of a dense layer 'norm.1' instead of 'norm1'
        pretrained_filter_fn=_filter_torchvision_pretrained,
        **kwargs,
    )


@register_model
def densenet265(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-265 (growth rate 32, blocks (6, 12, 64, 48), 64 initial features), ImageNet."""
    return _create_densenet('densenet265', pretrained, **dict(DENSENET265_ARGS, **kwargs))
