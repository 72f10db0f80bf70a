"""AutoMix: a mixing mask learned by a small cross-attention Mix Block, trained through a momentum encoder.

Liu, Li, Zang, Wang, Wu, Zhou, Li, "AutoMix: Unveiling the Power of Mixup for Stronger
Classifiers", ECCV 2022, as in the authors' released code (OpenMixup). For a batch ``x`` with
pairing ``perm`` and ``lam ~ Beta(2, 2)``:

* the momentum (EMA) copy of the encoder gives mid-level feature maps ``z`` of ``x``
  (the output of the stage before the last by default: a ResNet's third stage);
* the Mix Block embeds ``lam`` into ``z_i`` and ``1 - lam`` into ``z_perm[i]`` (an extra
  constant channel each, the released ImageNet configs' choice; the released CIFAR configs
  embed nothing: ``lam_embed='none'``), projects both with one shared 1x1 convolution
  (query = key projection) and takes the scaled dot-product attention ``P`` between the
  positions p of image i and q of its partner, normalized over the partner's positions
  (``sum_q P[p, q] = 1``). A 1x1 "value" convolution of the partner's map gives one channel
  ``v``, and the partner's weight at image i's position p is ``s[p] = sigmoid(sum_q P[p, q]
  v[q])`` (the logits upsampled to the image size first): a weighted average of the partner's
  values. Image i's weight is the mask ``M = 1 - s``;
* the mixed image is ``M * x_i + (1 - M) * x_perm[i]`` with the label ``lam * y_i + (1 - lam) * y_perm[i]``.

Training has two decoupled flows in one backward pass (the "momentum pipeline"):

* the Mix Block learns from the mixup loss of its mixed images through the momentum encoder,
  whose weights take no gradient, plus a mask-area loss ``max(|mean(M) - lam| - margin, 0)``
  on the batch-mean area (weight 0.1, margin 0.1; optionally decaying to 0 over training on a
  cosine, as in the released ImageNet configs);
* the online encoder learns from mixed images made with the Mix Block's mask detached (its
  own ``lam`` and pairing, as in the released code), plus a plain loss on the clean images;
  when ``lam`` or ``1 - lam`` is at most ``lam_margin`` (0.08) the online encoder gets plain
  Mixup images instead.

Two classifier heads, as in the released code: the model's own classifier takes the clean
images and a copy of it (:attr:`AutoMix.mix_head`) the mixed ones; the momentum encoder's
classifier follows the mixed-image head, its backbone the model's. The model keeps the
clean-image head, the head of the released code's inference path.

The momentum encoder follows the online one with a momentum rising on a cosine from 0.999
towards 1 over training (the released code holds 0.999 for the first 10 % of the steps and
ends at 0.999999: at most 2.5e-5 apart). :class:`AutoMix` holds the Mix Block, the mixed-image
head and the momentum encoder (one module for DDP, the optimizer's extra parameter groups and
the checkpoint); :class:`AutoMixTask` is the timm training task that draws ``lam`` and the
pairings and adds the losses, optionally with MoEx on the online encoder's stem (same pairing
as the mixing).
"""
import contextlib
import copy
import logging
import math
import re
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import ClassificationTask
from torch.nn.parallel import DistributedDataParallel as DDP

from ..hooks.moex import MoExHook, get_moex_hook
from ..loss.moex import interpolated_loss
from ..utils.amp import autocast_off
from ..utils.checks import check_beta_alpha, check_choice, check_unit_interval
from ..utils.model import unwrap_model
from .moex_mixing import PAIRINGS, MoExMixing, check_moex_argument, draw_pairing

__all__ = ['AutoMix', 'AutoMixTask', 'MixBlock', 'mask_area_loss', 'mix_images', 'resolve_feature_layer',
           'parse_feature_layer', 'cosine_ramp', 'LAM_EMBEDS', 'UPSAMPLE_MODES']

_logger = logging.getLogger(__name__)

LAM_EMBEDS = ('none', 'concat', 'mul')
UPSAMPLE_MODES = ('nearest', 'bilinear')
_ACCEPTED = ('accepted: a timm CNN with feature_info, whose stages give (B, C, H, W) maps (ResNet, ResNeXt, '
             'ConvNeXt, RegNet, EfficientNet, DenseNet, resnet18_cifar, PyramidNet, ...)')


def cosine_ramp(step: int, total: Optional[int]) -> float:
    """1 at ``step`` 0 falling on a half cosine to 0 at ``total`` (and after); 1 throughout when ``total`` is None."""
    if not total:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step / total, 1.0)))


def parse_feature_layer(text: str) -> Union[int, str]:
    """'-2' -> -2 (a feature_info index); any other text is a module name."""
    text = text.strip()
    return int(text) if re.fullmatch(r'[+-]?\d+', text) else text


def resolve_feature_layer(model: nn.Module, layer: Union[int, str] = -2) -> str:
    """The name of the module whose output feeds the Mix Block.

    ``layer`` is an index into ``model.feature_info`` (negative from the end; the default -2 is
    the stage before the last: a ResNet's or ConvNeXt's third stage, as in the paper) or a
    dotted module name.
    """
    model = unwrap_model(model)
    name = type(model).__name__
    if isinstance(layer, bool) or not isinstance(layer, (int, str)):
        raise TypeError(f'feature layer must be an index into feature_info or a module name; got {layer!r}')
    if isinstance(layer, str):
        try:
            model.get_submodule(layer)
        except AttributeError:
            raise ValueError(f'{name} has no module {layer!r}; its top-level modules are '
                             f'{[n for n, _ in model.named_children()]}') from None
        return layer
    info = getattr(model, 'feature_info', None)
    if not isinstance(info, (list, tuple)) or not info:
        raise ValueError(f'AutoMix needs intermediate feature maps, but {name} exposes no feature_info; {_ACCEPTED}')
    if not -len(info) <= layer < len(info):
        raise ValueError(f'feature layer {layer} is out of range for {name}, which has {len(info)} feature_info '
                         f'entries (indices {-len(info)} to {len(info) - 1})')
    return info[layer]['module']


class _TapReached(Exception):
    """Raised by the feature tap to end the forward pass at the tapped module."""


class MixBlock(nn.Module):
    """Predicts the mixing mask of each pair from their feature maps and ``lam``.

    ``forward(features, perm, lam, size)`` returns the mask ``M`` (B, 1, *size) in [0, 1],
    float32: the weight of image i, ``1 - M`` being that of image ``perm[i]``. With ``z_a``
    and ``z_b`` the maps of image i and of its partner (``lam`` / ``1 - lam`` embedded),
    ``W_q`` the shared query/key projection and ``W_v`` the value projection::

        P[p, q] = softmax_q( (W_q z_a)[p] . (W_q z_b)[q] / sqrt(C') )
        M[p]    = 1 - sigmoid( upsample( sum_q P[p, q] (W_v z_b)[q] ) )

    (the released code's mask for ``1 - lam``, its ``mask_mode='none_v_'``).

    Args:
        in_chs: Channels of the feature maps.
        reduction: The query/key projection has ``in_chs // reduction`` channels.
        lam_embed: 'concat' (a constant channel of ``lam`` / ``1 - lam``, the released ImageNet
            configs), 'none' (no ``lam`` input, the released CIFAR configs) or 'mul' (the maps
            scaled by ``lam`` / ``1 - lam``, the paper's formula).
        upsample: 'nearest' or 'bilinear' upsampling of the mask logits to the image size.
        init_std: Standard deviation of the normal init of the 1x1 convolutions (zero biases),
            so that the first masks are close to 0.5 everywhere.
    """

    def __init__(self, in_chs: int, reduction: int = 2, lam_embed: str = 'concat', upsample: str = 'nearest',
                 init_std: float = 0.01):
        super().__init__()
        if isinstance(in_chs, bool) or not isinstance(in_chs, int) or in_chs < 1:
            raise ValueError(f'in_chs must be a positive integer; got {in_chs!r}')
        if isinstance(reduction, bool) or not isinstance(reduction, int) or not 1 <= reduction <= in_chs:
            raise ValueError(f'reduction must be an integer in [1, in_chs={in_chs}]; got {reduction!r}')
        check_choice('lam_embed', lam_embed, LAM_EMBEDS)
        check_choice('upsample', upsample, UPSAMPLE_MODES)
        self.lam_embed = lam_embed
        self.upsample = upsample
        embed_chs = in_chs + (lam_embed == 'concat')
        self.inner_chs = in_chs // reduction
        self.query = nn.Conv2d(embed_chs, self.inner_chs, 1)  # shared by both maps: query and key
        self.value = nn.Conv2d(embed_chs, 1, 1)
        for conv in (self.query, self.value):
            nn.init.normal_(conv.weight, std=init_std)
            nn.init.zeros_(conv.bias)

    def _embed(self, z: torch.Tensor, lam: float) -> torch.Tensor:
        if self.lam_embed == 'none':
            return z
        if self.lam_embed == 'mul':
            return z * lam
        return torch.cat([z, z.new_full((z.shape[0], 1, *z.shape[2:]), lam)], dim=1)

    def forward(self, features: torch.Tensor, perm: torch.Tensor, lam: float, size: Tuple[int, int]) -> torch.Tensor:
        if features.dim() != 4:
            raise ValueError(f'MixBlock needs (B, C, H, W) feature maps; got shape {tuple(features.shape)}')
        b, _, h, w = features.shape
        z_a = self._embed(features, lam)
        z_b = self._embed(features[perm], 1.0 - lam)
        q = self.query(z_a).flatten(2).float()  # (B, C', N): positions of image i
        k = self.query(z_b).flatten(2).float()  # (B, C', N): positions of its partner
        v = self.value(z_b).flatten(2).float()  # (B, 1, N): the partner's values
        # float32 from here on, autocast or not: the N x N logits overflow in fp16 with large features
        with autocast_off(q.device.type):
            attn = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(self.inner_chs), dim=-1)  # (B, N_i, N_partner)
            logits = (attn @ v.transpose(1, 2)).view(b, 1, h, w)  # the partner's weight, before the sigmoid
            if (h, w) != tuple(size):
                kwargs = dict(align_corners=False) if self.upsample == 'bilinear' else {}
                logits = F.interpolate(logits, size=tuple(size), mode=self.upsample, **kwargs)
            return 1.0 - torch.sigmoid(logits)


def mask_area_loss(mask: torch.Tensor, lam: float, margin: float = 0.1) -> torch.Tensor:
    """``max(|mean(M) - lam| - margin, 0)``: keeps the batch-mean area of the masks near ``lam``.

    The mean runs over the whole batch, as in the released code: single masks may stray from
    ``lam`` as long as their average does not.

    Args:
        mask: The masks ``M`` (B, 1, H, W), image i's weight at each pixel.
        lam: The mixing weight the masks were made for.
        margin: How far the mean area may stray from ``lam`` at no cost.

    Returns:
        The loss, a float32 scalar.
    """
    return F.relu((mask.float().mean() - lam).abs() - margin)


def mix_images(x: torch.Tensor, perm: torch.Tensor, mask: Union[torch.Tensor, float]) -> torch.Tensor:
    """``mask * x + (1 - mask) * x[perm]`` in x's dtype; ``mask`` (B, 1, H, W) or a number (plain Mixup)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.to(x.dtype)
    partner = x[perm]
    return partner + mask * (x - partner)


class _HeadRouter:
    """Forward hook of the model's classifier: its first ``rows`` inputs go through the mixed-image head instead.

    Armed only inside :meth:`AutoMix.route_mixed`; a plain forward is untouched. The head is
    held weakly, so that a deep copy of the model (an EMA copy, say) carries a disarmed router
    and no copy of :class:`AutoMix`.
    """

    def __init__(self, head: nn.Module):
        self._head = weakref.ref(head)
        self.rows: Optional[int] = None

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> Optional[torch.Tensor]:
        head = self._head()
        if self.rows is None or head is None:
            return None
        mixed = head(args[0][:self.rows])
        return torch.cat([mixed.to(output.dtype), output[self.rows:]]) if output.shape[0] > self.rows else mixed


def _classifier_name(model: nn.Module) -> str:
    get_classifier = getattr(model, 'get_classifier', None)
    classifier = get_classifier() if callable(get_classifier) else None
    if isinstance(classifier, nn.Module) and any(True for _ in classifier.parameters()):
        for name, module in model.named_modules():
            if module is classifier and name:
                return name
    raise ValueError(f'AutoMix trains a separate head on the mixed images, but {type(model).__name__} has no '
                     f'classifier with parameters among its modules (get_classifier() gave '
                     f'{type(classifier).__name__}); build it with num_classes > 0, or pass mix_head=False')


class AutoMix(nn.Module):
    """The parts of AutoMix that live beside the model: the Mix Block, the mixed-image head and the momentum encoder.

    One module so that DDP wraps it once (the Mix Block's and the mixed-image head's gradients
    are averaged; the momentum encoder's weights take no gradient), the optimizer gets their
    parameters as their own groups (:meth:`param_groups`), and ``state_dict`` carries everything
    a resume needs (``num_updates`` too).

    The released code trains separate classifier heads on the clean and on the mixed images.
    Here the model's own classifier is the clean-image head and ``mix_head``, a copy of it made
    here (same initial weights), the mixed-image head: inside :meth:`route_mixed` the
    classifier's forward hook sends the first rows of the batch through ``mix_head``. The
    momentum encoder's classifier follows ``mix_head`` (the head whose loss trains the Mix
    Block), its other weights the model's. The model keeps the clean-image head: the released
    code validates all of its heads and deploys (``forward_inference``) the clean-image one.

    Args:
        model: The online encoder (a timm CNN); a deep copy of it, without its MoEx hook,
            becomes the momentum encoder. Build this before ``torch.compile`` / DDP-wrapping
            the model (the classifier's hook must be in place before compiling), or pass the
            wrapped model (it is unwrapped).
        feature_layer: See :func:`resolve_feature_layer`.
        reduction, lam_embed, upsample: See :class:`MixBlock`.
        momentum: The momentum at the start; it rises on a cosine to 1 at ``total_steps``.
        total_steps: Number of :meth:`update_momentum` calls of the run (training forwards);
            None keeps ``momentum`` constant.
        input_size: (C, H, W) of the dry run that finds the feature maps' channels; default the
            model's ``pretrained_cfg['input_size']``.
        mix_head: A separate classifier for the mixed images (the released code); False shares
            the model's classifier between clean and mixed images.
    """

    def __init__(
            self,
            model: nn.Module,
            feature_layer: Union[int, str] = -2,
            reduction: int = 2,
            lam_embed: str = 'concat',
            upsample: str = 'nearest',
            momentum: float = 0.999,
            total_steps: Optional[int] = None,
            input_size: Optional[Tuple[int, int, int]] = None,
            mix_head: bool = True,
    ):
        super().__init__()
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f'momentum must be a number in [0, 1]; got {momentum!r}')
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f'total_steps must be a positive integer or None; got {total_steps!r}')
        online = unwrap_model(model)
        self.feature_layer = resolve_feature_layer(online, feature_layer)
        self.classifier_name = _classifier_name(online) if mix_head else None
        self.base_momentum = float(momentum)
        self.total_steps = total_steps
        self.encoder = _momentum_copy(online)
        self._nhwc = getattr(online, 'output_fmt', 'NCHW') == 'NHWC'
        channels = self._probe_channels(online, input_size)
        self.mix_block = MixBlock(channels, reduction=reduction, lam_embed=lam_embed, upsample=upsample)
        param = next(online.parameters())
        self.mix_block.to(device=param.device, dtype=param.dtype)
        self.mix_head: Optional[nn.Module] = None
        self._router: Optional[_HeadRouter] = None
        if mix_head:
            classifier = online.get_submodule(self.classifier_name)
            self.mix_head = copy.deepcopy(classifier)
            for p in self.mix_head.parameters():
                p.requires_grad_(True)
            self._router = _HeadRouter(self.mix_head)
            self._router_handle = classifier.register_forward_hook(self._router)
        # The count lives in the state_dict (resume) and, mirrored, on the host: reading a
        # device buffer every step would synchronize with the GPU.
        self.register_buffer('num_updates', torch.zeros((), dtype=torch.long, device=param.device))
        self._updates = 0
        self.register_load_state_dict_post_hook(_mirror_update_count)

    @contextlib.contextmanager
    def route_mixed(self, rows: int) -> Iterator[None]:
        """Within this context the model's forwards give ``mix_head``'s logits for their first ``rows`` samples.

        The clean-image head (the model's classifier) keeps the other rows. A no-op without a
        mixed-image head.
        """
        if self._router is None:
            yield
            return
        self._router.rows = int(rows)
        try:
            yield
        finally:
            self._router.rows = None

    def param_groups(self, weight_decay: float = 0.0, mix_block_lr: Optional[float] = None) -> List[Dict[str, Any]]:
        """Optimizer parameter groups for ``optimizer.add_param_group``: the mixed-image head's, then the Mix Block's.

        The head's groups take the optimizer's learning rate, with ``weight_decay`` on its
        weights and none on its biases (timm's convention for the model); the Mix Block's group
        (the last) has ``weight_decay`` on all its parameters and the learning rate
        ``mix_block_lr`` when given.

        Returns:
            A list of parameter-group dicts.
        """
        groups = []
        if self.mix_head is not None:
            params = list(self.mix_head.parameters())
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            groups += [dict(params=g, weight_decay=wd) for g, wd in ((decay, weight_decay), (no_decay, 0.0)) if g]
        block = dict(params=list(self.mix_block.parameters()), weight_decay=weight_decay)
        if mix_block_lr is not None:
            block['lr'] = mix_block_lr
        return groups + [block]

    def _probe_channels(self, online: nn.Module, input_size: Optional[Tuple[int, int, int]]) -> int:
        input_size = input_size or getattr(online, 'pretrained_cfg', {}).get('input_size') or (3, 224, 224)
        param = next(online.parameters())
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            with torch.no_grad():
                features = self.features(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
        finally:
            self.encoder.train(was_training)
        return features.shape[1]

    def features(self, input: torch.Tensor) -> torch.Tensor:
        """The momentum encoder's (B, C, H, W) maps at ``feature_layer`` (the rest of the forward is skipped)."""
        found = []

        def tap(module, args, output):
            found.append(output)
            raise _TapReached

        handle = self.encoder.get_submodule(self.feature_layer).register_forward_hook(tap)
        try:
            self.encoder(input)
        except _TapReached:
            pass
        finally:
            handle.remove()
        if not found:
            raise RuntimeError(f'the forward pass of {type(self.encoder).__name__} never ran {self.feature_layer!r}')
        z = found[0]
        if not isinstance(z, torch.Tensor) or z.dim() != 4:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f'AutoMix needs (B, C, H, W) feature maps, but {self.feature_layer!r} of '
                             f'{type(self.encoder).__name__} gives {shape}; {_ACCEPTED}')
        return z.permute(0, 3, 1, 2) if self._nhwc else z

    @property
    def ramp(self) -> float:
        """:func:`cosine_ramp` at the number of updates so far: 1 at the start, 0 at ``total_steps``."""
        return cosine_ramp(self._updates, self.total_steps)

    @property
    def momentum(self) -> float:
        """The momentum of the next update."""
        return 1.0 - (1.0 - self.base_momentum) * self.ramp

    @property
    def progress(self) -> float:
        """Fraction of ``total_steps`` done (0 when there is no schedule)."""
        return min(self._updates / self.total_steps, 1.0) if self.total_steps else 0.0

    @torch.no_grad()
    def update_momentum(self, model: nn.Module) -> None:
        """Move the momentum encoder towards ``model`` (the first call copies it); buffers are copied.

        The momentum encoder's classifier follows ``mix_head`` when there is one.
        """
        online = unwrap_model(model)
        sources = dict(online.named_parameters())
        if self.mix_head is not None:
            sources.update((f'{self.classifier_name}.{n}', p) for n, p in self.mix_head.named_parameters())
        names = [n for n, _ in self.encoder.named_parameters()]
        if len(sources) != len(names) or any(n not in sources for n in names):
            raise ValueError(f'{type(online).__name__} does not match the momentum encoder '
                             f'({len(sources)} vs {len(names)} parameter tensors)')
        mine = list(self.encoder.parameters())
        theirs = [sources[n] for n in names]
        if self._updates == 0:
            for a, b in zip(mine, theirs):
                a.copy_(b)
        else:
            torch._foreach_lerp_(mine, theirs, 1.0 - self.momentum)
        for a, b in zip(self.encoder.buffers(), online.buffers()):
            a.copy_(b)
        self._updates += 1
        self.num_updates.fill_(self._updates)

    def forward(self, input: torch.Tensor, perm_mb: torch.Tensor, lam_mb: float, perm: torch.Tensor,
                lam: float) -> Dict[str, torch.Tensor]:
        """The Mix Block's two masks and its training signal.

        Returns 'mask_mb' (B, 1, H, W) for the pairing ``perm_mb`` and ``lam_mb``, with the
        gradient to the Mix Block; 'logits_mb', the momentum encoder's logits of the images
        mixed with it; and 'mask', the detached mask for the online encoder's pairing ``perm``
        and ``lam``.
        """
        with torch.no_grad():
            z = self.features(input)
        size = input.shape[-2:]
        mask_mb = self.mix_block(z, perm_mb, lam_mb, size)
        with torch.no_grad():
            mask = self.mix_block(z, perm, lam, size)
        logits_mb = self.encoder(mix_images(input, perm_mb, mask_mb))
        return {'mask_mb': mask_mb, 'logits_mb': logits_mb, 'mask': mask}


def _mirror_update_count(module: AutoMix, incompatible_keys) -> None:
    module._updates = int(module.num_updates)


def _momentum_copy(model: nn.Module) -> nn.Module:
    encoder = copy.deepcopy(model)
    hook = get_moex_hook(encoder)
    if hook is not None:  # the momentum encoder sees whole images: never moment-exchanged
        hook.remove()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


class AutoMixTask(ClassificationTask):
    """Classification with AutoMix (and, optionally, MoEx on the online encoder's stem).

    Each training batch: ``lam_mb, lam ~ Beta(alpha, alpha)`` and two pairings (the Mix
    Block's and the online encoder's); the momentum encoder is updated from the online one;
    then one forward of :class:`AutoMix` and one of the model, on the mixed images followed by
    the clean ones (one batch of 2B: one DDP forward; the released code runs two forwards,
    offered as ``two_forwards``). The loss is

        mixup_loss(mix_head(online(mixed)), y, perm, lam) + clean_weight * loss(online(x), y)
        + mixup_loss(momentum(mixed_mb), y, perm_mb, lam_mb) + w_area * mask_area_loss(M_mb, lam_mb)

    with ``mixup_loss(out, y, perm, lam) = lam * loss(out, y) + (1 - lam) * loss(out, y[perm])``,
    the mixed images' logits from :attr:`AutoMix.mix_head` and the clean ones' from the model's
    classifier (see :class:`AutoMix`), and ``w_area = area_weight``, times a cosine from 1 to 0
    over ``automix.total_steps`` when ``area_decay``. Only the Mix Block gets the last two
    terms' gradients.

    The single 2B forward differs from the released code's two forwards in the batch-norm
    statistics: the mixed and the clean images are normalized together, and the running
    statistics take one update per step instead of two.

    With MoEx (``moex`` given, drawn with probability ``moex.prob``): the mixed sample i
    takes the stem moments of the mixed sample ``perm[i]`` (the same pairing; the clean half is
    not exchanged), and its loss is ``moex_lam * mixup_loss(out, y, perm, lam) + (1 - moex_lam) *
    mixup_loss(out, y[perm], perm, lam)`` with ``moex_lam = moex.lam``: the MoEx loss with the
    donor's mixed label ``lam * y_perm[i] + (1 - lam) * y_perm[perm[i]]`` as the second target.

    The result dict holds 'loss', 'output' (the mixed images' logits), 'output_clean' (the
    clean images' logits, or None), 'automix', 'moex', 'lam', 'perm', 'lam_mb', 'perm_mb',
    'plain_mixup' (lam was within the margin), 'mask_area' (mean of the Mix Block's training
    mask), and the loss terms 'mix_loss', 'clean_loss', 'mix_block_loss' and 'area_loss'
    (detached).

    Args:
        model: The online encoder.
        automix: Its :class:`AutoMix` (possibly DDP-wrapped), built with defaults when None.
        alpha: Beta(alpha, alpha) of lam (the paper: 2).
        lam_margin: Plain Mixup for the online encoder when lam or 1 - lam is at most this.
        clean_weight: Weight of the loss on the clean images (0 skips them).
        area_weight, area_margin, area_decay: The mask-area loss (the released CIFAR configs:
            0.1, 0.1, no decay; the ImageNet ones decay the weight).
        pairing: 'random' (random permutations) or 'flip' (i with B-1-i), for the mixing and MoEx.
        moex: MoEx on the online encoder (its pairing must be ``pairing``), or None for no MoEx.
        two_forwards: Mixed and clean images in two forwards of the model, as the released
            code (single process only: DDP needs one forward per backward).
        criterion, criterion_kwargs, device, dtype, verbose: as ``timm.task.ClassificationTask``
            (targets are class indices).

    Raises:
        ValueError: An argument is out of range, or ``moex`` pairs the samples otherwise than ``pairing``.
        TypeError: ``automix`` or ``moex`` is of the wrong type.
    """

    def __init__(
            self,
            model: nn.Module,
            automix: Optional[nn.Module] = None,
            alpha: float = 2.0,
            lam_margin: float = 0.08,
            clean_weight: float = 1.0,
            area_weight: float = 0.1,
            area_margin: float = 0.1,
            area_decay: bool = True,
            pairing: str = 'random',
            moex: Optional[MoExMixing] = None,
            two_forwards: bool = False,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        alpha = check_beta_alpha(alpha, paper_value=2)
        lam_margin = check_unit_interval('lam_margin', lam_margin)
        if lam_margin >= 0.5:
            raise ValueError(f'lam_margin must be below 0.5 (else every batch is plain Mixup); got {lam_margin}')
        for name, value in (('clean_weight', clean_weight), ('area_weight', area_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f'{name} must be a finite number >= 0; got {value!r}')
        area_margin = check_unit_interval('area_margin', area_margin)
        check_choice('pairing', pairing, PAIRINGS)
        moex = check_moex_argument(type(self).__name__, moex, pairing)
        if automix is None:
            automix = AutoMix(model)
        elif not isinstance(unwrap_model(automix), AutoMix):
            raise TypeError(f'automix must be a timm_moex AutoMix (possibly DDP-wrapped); got {type(automix).__name__}')
        super().__init__(model, criterion=criterion, criterion_kwargs=criterion_kwargs,
                         device=device, dtype=dtype, verbose=verbose)
        self.automix = automix
        self.alpha = float(alpha)
        self.lam_margin = lam_margin
        self.clean_weight = float(clean_weight)
        self.area_weight = float(area_weight)
        self.area_margin = area_margin
        self.area_decay = bool(area_decay)
        self.pairing = pairing
        self.moex = moex
        self.two_forwards = bool(two_forwards)
        if self.verbose:
            with_moex = f', {moex}' if moex is not None else ''
            _logger.info(f'{type(self).__name__}: alpha={self.alpha}, feature layer '
                         f'{unwrap_model(automix).feature_layer!r}, pairing={pairing}{with_moex}')

    @property
    def hook(self) -> Optional[MoExHook]:
        """The model's MoEx hook, or None without MoEx."""
        return self.moex.hook if self.moex is not None else None

    def mixup_loss(self, output: torch.Tensor, target: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
        """``lam * loss(output, target) + (1 - lam) * loss(output, target[perm])``; lam comes from Beta, in [0, 1]."""
        return interpolated_loss(self.criterion, output, target, perm, lam)

    def _area_weight(self, automix: AutoMix) -> float:
        if not self.area_decay:
            return self.area_weight
        return self.area_weight * automix.ramp

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'AutoMixTask':
        """Wrap the model and the AutoMix module (the Mix Block's and the mixed-image head's gradients) in DDP.

        Args:
            device_ids: DDP's ``device_ids`` (None for a CPU module).
            **ddp_kwargs: The model's DDP arguments. The AutoMix module takes them too, except
                ``find_unused_parameters``, which is False there.
        """
        if self.two_forwards:
            raise ValueError('two_forwards runs the model twice per backward, which DDP does not support; '
                             'use the single forward (two_forwards=False) for distributed training')
        super().prepare_distributed(device_ids=device_ids, **ddp_kwargs)
        # Every AutoMix parameter takes a gradient each step, the mixed-image head's through the
        # model's forward: a search for unused parameters from AutoMix's own outputs would mark
        # that head unused, and DDP then fails when its gradient arrives.
        ddp_kwargs['find_unused_parameters'] = False
        self.automix = DDP(self.automix, device_ids=device_ids, **ddp_kwargs)
        return self

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The Mix Block, the momentum encoder and the update count (timm checkpoints' 'task_state')."""
        return {} if ema else {'automix': unwrap_model(self.automix).state_dict()}

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True, module: Optional[nn.Module] = None,
                        ema: bool = False) -> None:
        if ema or not state:
            return
        if 'automix' not in state:
            if strict:
                raise KeyError(f"task state has no 'automix' entry (keys: {sorted(state)})")
            return
        unwrap_model(self.automix).load_state_dict(state['automix'], strict=strict)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, Any]:
        if not self.get_trainable_module().training:
            output = self.trainable_module(input)
            return {'loss': self.criterion(output, target), 'output': output, 'automix': False, 'moex': False}
        batch_size = input.shape[0]
        lam_mb, lam = torch.distributions.Beta(self.alpha, self.alpha).sample((2,)).tolist()
        perm_mb, perm = (draw_pairing(self.pairing, batch_size, input.device) for _ in range(2))
        automix = unwrap_model(self.automix)
        automix.train()
        area_weight = self._area_weight(automix)
        automix.update_momentum(self.trainable_module)

        mixer = self.automix(input, perm_mb, lam_mb, perm, lam)
        mix_block_loss = self.mixup_loss(mixer['logits_mb'], target, perm_mb, lam_mb)
        area_loss = mask_area_loss(mixer['mask_mb'], lam_mb, self.area_margin)

        plain = min(lam, 1.0 - lam) <= self.lam_margin
        mixed = mix_images(input, perm, lam if plain else mixer['mask'])
        clean = self.clean_weight > 0
        moex = self.moex is not None and self.moex.fires(True)
        out_clean = None
        if self.two_forwards:
            if moex:
                self.moex.arm(perm)
            with automix.route_mixed(batch_size):
                out_mix = self.trainable_module(mixed)
            if clean:
                out_clean = self.trainable_module(input)
        else:
            if moex:  # the clean half keeps its own moments (the identity pairing)
                self.moex.arm(torch.cat([perm, torch.arange(batch_size, 2 * batch_size, device=perm.device)])
                              if clean else perm)
            with automix.route_mixed(batch_size):
                output = self.trainable_module(torch.cat([mixed, input]) if clean else mixed)
            out_mix = output[:batch_size]
            if clean:
                out_clean = output[batch_size:]

        if moex:
            mix_loss = self.moex.loss(lambda out, y: self.mixup_loss(out, y, perm, lam), out_mix, target, perm)
        else:
            mix_loss = self.mixup_loss(out_mix, target, perm, lam)
        loss = mix_loss + mix_block_loss + area_weight * area_loss
        clean_loss = None
        if clean:
            clean_loss = self.criterion(out_clean, target)
            loss = loss + self.clean_weight * clean_loss
        return {
            'loss': loss, 'output': out_mix, 'output_clean': out_clean, 'automix': True, 'moex': moex,
            'lam': lam, 'perm': perm, 'lam_mb': lam_mb, 'perm_mb': perm_mb,
            'plain_mixup': plain, 'mask_area': mixer['mask_mb'].detach().mean(),
            'mix_loss': mix_loss.detach(), 'clean_loss': clean_loss.detach() if clean_loss is not None else None,
            'mix_block_loss': mix_block_loss.detach(), 'area_loss': area_loss.detach(),
        }
