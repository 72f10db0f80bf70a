"""SnapMix, alone or with MoEx in the same step.

Huang, Wang, Tao, "SnapMix: Semantically Proportional Mixing for Augmenting Fine-grained
Data", AAAI 2021, as in the authors' released code. A box of the partner image ``x[perm[i]]``
is resized (bilinear, corners aligned) into a box of image i (the two boxes are drawn
independently, each like CutMix's with ``lam ~ Beta(alpha, alpha)``), and the labels are
weighted by *semantic* mass rather than area: with each image's class activation map (CAM,
made from the ReLU of the last feature maps) normalized to sum 1,

    w_a[i] = 1 - CAM_i mass inside box_a          (what is left of image i)
    w_b[i] = CAM_perm[i] mass inside box_b        (what was pasted of the partner)
    loss   = mean_i  w_a[i] * l(out_i, y_i) + w_b[i] * l(out_i, y_perm[i])

The weights need not sum to 1. Boxes are ``(top, bottom, left, right)`` half-open pixel
ranges: rows ``top:bottom``, columns ``left:right``.

Pairs with the same label: by default their weights add (``w_a + w_b`` on the one label);
the released code gives such a sample both weights ``w_a + w_b``, a total of
``2 * (w_a + w_b)`` (``same_label='double'`` of :class:`SnapMixTask`).
"""
import logging
import math
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from timm.layers import ClassifierHead, SelectAdaptivePool2d
from timm.task import ClassificationTask

from ..hooks.moex import MoExHook
from ..utils.checks import check_beta_alpha, check_choice, check_class_indices, check_unit_interval
from ..utils.model import unwrap_model
from ..utils.random import coin
from .moex_mixing import MoExMixing, check_moex_argument

__all__ = ['SnapMixTask', 'Box', 'random_box', 'snapmix_boxes', 'class_activation_maps', 'normalize_cams',
           'snapmix_weights', 'snapmix_paste', 'snapmix_moex_weights', 'same_label_weights', 'cam_classifier',
           'per_sample_loss', 'SAME_LABEL_MODES']

_logger = logging.getLogger(__name__)

Box = Tuple[int, int, int, int]
"""(top, bottom, left, right): rows top:bottom and columns left:right of an image."""

SAME_LABEL_MODES = ('add', 'double')
_AVG_POOL_TYPES = ('avg', 'fast', 'fastavg')
_ACCEPTED_HEADS = ('accepted: a CNN whose head is global average pooling followed by one nn.Linear classifier, with '
                   'forward_features giving (B, C, H, W) maps (e.g. ResNet, ResNeXt, DenseNet, EfficientNet, '
                   'RegNet, resnet18_cifar, PyramidNet)')


def _box_area(box: Box) -> int:
    top, bottom, left, right = box
    return max(bottom - top, 0) * max(right - left, 0)


def random_box(height: int, width: int, lam: float) -> Box:
    """A CutMix box centred uniformly and clipped to the image, as in SnapMix's code.

    Before clipping, its sides are ``2 * (cut // 2)`` for ``cut = int(side * sqrt(1 - lam))``
    (the centre plus and minus ``cut // 2``): even, so one pixel short of ``cut`` when it is odd.
    """
    cut = math.sqrt(1.0 - lam)
    half_h, half_w = int(height * cut) // 2, int(width * cut) // 2
    cy, cx = torch.randint(height, ()).item(), torch.randint(width, ()).item()
    return (min(max(cy - half_h, 0), height), min(max(cy + half_h, 0), height),
            min(max(cx - half_w, 0), width), min(max(cx + half_w, 0), width))


def snapmix_boxes(height: int, width: int, alpha: float = 5.0) -> Tuple[Box, Box]:
    """(box_a, box_b): where the paste goes in image i, and what is cut from its partner.

    Each is a :func:`random_box` with its own ``lam ~ Beta(alpha, alpha)`` (torch's RNG).

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        alpha: The Beta distribution's parameter (the paper's 5).

    Returns:
        ``(box_a, box_b)``, each ``(top, bottom, left, right)``.
    """
    beta = torch.distributions.Beta(float(alpha), float(alpha))
    return random_box(height, width, beta.sample().item()), random_box(height, width, beta.sample().item())


def normalize_cams(cams: torch.Tensor) -> torch.Tensor:
    """Maps (B, H, W) shifted to a minimum of 0 and scaled to sum 1 (float32 or float64).

    A constant map (an all-zero CAM, say) has no mass after the shift and becomes uniform,
    so that its box masses are area fractions.
    """
    cams = cams.to(torch.promote_types(cams.dtype, torch.float32))
    cams = cams - cams.amin((-2, -1), keepdim=True)
    total = cams.sum((-2, -1), keepdim=True)
    has_mass = total > 0
    uniform = torch.full_like(cams, 1.0 / (cams.shape[-2] * cams.shape[-1]))
    return torch.where(has_mass, cams / torch.where(has_mass, total, 1.0), uniform)


def class_activation_maps(
        features: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        size: Optional[Tuple[int, int]] = None,
        normalize: bool = True,
        relu: bool = True,
) -> torch.Tensor:
    """CAMs (B, H, W): ``sum_c weight[y, c] * relu(features[:, c])`` for each sample's class y.

    ``features`` (B, C, h, w) feed a global-average-pool + linear head with ``weight``
    (num_classes, C). With ``relu`` (SnapMix's code) the maps go through a ReLU first: a no-op
    for networks whose features end in a ReLU (ResNet, DenseNet), where a CAM's spatial mean is
    then the class logit minus its bias; for others (EfficientNet's SiLU) it drops the negative
    evidence. ``target`` holds class indices (B,) or class probabilities (B, num_classes), which
    weight the classes' maps. The maps are upsampled bilinearly (corners not aligned) to
    ``size`` and, with ``normalize``, passed through :func:`normalize_cams` (the bias, a
    constant, cancels there).
    """
    if features.dim() != 4:
        raise ValueError(f'features must be (B, C, H, W) maps; got shape {tuple(features.shape)}')
    if weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(f'weight must be (num_classes, {features.shape[1]}) for features of shape '
                         f'{tuple(features.shape)}; got {tuple(weight.shape)}')
    dtype = torch.promote_types(features.dtype, torch.float32)
    if relu:
        features = F.relu(features)
    weight = weight.to(dtype)
    if target.is_floating_point():
        class_weight = target.to(dtype) @ weight
    else:
        check_class_indices(target, weight.shape[0], 'the classifier')
        class_weight = weight[target]
    cams = torch.einsum('bchw,bc->bhw', features.to(dtype), class_weight)
    if size is not None and tuple(cams.shape[-2:]) != tuple(size):
        cams = F.interpolate(cams.unsqueeze(1), size=tuple(size), mode='bilinear', align_corners=False).squeeze(1)
    return normalize_cams(cams) if normalize else cams


def snapmix_weights(
        cam_a: torch.Tensor,
        cam_b: torch.Tensor,
        box_a: Box,
        box_b: Box,
        normalize: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The label weights (w_a, w_b) of SnapMix.

    When either box is empty nothing is pasted: w_a = 1, w_b = 0.

    Args:
        cam_a: The CAMs (B, H, W) of the images receiving the paste in ``box_a``.
        cam_b: Those of their partners (``cams[perm]``), cut at ``box_b``.
        box_a: Where the paste goes, in the maps' pixels.
        box_b: What is cut from the partner, in the maps' pixels.
        normalize: Pass the maps through :func:`normalize_cams` first, so raw maps work too;
            without, they must already be normalized.

    Returns:
        ``(w_a, w_b)``, each of shape (B,), in [0, 1]: the weight of image i's label (what is
        left of it) and of its partner's (what was pasted of it).
    """
    if cam_a.shape != cam_b.shape or cam_a.dim() != 3:
        raise ValueError(f'cam_a and cam_b must both be (B, H, W); got {tuple(cam_a.shape)} and {tuple(cam_b.shape)}')
    batch = cam_a.shape[0]
    if _box_area(box_a) == 0 or _box_area(box_b) == 0:
        dtype = torch.promote_types(cam_a.dtype, torch.float32)
        return (torch.ones(batch, dtype=dtype, device=cam_a.device),
                torch.zeros(batch, dtype=dtype, device=cam_a.device))
    (ta, ba, la, ra), (tb, bb, lb, rb) = box_a, box_b
    if normalize:
        cam_a, cam_b = normalize_cams(cam_a), normalize_cams(cam_b)
    w_a = 1.0 - cam_a[:, ta:ba, la:ra].sum((-2, -1))
    w_b = cam_b[:, tb:bb, lb:rb].sum((-2, -1))
    return w_a.clamp(0.0, 1.0), w_b.clamp(0.0, 1.0)


def snapmix_paste(x: torch.Tensor, perm: torch.Tensor, box_a: Box, box_b: Box) -> torch.Tensor:
    """A copy of images ``x`` (B, C, H, W) whose ``box_a`` holds ``x[perm]``'s ``box_b``, resized.

    Bilinear resizing with the corners aligned (SnapMix's code); an exact copy when the boxes
    have the same size; ``x`` itself (copied) when either box is empty.
    """
    out = x.clone()
    if _box_area(box_a) == 0 or _box_area(box_b) == 0:
        return out
    (ta, ba, la, ra), (tb, bb, lb, rb) = box_a, box_b
    patch = x[:, :, tb:bb, lb:rb][perm]
    if (bb - tb, rb - lb) != (ba - ta, ra - la):
        patch = F.interpolate(patch, size=(ba - ta, ra - la), mode='bilinear', align_corners=True)
    out[:, :, ta:ba, la:ra] = patch.to(out.dtype)
    return out


def same_label_weights(w_a: torch.Tensor, w_b: torch.Tensor, same: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """SnapMix's code for pairs with the same label: both weights become ``w_a + w_b`` where ``same``.

    The loss ``w_a * l(y) + w_b * l(y_perm)`` of such a sample is then ``2 * (w_a + w_b) * l(y)``;
    other samples keep their weights.
    """
    total = w_a + w_b
    return torch.where(same, total, w_a), torch.where(same, total, w_b)


def snapmix_moex_weights(
        w_a: torch.Tensor,
        w_b: torch.Tensor,
        perm: torch.Tensor,
        moex_lam: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights (c1, c2, c3) of the labels ``y``, ``y[perm]``, ``y[perm][perm]`` of SnapMix + MoEx.

    SnapMix along ``perm`` makes image i carry ``w_a[i] * y_i + w_b[i] * y_perm(i)``. MoEx
    along the same ``perm`` then gives sample i's features its own normalized content and the
    moments of sample perm(i), and MoEx weighs the two samples' targets by ``moex_lam`` and
    ``1 - moex_lam``; perm(i)'s target is, after SnapMix, ``w_a[perm(i)] * y_perm(i) +
    w_b[perm(i)] * y_perm(perm(i))``. Collecting terms::

        c1 = moex_lam * w_a
        c2 = moex_lam * w_b + (1 - moex_lam) * w_a[perm]
        c3 = (1 - moex_lam) * w_b[perm]

    With constant weights (w_a = cutmix_lam, w_b = 1 - cutmix_lam) these are the three terms
    of the official CutMix + MoEx loss; with ``moex_lam = 1`` (no MoEx) they are SnapMix's
    (w_a, w_b, 0).
    """
    if not 0.0 <= moex_lam <= 1.0:
        raise ValueError(f'moex_lam must be in [0, 1]; got {moex_lam}')
    c1 = moex_lam * w_a
    c2 = moex_lam * w_b + (1.0 - moex_lam) * w_a[perm]
    c3 = (1.0 - moex_lam) * w_b[perm]
    return c1, c2, c3


def per_sample_loss(criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``criterion`` on each sample alone, shape (B,), for a criterion that averages over the batch.

    Vectorized with ``torch.func.vmap`` (timm's cross-entropy losses, ``nn.CrossEntropyLoss``,
    the bi-tempered loss); one call per sample for criteria that vmap cannot batch.
    """
    def one(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return criterion(o.unsqueeze(0), t.unsqueeze(0))

    try:
        return torch.func.vmap(one)(output, target)
    except RuntimeError:  # an op without a batching rule, or data-dependent control flow
        return torch.stack([one(o, t) for o, t in zip(output, target)])


def _head_error(model_name: str, reason: str) -> str:
    return f'SnapMix cannot make class activation maps for {model_name}: {reason}; {_ACCEPTED_HEADS}'


def _is_avg_pool(pool: Any) -> bool:
    if isinstance(pool, SelectAdaptivePool2d):
        return pool.pool_type in _AVG_POOL_TYPES
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        return pool.output_size in (1, (1, 1))
    return False


def cam_classifier(model: nn.Module) -> nn.Linear:
    """The linear classifier that makes ``model``'s CAMs; ValueError for other heads.

    Accepted: ``model.global_pool`` (or ``model.head.global_pool`` of a timm
    ``ClassifierHead``) is global average pooling, ``model.get_classifier()`` is an
    ``nn.Linear`` taking ``model.num_features`` inputs (so nothing else sits between the pooling
    and the classifier), and ``forward_features`` gives NCHW maps.
    """
    model = unwrap_model(model)
    name = type(model).__name__
    if not callable(getattr(model, 'forward_features', None)) or not callable(getattr(model, 'get_classifier', None)):
        raise ValueError(_head_error(name, 'it has no forward_features / get_classifier'))
    pool = getattr(model, 'global_pool', None)
    head = getattr(model, 'head', None)
    if pool is None and isinstance(head, ClassifierHead):
        pool = head.global_pool
    if not _is_avg_pool(pool):
        where = f'global_pool={pool!r}' if pool is not None else 'no global_pool module'
        raise ValueError(_head_error(name, f'its head is {type(head).__name__ if head is not None else "absent"} with '
                                           f'{where}, not global average pooling'))
    if getattr(model, 'output_fmt', 'NCHW') != 'NCHW':
        raise ValueError(_head_error(name, f'its features are {model.output_fmt}'))
    fc = model.get_classifier()
    if not isinstance(fc, nn.Linear):
        raise ValueError(_head_error(name, f'its classifier is {type(fc).__name__}, not nn.Linear'))
    num_features = getattr(model, 'num_features', fc.in_features)
    if fc.in_features != num_features:
        raise ValueError(_head_error(name, f'layers sit between its {num_features} pooled features and its '
                                           f'{fc.in_features}-input classifier'))
    return fc


class SnapMixTask(ClassificationTask):
    """Classification with SnapMix, optionally with MoEx in the same step.

    Per training batch, with probability ``prob``: draw ``perm`` (random pairing), compute CAMs
    of the *original* images with one ``torch.no_grad`` ``forward_features`` pass (no second
    backbone pass with gradients; batch-norm layers use batch statistics in it without
    updating their running statistics), paste, and weight the labels by CAM mass (module
    docstring). The loss is ``mean_i sum_k c_k[i] * criterion(out_i, target_k[i])`` with
    per-sample criterion values (:func:`per_sample_loss`): the criterion must average over the
    batch, as timm's do.

    With ``moex`` (a :class:`~timm_moex.MoExMixing` of the model's hook, e.g. the paper's CutMix +
    MoEx recipe ``MoExMixing(get_moex_hook(model), **MOEX_RECIPES['imagenet_cutmix'])``, prob 0.25
    and lam 0.9; below ``moex_lam`` is its
    ``lam``), MoEx fires per batch with probability ``moex.prob``, independently of SnapMix;
    both pair the samples at random, and when both fire they use the SAME ``perm``. The label
    weights are then those of :func:`snapmix_moex_weights`:

        c1 = moex_lam * w_a                              on y
        c2 = moex_lam * w_b + (1 - moex_lam) * w_a[perm]  on y[perm]
        c3 = (1 - moex_lam) * w_b[perm]                   on y[perm][perm]

    Why: after SnapMix, image i's content is ``w_a[i]`` parts y_i and ``w_b[i]`` parts
    y_perm(i). MoEx keeps sample i's normalized content (weight ``moex_lam``, the paper's
    target_a) and gives it the moments of sample perm(i) (weight ``1 - moex_lam``, target_b);
    that donor is itself a SnapMix image, so its target is its own SnapMix mixture. This is
    the official CutMix + MoEx loss with CutMix's area ratio replaced by SnapMix's semantic
    weights. MoEx alone (SnapMix not drawn) gives the plain MoEx loss
    ``moex_lam * l(y) + (1 - moex_lam) * l(y[perm])``.

    Pairs with equal labels: by default (``same_label='add'``) the weights of equal labels
    simply add, so that a sample's total label weight is ``w_a + w_b`` whatever its partner's
    class. SnapMix's code (``same_label='double'``, :func:`same_label_weights`) gives both
    weights ``w_a + w_b``, doubling the loss weight of such samples (about one in ten on a
    balanced 10-class batch); under MoEx the doubled weights enter :func:`snapmix_moex_weights`.

    The CAM pass calls ``forward_features`` of the unwrapped model (no DDP, compile or
    Accelerate forward wrapper): under Accelerate's mixed precision, call the task inside
    ``accelerator.autocast()`` for a reduced-precision CAM pass. Under SyncBatchNorm, all
    processes must draw the same SnapMix coin (seed them alike), since the CAM pass runs the
    normalization's collectives.

    The result dict holds 'loss', 'output', 'snapmix' and 'moex' (whether each was applied),
    and when either was, 'perm' (sample i's partner and moment donor is perm[i]); with SnapMix
    also 'weights' (w_a, w_b) and 'boxes' (box_a, box_b).

    Args:
        model: A CNN with a global-average-pool + linear head (:func:`cam_classifier`).
        alpha: Beta(alpha, alpha) of each box's lam (the paper's 5).
        prob: Probability that a batch is SnapMixed (decided per batch and process).
        moex: MoEx in the same step (its pairing must be 'random'), or None for SnapMix alone.
            ``MoExMixing``'s defaults are the paper's CIFAR recipe (lam 0.5); its CutMix + MoEx
            recipe uses lam 0.9 (``MOEX_RECIPES``).
        same_label: 'add' or 'double' (SnapMix's code): the weights of a pair with equal labels.
        cam_relu: ReLU on the features before the CAMs (SnapMix's code; see
            :func:`class_activation_maps`).
        criterion, criterion_kwargs, device, dtype, verbose: as ``timm.task.ClassificationTask``.
            Targets are class indices or soft targets (``timm.data.Mixup``); soft targets are
            permuted row-wise and weight the classes' CAMs.

    Raises:
        ValueError: An argument is out of range, the model's head gives no class activation
            maps, or ``moex`` pairs the samples otherwise than at random.
        TypeError: ``moex`` is not a ``MoExMixing``.
    """

    def __init__(
            self,
            model: nn.Module,
            alpha: float = 5.0,
            prob: float = 1.0,
            moex: Optional[MoExMixing] = None,
            same_label: str = 'add',
            cam_relu: bool = True,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        alpha = check_beta_alpha(alpha, paper_value=5)
        prob = check_unit_interval('prob', prob)
        moex = check_moex_argument(type(self).__name__, moex, 'random')
        check_choice('same_label', same_label, SAME_LABEL_MODES)
        cam_classifier(model)
        super().__init__(model, criterion=criterion, criterion_kwargs=criterion_kwargs,
                         device=device, dtype=dtype, verbose=verbose)
        self.alpha = float(alpha)
        self.prob = prob
        self.moex = moex
        self.same_label = same_label
        self.cam_relu = bool(cam_relu)
        if self.verbose:
            with_moex = f', {moex}' if moex is not None else ''
            _logger.info(f'{type(self).__name__}: alpha={self.alpha}, prob={self.prob}{with_moex}')

    @property
    def hook(self) -> Optional[MoExHook]:
        """The model's MoEx hook, or None without MoEx."""
        return self.moex.hook if self.moex is not None else None

    @torch.no_grad()
    def class_activation_maps(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Normalized CAMs (B, H, W) of ``input`` at its resolution, from a no-grad features pass."""
        model = unwrap_model(self.trainable_module)
        fc = cam_classifier(model)
        # Batch statistics as in the training forward, but the running statistics are left to
        # it: a BN layer in training mode that does not track them neither reads nor updates them.
        tracking = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        for m in tracking:
            m.track_running_stats = False
        try:
            features = model.forward_features(input)
        finally:
            for m in tracking:
                m.track_running_stats = True
        if features.dim() != 4 or features.shape[1] != fc.in_features:
            raise ValueError(_head_error(type(model).__name__, f'forward_features gave shape {tuple(features.shape)} '
                                                                 f'for a {fc.in_features}-input classifier'))
        return class_activation_maps(features, fc.weight, target, size=input.shape[-2:], relu=self.cam_relu)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, Any]:
        training = self.get_trainable_module().training
        snapmix = training and coin(self.prob)
        moex = self.moex is not None and self.moex.fires(training)
        if not (snapmix or moex):
            output = self.trainable_module(input)
            return {'loss': self.criterion(output, target), 'output': output, 'snapmix': False, 'moex': False}

        perm = torch.randperm(input.shape[0], device=input.device)
        result: Dict[str, Any] = {'snapmix': snapmix, 'moex': moex, 'perm': perm}
        if snapmix:
            cams = self.class_activation_maps(input, target)
            box_a, box_b = snapmix_boxes(input.shape[-2], input.shape[-1], self.alpha)
            w_a, w_b = snapmix_weights(cams, cams[perm], box_a, box_b, normalize=False)
            if self.same_label == 'double':
                same = target == target[perm]
                w_a, w_b = same_label_weights(w_a, w_b, same.all(1) if same.dim() > 1 else same)
            input = snapmix_paste(input, perm, box_a, box_b)
            result.update(weights=(w_a, w_b), boxes=(box_a, box_b))
        if moex:
            self.moex.arm(perm)
        output = self.trainable_module(input)

        if not snapmix:
            loss = self.moex.loss(self.criterion, output, target, perm)
        else:
            moex_lam = self.moex.lam if moex else 1.0
            c1, c2, c3 = snapmix_moex_weights(w_a, w_b, perm, moex_lam)
            target_b = target[perm]
            per_sample = c1 * per_sample_loss(self.criterion, output, target)
            per_sample = per_sample + c2 * per_sample_loss(self.criterion, output, target_b)
            if moex_lam < 1.0:
                per_sample = per_sample + c3 * per_sample_loss(self.criterion, output, target_b[perm])
            loss = per_sample.mean()
        result.update(loss=loss, output=output)
        return result
