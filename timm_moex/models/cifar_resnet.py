"""The CIFAR baselines of the augmentation literature, in timm's conventions.

- ``resnet18_cifar``: ResNet-18 with a 3x3 stride-1 stem and no max-pool (32x32 inputs), the
  model of the Mixup / CutMix / MoEx CIFAR tables; timm's own ``BasicBlock``.
- ``wide_resnet28_10_cifar``: WRN-28-10 (Zagoruyko & Komodakis, 2016), pre-activation blocks.
"""
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint_seq
from timm.models.resnet import BasicBlock

__all__ = ['CifarResNet', 'WideResNetCifar', 'CIFAR10_MEAN', 'CIFAR10_STD']

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class _CifarNet(nn.Module):
    """What both CIFAR networks share: stages ``layer1..N``, a pooled linear head, timm's API."""
    num_stages: int

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = num_features
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1|bn1|act1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for i in range(1, self.num_stages + 1):
            stage = getattr(self, f'layer{i}')
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
        return self.forward_final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class CifarResNet(_CifarNet):
    """ResNet with a conv3x3-BN-ReLU stem at full resolution and timm's ``BasicBlock`` stages."""

    def __init__(
            self,
            layers: Sequence[int] = (2, 2, 2, 2),
            widths: Sequence[int] = (64, 128, 256, 512),
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info: List[Dict[str, Any]] = [dict(num_chs=widths[0], reduction=1, module='act1')]
        in_chs, reduction = widths[0], 1
        for i, (num_blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(num_blocks):
                s = stride if j == 0 else 1
                downsample = None
                if s != 1 or in_chs != width:
                    downsample = nn.Sequential(nn.Conv2d(in_chs, width, 1, stride=s, bias=False), nn.BatchNorm2d(width))
                blocks.append(BasicBlock(in_chs, width, stride=s, downsample=downsample))
                in_chs = width
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f'layer{i + 1}'))
        self.num_stages = len(layers)
        self._init_head(in_chs, num_classes, global_pool, drop_rate)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))


class WideBasicBlock(nn.Module):
    """Pre-activation BN-ReLU-conv3x3-(dropout)-BN-ReLU-conv3x3; a 1x1 conv shortcut on the
    pre-activated input where the shape changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv2(self.act2(self.bn2(self.drop(self.conv1(pre)))))
        return out + shortcut


class WideResNetCifar(_CifarNet):
    """WRN-depth-k: a conv3x3 stem of 16 channels, 3 stages of (depth - 4) / 6 blocks of width
    16k, 32k, 64k, and a final BN-ReLU."""

    def __init__(
            self,
            depth: int = 28,
            widen_factor: int = 10,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            block_drop_rate: float = 0.0,
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f'WRN depth must be 6n + 4; got {depth}')
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        self.feature_info: List[Dict[str, Any]] = [dict(num_chs=16, reduction=1, module='conv1')]
        in_chs, reduction = 16, 1
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [WideBasicBlock(in_chs if j == 0 else width, width, stride if j == 0 else 1, block_drop_rate)
                      for j in range(n)]
            in_chs = width
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f'layer{i + 1}'))
        self.num_stages = len(widths)
        self.bn_final = nn.BatchNorm2d(in_chs)
        self.act_final = nn.ReLU(inplace=True)
        self.feature_info[-1]['module'] = 'act_final'
        self._init_head(in_chs, num_classes, global_pool, drop_rate)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_final(self.bn_final(x))


def _cfg(**kwargs) -> Dict[str, Any]:
    return dict(dict(
        url='', num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0, interpolation='bilinear',
        mean=CIFAR10_MEAN, std=CIFAR10_STD, first_conv='conv1', classifier='fc', license='apache-2.0'), **kwargs)


default_cfgs = generate_default_cfgs({
    'resnet18_cifar': _cfg(),
    'wide_resnet28_10_cifar': _cfg(pool_size=(8, 8)),
})


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool)."""
    return build_model_with_cfg(CifarResNet, 'resnet18_cifar', pretrained,
                                **kwargs)


@register_model
def wide_resnet28_10_cifar(pretrained: bool = False, **kwargs) -> WideResNetCifar:
    """WRN-28-10 for 32x32 inputs."""
    kwargs = dict(dict(depth=28, widen_factor=10), **kwargs)
    return build_model_with_cfg(WideResNetCifar, 'wide_resnet28_10_cifar', pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)
