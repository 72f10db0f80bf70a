"""CIFAR baselines of the augmentation literature, as timm models.

* ``resnet18_cifar``: ResNet-18 (He et al., 2016) adapted to 32x32 inputs: 3x3 stride-1 stem
  without max-pool, four stages of timm's ``BasicBlock`` (post-activation), 1x1-conv + BN
  projection shortcuts.
* ``wide_resnet28_10_cifar``: WRN-28-10 (Zagoruyko & Komodakis, "Wide Residual Networks",
  BMVC 2016): pre-activation basic blocks with optional dropout between the convolutions.
"""
from typing import Any, Dict, Tuple, Type

import torch
import torch.nn as nn
from timm.layers import LayerType, get_act_layer, get_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock

from .stage_net import StageNet

__all__ = ['CifarResNet', 'WideResNetCifar', 'WideBasicBlock', 'CIFAR10_MEAN', 'CIFAR10_STD']

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class CifarResNet(StageNet):
    """ResNet for 32x32 inputs: conv3x3 + BN + ReLU stem (``conv1``, ``bn1``, ``act1``), no max-pool."""

    def __init__(
            self,
            layers: Tuple[int, ...] = (2, 2, 2, 2),
            channels: Tuple[int, ...] = (64, 128, 256, 512),
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            zero_init_last: bool = False,
            act_layer: LayerType = nn.ReLU,
            norm_layer: LayerType = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        """
        Args:
            layers: Number of ``BasicBlock`` in each stage (the first stage has stride 1, the others 2).
            channels: Width of each stage; the stem has the width of the first stage.
            num_classes: Number of classifier outputs (0 for no classifier).
            in_chans: Number of input channels.
            global_pool: Global pooling type.
            drop_rate: Dropout before the classifier.
            zero_init_last: Zero-init the last BN of each block (off in the reference CIFAR recipe).
            act_layer: Activation layer.
            norm_layer: Normalization layer.
        """
        if len(layers) != len(channels):
            raise ValueError(f'layers {layers} and channels {channels} must have the same length')
        super().__init__(layers, num_classes, in_chans, drop_rate)
        dd = {'device': device, 'dtype': dtype}
        act_layer = get_act_layer(act_layer)
        norm_layer = get_norm_layer(norm_layer)

        in_chs = channels[0]
        self.conv1 = nn.Conv2d(in_chans, in_chs, 3, padding=1, bias=False, **dd)
        self.bn1 = norm_layer(in_chs, **dd)
        self.act1 = act_layer(inplace=True)
        self.feature_info = [dict(num_chs=in_chs, reduction=1, module='act1')]

        reduction = 1
        for stage_idx, (depth, out_chs) in enumerate(zip(layers, channels)):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for i in range(depth):
                block_stride = stride if i == 0 else 1
                downsample = None
                if block_stride != 1 or in_chs != out_chs:
                    downsample = nn.Sequential(
                        nn.Conv2d(in_chs, out_chs, 1, stride=block_stride, bias=False, **dd),
                        norm_layer(out_chs, **dd),
                    )
                blocks.append(BasicBlock(
                    in_chs,
                    out_chs,
                    stride=block_stride,
                    downsample=downsample,
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                    **dd,
                ))
                in_chs = out_chs
            self.add_stage(blocks, in_chs, reduction)

        self.create_head(in_chs, num_classes, global_pool, dd)

        self.init_weights()
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Regexes grouping parameters (and top-level modules) into stem and blocks."""
        return dict(
            stem=r'^(?:conv1|bn1|act1)(?:\.|$)',
            blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)',
        )

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN - ReLU - conv3x3(stride) - BN - ReLU - dropout - conv3x3.

    When the shape changes, the 1x1-conv shortcut takes the pre-activated input (as in the
    reference WRN code); otherwise the shortcut is the raw input.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            drop_rate: float = 0.0,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.bn1 = norm_layer(in_chs, **dd)
        self.act1 = act_layer(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn2 = norm_layer(out_chs, **dd)
        self.act2 = act_layer(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False, **dd)
        self.shortcut = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.drop(self.act2(self.bn2(out)))
        out = self.conv2(out)
        return out + shortcut


class WideResNetCifar(StageNet):
    """Wide ResNet for 32x32 inputs: conv3x3 stem (``conv1``), 3 stages, final BN-ReLU."""

    def __init__(
            self,
            depth: int = 28,
            widen_factor: int = 10,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            block_drop_rate: float = 0.0,
            act_layer: LayerType = nn.ReLU,
            norm_layer: LayerType = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        """
        Args:
            depth: Total depth, 6n + 4 (n blocks per stage).
            widen_factor: Width multiplier k of the stages (16k, 32k, 64k channels).
            num_classes: Number of classifier outputs (0 for no classifier).
            in_chans: Number of input channels.
            global_pool: Global pooling type.
            drop_rate: Dropout before the classifier.
            block_drop_rate: Dropout between the two convolutions of each block (0.3 in the paper's dropout runs).
            act_layer: Activation layer.
            norm_layer: Normalization layer.
        """
        if (depth - 4) % 6:
            raise ValueError(f'WRN depth must be 6n + 4, got {depth}')
        n = (depth - 4) // 6
        super().__init__((n, n, n), num_classes, in_chans, drop_rate)
        dd = {'device': device, 'dtype': dtype}
        act_layer = get_act_layer(act_layer)
        norm_layer = get_norm_layer(norm_layer)
        stem_chs = 16
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)

        self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, padding=1, bias=False, **dd)
        self.feature_info = [dict(num_chs=stem_chs, reduction=1, module='conv1')]

        in_chs = stem_chs
        reduction = 1
        for stage_idx, out_chs in enumerate(widths):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for i in range(n):
                blocks.append(WideBasicBlock(
                    in_chs,
                    out_chs,
                    stride=stride if i == 0 else 1,
                    drop_rate=block_drop_rate,
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                    **dd,
                ))
                in_chs = out_chs
            self.add_stage(blocks, in_chs, reduction)

        # pre-activation blocks end without a norm, so the head normalizes and activates first
        self.bn_final = norm_layer(in_chs, **dd)
        self.act_final = act_layer(inplace=True)
        self.create_head(in_chs, num_classes, global_pool, dd)

        self.init_weights()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Regexes grouping parameters (and top-level modules) into stem, blocks and head."""
        return dict(
            stem=r'^conv1(?:\.|$)',
            blocks=[(r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)', None), (r'^bn_final', (99999,))],
        )

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_final(self.bn_final(x))


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # four stages (strides 1, 2, 2, 2) leave a 4x4 map at 32x32 input
    'resnet18_cifar': _cfg(pool_size=(4, 4), paper_ids='arXiv:1512.03385'),
    'wide_resnet28_10_cifar': _cfg(paper_ids='arXiv:1605.07146'),
})


def _create_cifar_resnet(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    num_stages = len(kwargs.get('layers', (2, 2, 2, 2)))
    return build_model_with_cfg(
        CifarResNet, variant, pretrained, feature_cfg=dict(out_indices=tuple(range(num_stages + 1))), **kwargs)


def _create_wide_resnet(variant: str, pretrained: bool = False, **kwargs) -> WideResNetCifar:
    # stem + 3 stages: one map fewer than timm's default 5
    return build_model_with_cfg(
        WideResNetCifar, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-18 for CIFAR (3x3 stem, no max-pool), CIFAR-10 defaults."""
    model_args = dict(layers=(2, 2, 2, 2), channels=(64, 128, 256, 512))
    return _create_cifar_resnet('resnet18_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def wide_resnet28_10_cifar(pretrained: bool = False, **kwargs) -> WideResNetCifar:
    """WRN-28-10 for CIFAR, CIFAR-10 defaults."""
    model_args = dict(depth=28, widen_factor=10)
    return _create_wide_resnet('wide_resnet28_10_cifar', pretrained, **dict(model_args, **kwargs))
