"""PyramidNet (Han, Kim, Kim, "Deep Pyramidal Residual Networks", CVPR 2017), in timm's conventions.

Widths grow additively by α / (number of blocks) at every block, shortcuts are identities with
zero-padded extra channels (average-pooled where the block downsamples), and the residual
branches are pre-activation style with a BN before the first conv and after the last one.
ShakeDrop (Yamada et al., 2018) is available through ``shakedrop_prob``.

CIFAR models take 32x32 inputs; ``pyramidnet200`` is the paper's PyramidNet-200 (α = 240).
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint_seq

__all__ = ['PyramidNet', 'CIFAR100_MEAN', 'CIFAR100_STD']

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class _ShakeDropFunction(torch.autograd.Function):
    """Forward scales by b + α - bα, backward by b + β - bβ, with b ~ Bernoulli(1 - p) per sample."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        alpha = torch.empty_like(gate).uniform_(-1.0, 1.0)
        ctx.save_for_backward(gate)
        return x * (gate + alpha - gate * alpha)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> Tuple[torch.Tensor, None]:
        (gate,) = ctx.saved_tensors
        beta = torch.rand_like(gate)
        return grad_output * (gate + beta - gate * beta), None


class ShakeDrop(nn.Module):
    """ShakeDrop on a residual branch with death probability ``p``; the expectation in eval."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f'ShakeDrop probability must be in [0, 1]; got {p}')
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x * (1.0 - self.p)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        gate = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1.0 - self.p)
        return _ShakeDropFunction.apply(x, gate)

    def extra_repr(self) -> str:
        return f'p={self.p:.4f}'


def _pad_channels(shortcut: torch.Tensor, channels: int) -> torch.Tensor:
    """The identity shortcut, its missing channels filled with zeros (any device, dtype, layout)."""
    extra = channels - shortcut.shape[1]
    if extra == 0:
        return shortcut
    return F.pad(shortcut, (0, 0, 0, 0, 0, extra))


class BasicBlock(nn.Module):
    """BN - conv3x3 - BN - ReLU - conv3x3 - BN."""
    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1, shakedrop_prob: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.shakedrop = ShakeDrop(shakedrop_prob) if shakedrop_prob > 0 else nn.Identity()
        self.downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride != 1 else nn.Identity()

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.bn1(x))
        x = self.conv2(self.act(self.bn2(x)))
        return self.bn3(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shakedrop(self.residual(x))
        return out + _pad_channels(self.downsample(x), out.shape[1])


class Bottleneck(BasicBlock):
    """BN - conv1x1 - BN - ReLU - conv3x3 - BN - ReLU - conv1x1 (4x) - BN."""
    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, shakedrop_prob: float = 0.0):
        nn.Module.__init__(self)
        out_chs = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(out_chs)
        self.shakedrop = ShakeDrop(shakedrop_prob) if shakedrop_prob > 0 else nn.Identity()
        self.downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride != 1 else nn.Identity()

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.bn1(x))
        x = self.conv2(self.act(self.bn2(x)))
        x = self.conv3(self.act(self.bn3(x)))
        return self.bn4(x)


class PyramidNet(nn.Module):
    """PyramidNet for CIFAR (``imagenet_stem=False``: 3 stages, conv3x3 stem) or ImageNet (4 stages,
    conv7x7 + max-pool stem).

    Args:
        layers: Blocks per stage.
        alpha: Total width increase α over all blocks.
        bottleneck: Bottleneck (4x expansion) or basic blocks.
        imagenet_stem: The ImageNet stem and strides instead of the CIFAR ones.
        num_classes, in_chans, global_pool, drop_rate: as every timm model.
        shakedrop_prob: ShakeDrop death probability of the last block; block l of L gets
            ``shakedrop_prob * l / L``. 0 disables ShakeDrop.
    """

    def __init__(
            self,
            layers: Sequence[int],
            alpha: float,
            bottleneck: bool = True,
            imagenet_stem: bool = False,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            shakedrop_prob: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.imagenet_stem = imagenet_stem
        block: Type[BasicBlock] = Bottleneck if bottleneck else BasicBlock

        stem_chs = 64 if imagenet_stem else 16
        if imagenet_stem:
            self.conv1 = nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_chs)
            self.act1 = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            stem_module, reduction = 'maxpool', 4
        else:
            # The CIFAR stem has no ReLU: every block starts with its own BN.
            self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_chs)
            stem_module, reduction = 'bn1', 1
        self.feature_info: List[Dict[str, Any]] = [dict(num_chs=stem_chs, reduction=reduction, module=stem_module)]

        # Parameter parity with the reference code depends on accumulating the width as a float
        # and rounding each block's width with Python's round (ties to even).
        total_blocks = sum(layers)
        add_rate = alpha / total_blocks
        width, in_chs, block_idx = float(stem_chs), stem_chs, 0
        for stage_idx, num_blocks in enumerate(layers):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for i in range(num_blocks):
                width += add_rate
                block_idx += 1
                planes = int(round(width))
                blocks.append(block(in_chs, planes, stride if i == 0 else 1, shakedrop_prob * block_idx / total_blocks))
                in_chs = planes * block.expansion
            self.add_module(f'layer{stage_idx + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f'layer{stage_idx + 1}'))
        self.num_stages = len(layers)
        self.bn_final = nn.BatchNorm2d(in_chs)
        self.act_final = nn.ReLU(inplace=True)
        # The last feature map is the one after the final BN-ReLU, as timm's pre-activation ResNetV2 does.
        self.feature_info[-1]['module'] = 'act_final'
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
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
        return dict(
            stem=r'^conv1|bn1|act1|maxpool',
            blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)',
        )

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
        x = self.bn1(self.conv1(x))
        if self.imagenet_stem:
            x = self.maxpool(self.act1(x))
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for i in range(1, self.num_stages + 1):
            stage = getattr(self, f'layer{i}')
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
        return self.act_final(self.bn_final(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_pyramidnet(variant: str, pretrained: bool = False, **kwargs) -> PyramidNet:
    out_indices = tuple(range(len(kwargs['layers']) + 1))  # the stem and every stage
    return build_model_with_cfg(PyramidNet, variant, pretrained,
                                feature_cfg=dict(out_indices=out_indices), **kwargs)


def _cifar_cfg(**kwargs) -> Dict[str, Any]:
    return dict(
        url='', num_classes=100, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0, interpolation='bilinear',
        mean=CIFAR100_MEAN, std=CIFAR100_STD, first_conv='conv1', classifier='fc', license='apache-2.0', **kwargs)


def _imagenet_cfg(**kwargs) -> Dict[str, Any]:
    return dict(
        url='', num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation='bilinear', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv='conv1',
        classifier='fc', license='apache-2.0', **kwargs)


default_cfgs = generate_default_cfgs({
    'pyramidnet110_a48': _cifar_cfg(),
    'pyramidnet110_a270': _cifar_cfg(),
    'pyramidnet164_a270': _cifar_cfg(),
    'pyramidnet200_a240': _cifar_cfg(),
    'pyramidnet200': _cifar_cfg(),
    'pyramidnet236_a220': _cifar_cfg(),
    'pyramidnet272_a200': _cifar_cfg(),
    'pyramidnet101_a360': _imagenet_cfg(),
    'pyramidnet200_a300': _imagenet_cfg(),
})


def _cifar_args(depth: int, alpha: float, bottleneck: bool) -> Dict[str, Any]:
    """CIFAR PyramidNet of ``depth`` layers: 3 stages of (depth - 2) / 9 bottleneck or / 6 basic blocks."""
    n = (depth - 2) // (9 if bottleneck else 6)
    return dict(layers=(n, n, n), alpha=alpha, bottleneck=bottleneck)


@register_model
def pyramidnet110_a48(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-110 (α = 48), basic blocks, CIFAR."""
    return _create_pyramidnet('pyramidnet110_a48', pretrained, **dict(_cifar_args(110, 48, False), **kwargs))


@register_model
def pyramidnet110_a270(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-110 (α = 270), basic blocks, CIFAR."""
    return _create_pyramidnet('pyramidnet110_a270', pretrained, **dict(_cifar_args(110, 270, False), **kwargs))


@register_model
def pyramidnet164_a270(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-164 (α = 270), bottleneck blocks, CIFAR."""
    return _create_pyramidnet('pyramidnet164_a270', pretrained, **dict(_cifar_args(164, 270, True), **kwargs))


@register_model
def pyramidnet200_a240(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-200 (α = 240), bottleneck blocks, CIFAR: the MoEx and CutMix papers' model."""
    return _create_pyramidnet('pyramidnet200_a240', pretrained, **dict(_cifar_args(200, 240, True), **kwargs))


@register_model
def pyramidnet200(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-200, the short name of pyramidnet200_a240."""
    return _create_pyramidnet('pyramidnet200', pretrained, **dict(_cifar_args(200, 240, True), **kwargs))


@register_model
def pyramidnet236_a220(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-236 (α = 220), bottleneck blocks, CIFAR."""
    return _create_pyramidnet('pyramidnet236_a220', pretrained, **dict(_cifar_args(236, 220, True), **kwargs))


@register_model
def pyramidnet272_a200(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-272 (α = 200), bottleneck blocks, CIFAR."""
    return _create_pyramidnet('pyramidnet272_a200', pretrained, **dict(_cifar_args(272, 200, True), **kwargs))


@register_model
def pyramidnet101_a360(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-101 (α = 360), bottleneck blocks, ImageNet."""
    args = dict(layers=(3, 4, 23, 3), alpha=360, bottleneck=True, imagenet_stem=True)
    return _create_pyramidnet('pyramidnet101_a360', pretrained, **dict(args, **kwargs))


@register_model
def pyramidnet200_a300(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-200 (α = 300), bottleneck blocks, ImageNet."""
    args = dict(layers=(3, 24, 36, 3), alpha=300, bottleneck=True, imagenet_stem=True)
    return _create_pyramidnet('pyramidnet200_a300', pretrained, **dict(args, **kwargs))
