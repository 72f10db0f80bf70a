"""PyramidNet (Han, Kim, Kim, "Deep Pyramidal Residual Networks", CVPR 2017) for timm.

Instead of doubling the width at each downsampling, every residual block widens the network by
the same amount, alpha / (number of blocks), so the final width is stem_width + alpha (times 4
for bottleneck blocks). Blocks have no ReLU after their last BN and add a zero-padded identity
shortcut (average-pooled on downsampling blocks), so PyramidNet has no projection convolutions.

Optional ShakeDrop regularization (Yamada et al., "ShakeDrop Regularization for Deep Residual
Learning", 2018) with the linear-decay rule used with PyramidNet.

CIFAR models: 3x3 stem, 3 stages, 32x32 input, CIFAR-100 defaults.
ImageNet models: 7x7 stride-2 stem + max-pool, 4 stages of bottleneck blocks.
"""
from typing import Any, Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerType, get_act_layer, get_norm_layer, register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .stage_net import StageNet

__all__ = ['PyramidNet', 'PyramidBasicBlock', 'PyramidBottleneck', 'ShakeDrop', 'CIFAR100_MEAN', 'CIFAR100_STD']

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class _ShakeDropFunction(torch.autograd.Function):
    """Scales each sample by b + alpha - b*alpha forward and by b + beta - b*beta backward.

    Written as b + alpha * (1 - b) so that kept samples (b = 1) are scaled by exactly 1.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, beta)
        return x * (gate + alpha * (1 - gate))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        gate, beta = ctx.saved_tensors
        return grad_output * (gate + beta * (1 - gate)), None, None, None


@register_notrace_module  # random draws shaped by the batch: a leaf for FX tracing
class ShakeDrop(nn.Module):
    """ShakeDrop on a residual branch with death probability ``p``.

    Training: per sample, gate b ~ Bernoulli(1 - p), alpha ~ U[-1, 1] (forward) and
    beta ~ U[0, 1] (backward). Eval: the expected forward scale, 1 - p. A TorchScript
    model runs ShakeDrop in eval mode only (its training path is a custom autograd function).
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f'ShakeDrop probability must be in [0, 1], got {p}')
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return x
        if not self.training:
            return x * (1.0 - self.p)
        return self._shake(x)

    @torch.jit.unused
    def _shake(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        # sampled in float32 so that low-precision inputs get the same distributions
        gate = torch.empty(shape, device=x.device, dtype=torch.float32).bernoulli_(1.0 - self.p)
        alpha = torch.empty_like(gate).uniform_(-1.0, 1.0)
        beta = torch.empty_like(gate).uniform_(0.0, 1.0)
        return _ShakeDropFunction.apply(x, gate.to(x.dtype), alpha.to(x.dtype), beta.to(x.dtype))

    def extra_repr(self) -> str:
        return f'p={self.p:.4f}'


class _PyramidBlock(nn.Module):
    """Shared forward: (ShakeDrop of) the residual branch plus the zero-padded shortcut."""
    expansion: int = 1

    def __init__(self, in_chs: int, out_chs: int, stride: int, shakedrop_prob: float):
        super().__init__()
        if out_chs < in_chs:
            raise ValueError(f'A PyramidNet block cannot narrow the network: {in_chs} -> {out_chs} channels')
        # a constant known at construction, so that FX and TorchScript see no data-dependent branch
        self.pad_chs = out_chs - in_chs
        # ceil_mode keeps the shortcut the size of the stride-2 conv output for odd inputs
        self.downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride != 1 else nn.Identity()
        self.shakedrop = ShakeDrop(shakedrop_prob) if shakedrop_prob > 0 else nn.Identity()

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shakedrop(self.residual(x))
        shortcut = self.downsample(x)
        if self.pad_chs > 0:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad_chs))
        return out + shortcut


class PyramidBasicBlock(_PyramidBlock):
    """BN - conv3x3(stride) - BN - ReLU - conv3x3 - BN; output width ``planes``."""
    expansion = 1

    def __init__(
            self,
            in_chs: int,
            planes: int,
            stride: int = 1,
            shakedrop_prob: float = 0.0,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        super().__init__(in_chs, planes * self.expansion, stride, shakedrop_prob)
        dd = {'device': device, 'dtype': dtype}
        self.bn1 = norm_layer(in_chs, **dd)
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn2 = norm_layer(planes, **dd)
        self.act2 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False, **dd)
        self.bn3 = norm_layer(planes, **dd)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.bn1(x))
        x = self.conv2(self.act2(self.bn2(x)))
        return self.bn3(x)


class PyramidBottleneck(_PyramidBlock):
    """BN - conv1x1 - BN - ReLU - conv3x3(stride) - BN - ReLU - conv1x1 - BN; output width 4 * ``planes``."""
    expansion = 4

    def __init__(
            self,
            in_chs: int,
            planes: int,
            stride: int = 1,
            shakedrop_prob: float = 0.0,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        super().__init__(in_chs, planes * self.expansion, stride, shakedrop_prob)
        dd = {'device': device, 'dtype': dtype}
        out_chs = planes * self.expansion
        self.bn1 = norm_layer(in_chs, **dd)
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False, **dd)
        self.bn2 = norm_layer(planes, **dd)
        self.act2 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn3 = norm_layer(planes, **dd)
        self.act3 = act_layer(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False, **dd)
        self.bn4 = norm_layer(out_chs, **dd)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.bn1(x))
        x = self.conv2(self.act2(self.bn2(x)))
        x = self.conv3(self.act3(self.bn3(x)))
        return self.bn4(x)


def pyramid_widths(layers: Tuple[int, ...], alpha: float, stem_width: int) -> List[List[int]]:
    """The ``planes`` of every block, stage by stage.

    The width is accumulated as a float and rounded per block with Python's ``round`` (ties to
    even); parameter parity with the reference implementation depends on doing exactly this.
    """
    addrate = alpha / sum(layers)
    dim = float(stem_width)
    widths = []
    for depth in layers:
        stage = []
        for _ in range(depth):
            dim += addrate
            stage.append(int(round(dim)))
        widths.append(stage)
    return widths


class PyramidNet(StageNet):
    """PyramidNet with a CIFAR (3x3 conv + BN) or ImageNet (7x7/2 conv + BN + ReLU + max-pool) stem.

    Top-level children run in registration order: stem (``conv1``, ``bn1``, ``act1``,
    ``maxpool``; the last two are identities in the CIFAR stem), ``layer1``..``layerN``
    (1 to 4 stages), ``bn_final``, ``act_final``, ``global_pool``, ``fc``.
    """

    def __init__(
            self,
            layers: Tuple[int, ...] = (18, 18, 18),
            alpha: float = 48.0,
            bottleneck: bool = False,
            stem_type: str = 'cifar',
            stem_width: Optional[int] = None,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            shakedrop_prob: float = 0.0,
            act_layer: LayerType = nn.ReLU,
            norm_layer: LayerType = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        """
        Args:
            layers: Number of blocks in each stage (the first stage has stride 1, the others 2).
            alpha: Total widening over the network; the final ``planes`` is ``stem_width + alpha``.
            bottleneck: Bottleneck blocks (output 4 * planes) instead of basic blocks.
            stem_type: ``'cifar'`` or ``'imagenet'``.
            stem_width: Stem output width; 16 for the CIFAR stem, 64 for the ImageNet stem by default.
            num_classes: Number of classifier outputs (0 for no classifier).
            in_chans: Number of input channels.
            global_pool: Global pooling type.
            drop_rate: Dropout before the classifier.
            shakedrop_prob: ShakeDrop death probability of the last block; block l of L gets
                ``shakedrop_prob * l / L``. 0 disables ShakeDrop.
            act_layer: Activation layer.
            norm_layer: Normalization layer.
        """
        if stem_type not in ('cifar', 'imagenet'):
            raise ValueError(f"stem_type must be 'cifar' or 'imagenet', got {stem_type!r}")
        super().__init__(layers, num_classes, in_chans, drop_rate)
        dd = {'device': device, 'dtype': dtype}
        act_layer = get_act_layer(act_layer)
        norm_layer = get_norm_layer(norm_layer)
        self.stem_type = stem_type

        # Stem
        if stem_width is None:
            stem_width = 16 if stem_type == 'cifar' else 64
        if stem_type == 'cifar':
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False, **dd)
            self.bn1 = norm_layer(stem_width, **dd)
            # always present, so that TorchScript compiles one stem for both types
            self.act1 = nn.Identity()
            self.maxpool = nn.Identity()
            self.feature_info = [dict(num_chs=stem_width, reduction=1, module='bn1')]
            reduction = 1
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False, **dd)
            self.bn1 = norm_layer(stem_width, **dd)
            self.act1 = act_layer(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            self.feature_info = [dict(num_chs=stem_width, reduction=2, module='act1')]
            reduction = 4

        # Stages
        block_cls = PyramidBottleneck if bottleneck else PyramidBasicBlock
        total_blocks = sum(layers)
        block_idx = 0
        in_chs = stem_width
        for stage_idx, stage_planes in enumerate(pyramid_widths(layers, alpha, stem_width)):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for i, planes in enumerate(stage_planes):
                block_idx += 1
                blocks.append(block_cls(
                    in_chs,
                    planes,
                    stride=stride if i == 0 else 1,
                    shakedrop_prob=shakedrop_prob * block_idx / total_blocks,
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                    **dd,
                ))
                in_chs = planes * block_cls.expansion
            self.add_stage(blocks, in_chs, reduction)

        # Head (blocks end without an activation, so the head normalizes and activates first)
        self.bn_final = norm_layer(in_chs, **dd)
        self.act_final = act_layer(inplace=True)
        self.create_head(in_chs, num_classes, global_pool, dd)

        self.init_weights()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Regexes grouping parameters (and top-level modules) into stem, blocks and head."""
        stem = r'^(?:conv1|bn1)(?:\.|$)' if self.stem_type == 'cifar' else r'^(?:conv1|bn1|act1|maxpool)(?:\.|$)'
        return dict(
            stem=stem,
            blocks=[(r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)', None), (r'^bn_final', (99999,))],
        )

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def stem_pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(x)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_final(self.bn_final(x))


def _create_pyramidnet(variant: str, pretrained: bool = False, **kwargs) -> PyramidNet:
    num_stages = len(kwargs.get('layers', (18, 18, 18)))
    return build_model_with_cfg(
        PyramidNet,
        variant,
        pretrained,
        # one map per stage plus the stem; the CIFAR models have one stage fewer than timm's default 5
        feature_cfg=dict(out_indices=tuple(range(num_stages + 1))),
        **kwargs,
    )


def _cifar_args(depth: int, alpha: float, bottleneck: bool) -> Dict[str, Any]:
    # depth counts the stem conv, the fc and 3 (bottleneck) or 2 (basic) convs per block over 3 stages
    per_block = 9 if bottleneck else 6
    if (depth - 2) % per_block:
        raise ValueError(f'PyramidNet depth {depth} does not fit {"bottleneck" if bottleneck else "basic"} blocks')
    n = (depth - 2) // per_block
    return dict(layers=(n, n, n), alpha=alpha, bottleneck=bottleneck, stem_type='cifar')


def _imagenet_args(layers: Tuple[int, ...], alpha: float) -> Dict[str, Any]:
    return dict(layers=layers, alpha=alpha, bottleneck=True, stem_type='imagenet')


def _cfg_cifar(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 100, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': CIFAR100_MEAN, 'std': CIFAR100_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'paper_ids': 'arXiv:1610.02915',
        **kwargs,
    }


def _cfg_imagenet(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'paper_ids': 'arXiv:1610.02915',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'pyramidnet110_a48': _cfg_cifar(),
    'pyramidnet110_a270': _cfg_cifar(),
    'pyramidnet164_a270': _cfg_cifar(),
    'pyramidnet200_a240': _cfg_cifar(),
    'pyramidnet200': _cfg_cifar(),
    'pyramidnet236_a220': _cfg_cifar(),
    'pyramidnet272_a200': _cfg_cifar(),
    'pyramidnet101_a360': _cfg_imagenet(),
    'pyramidnet200_a300': _cfg_imagenet(),
})


@register_model
def pyramidnet110_a48(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-110 (basic blocks), alpha=48, CIFAR."""
    model_args = _cifar_args(depth=110, alpha=48, bottleneck=False)
    return _create_pyramidnet('pyramidnet110_a48', pretrained, **dict(model_args, **kwargs))


@register_model
def pyramidnet110_a270(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-110 (basic blocks), alpha=270, CIFAR."""
    model_args = _cifar_args(depth=110, alpha=270, bottleneck=False)
    return _create_pyramidnet('pyramidnet110_a270', pretrained, **dict(model_args, **kwargs))


@register_model
def pyramidnet164_a270(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-164 (bottleneck), alpha=270, CIFAR."""
    model_args = _cifar_args(depth=164, alpha=270, bottleneck=True)
    return _create_pyramidnet('pyramidnet164_a270', pretrained, **dict(model_args, **kwargs))


@register_model
def pyramidnet200_a240(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-200 (bottleneck), alpha=240, CIFAR."""
    model_args = _cifar_args(depth=200, alpha=240, bottleneck=True)
    return _create_pyramidnet('pyramidnet200_a240', pretrained, **dict(model_args, **kwargs))


@register_model
def pyramidnet200(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-200 (bottleneck), alpha=240, CIFAR: short name of ``pyramidnet200_a240``."""
    model_args = _cifar_args(depth=200, alpha=240, bottleneck=True)
    return _create_pyramidnet('pyramidnet200', pretrained, **dict(model_args, **kwargs))


@register_model
def pyramidnet236_a220(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-236 (bottleneck), alpha=220, CIFAR."""
    model_args = _cifar_args(depth=236, alpha=220, bottleneck=True)
    return _create_pyramidnet('pyramidnet236_a220', pretrained, **dict(model_args, **kwargs))


@register_model
def pyramidnet272_a200(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-272 (bottleneck), alpha=200, CIFAR."""
    model_args = _cifar_args(depth=272, alpha=200, bottleneck=True)
    return _create_pyramidnet('pyramidnet272_a200', pretrained, **dict(model_args, **kwargs))


@register_model
def pyramidnet101_a360(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-101 (bottleneck), alpha=360, ImageNet."""
    model_args = _imagenet_args(layers=(3, 4, 23, 3), alpha=360)
    return _create_pyramidnet('pyramidnet101_a360', pretrained, **dict(model_args, **kwargs))


@register_model
def pyramidnet200_a300(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-200 (bottleneck), alpha=300, ImageNet."""
    model_args = _imagenet_args(layers=(3, 24, 36, 3), alpha=300)
    return _create_pyramidnet('pyramidnet200_a300', pretrained, **dict(model_args, **kwargs))
