"""Feature moments, and the operations that replace them: exchange, mix and perturb.

Each sample's features are normalized by their own moments (mean and standard deviation over
the dimensions that the normalization names) and de-normalized with new moments::

    out = (x - mean) / std * new_std + new_mean

computed as one affine ``x * scale + shift`` with statistics in float32 (float64 stays
float64), under autocast too, with a hand-written backward. The new moments are

- 'exchange', MoEx (Li et al., "On Feature Normalization and Data Augmentation", CVPR 2021):
  the donor's, ``mean[perm]`` and ``std[perm]`` (``timm_moex.moment_exchange``);
- 'mix', MixStyle (Zhou et al., "Domain Generalization with MixStyle", ICLR 2021):
  ``w * mean + (1 - w) * mean[perm]`` and ``w * std + (1 - w) * std[perm]`` (:func:`mix_moments`);
- 'perturb', DSU (Li et al., "Uncertainty Modeling for Out-of-Distribution Generalization",
  ICLR 2022): ``mean + noise * std_batch(mean)`` and ``std + noise' * std_batch(std)``, where
  ``std_batch`` is the standard deviation over the batch of each statistic (:func:`perturb_moments`).
"""
import re
from typing import List, Optional, Sequence, Tuple

import torch

from ..utils.amp import autocast_off
from ..utils.checks import check_eps, check_perm

__all__ = [
    'mix_moments', 'perturb_moments', 'moment_shape', 'replace_moments', 'moment_view', 'parse_norm',
    'MOEX_NORMS',
]

MOEX_NORMS = ('pono', 'in', 'ln', 'gnG', 'gn-dD', 'gponoG')
"""Normalizations whose moments the operations replace; G and D stand for positive integers."""

_GROUP_NORM = re.compile(r'^(gn|gpono)(\d+)$')
_GROUP_SIZE_NORM = re.compile(r'^gn-d(\d+)$')
_KINDS = ('exchange', 'mix', 'perturb')


def parse_norm(norm: str) -> Tuple[str, int, int]:
    """Split a normalization name into (kind, groups, group_size).

    Args:
        norm: One of ``MOEX_NORMS``, e.g. 'pono', 'in', 'gn4', 'gn-d16', 'gpono2'.

    Returns:
        (kind, groups, group_size): kind is one of 'pono', 'in', 'ln', 'gn', 'gpono'; ``groups``
        (G) or ``group_size`` (D) is set for the grouped kinds and 0 otherwise.

    Raises:
        ValueError: ``norm`` is not a valid normalization ('bn' is refused with the reason).
    """
    if norm in ('pono', 'in', 'ln'):
        return norm, 0, 0
    if norm == 'bn':
        raise ValueError(
            "norm='bn' is not supported: batch-norm statistics are shared by every sample of the "
            "batch, so exchanging them between samples would change nothing. "
            f"Use one of {', '.join(MOEX_NORMS)} (PONO, 'pono', is the paper's default).")
    m = _GROUP_NORM.match(norm)
    if m and int(m.group(2)) > 0:
        return m.group(1), int(m.group(2)), 0
    m = _GROUP_SIZE_NORM.match(norm)
    if m and int(m.group(1)) > 0:
        return 'gn', 0, int(m.group(1))
    raise ValueError(
        f'Unknown MoEx norm {norm!r}; valid norms are {", ".join(MOEX_NORMS)} '
        '(G groups, or groups of D channels, as positive integers, e.g. gn4, gn-d16, gpono2).')


def _grouped_view(x: torch.Tensor, norm: str, channel_dim: int,
                  spec: Tuple[str, int, int]) -> Tuple[torch.Tensor, List[int]]:
    """View x so that the statistics of ``norm`` (parsed: ``spec``) reduce over the returned dims."""
    kind, groups, group_size = spec
    other = [d for d in range(1, x.dim()) if d != channel_dim]
    if kind == 'pono':
        return x, [channel_dim]
    if kind == 'in':
        if not other:
            raise ValueError(f"norm='in' needs dimensions besides batch and channels; got shape {tuple(x.shape)}")
        return x, other
    if kind == 'ln':
        return x, list(range(1, x.dim()))

    num_channels = x.shape[channel_dim]
    if group_size:
        if num_channels % group_size:
            raise ValueError(
                f'norm={norm!r} needs the channel count to be a multiple of {group_size}; got {num_channels} channels')
        groups = num_channels // group_size
    elif num_channels % groups:
        raise ValueError(
            f'norm={norm!r} needs the channel count to be a multiple of {groups}; got {num_channels} channels')
    # Splitting one dimension in two is always a view, whatever the memory format.
    shape = list(x.shape)
    shape[channel_dim:channel_dim + 1] = [groups, num_channels // groups]
    xg = x.view(shape)
    in_group = channel_dim + 1
    if kind == 'gpono':
        return xg, [in_group]
    return xg, [in_group] + [d + 1 if d > channel_dim else d for d in other]


def moment_view(x: torch.Tensor, norm: str, channel_dim: int, op: str,
                spec: Optional[Tuple[str, int, int]] = None) -> Tuple[torch.Tensor, List[int], int]:
    """Check x for an operation on its moments and view it so that the moments reduce over dims.

    Args:
        x: Features with the batch first (see :func:`mix_moments`).
        norm: Which moments (``MOEX_NORMS``).
        channel_dim: The channel dimension, negative or not.
        op: The operation's name, for the error messages.
        spec: ``parse_norm(norm)``, from a caller that parsed ``norm`` once (a hook, in its
            constructor); None parses it here.

    Returns:
        (xg, dims, channel_dim): a view of x (with the channels split into groups for the
        grouped norms), the dims of xg that one mean and std reduce over, and ``channel_dim``
        as a non-negative index of x.

    Raises:
        TypeError: x is not floating-point.
        ValueError: x has no batch, ``channel_dim`` is not a channel dimension, ``norm`` is
            unknown or does not fit x, or a statistic would reduce over fewer than 2 elements.
    """
    if x.dim() < 2:
        raise ValueError(f'{op} needs a batched tensor of rank >= 2; got shape {tuple(x.shape)}')
    if not x.is_floating_point():
        raise TypeError(f'{op} needs floating-point features; got {x.dtype}')
    if not -x.dim() <= channel_dim < x.dim() or channel_dim % x.dim() == 0:
        raise ValueError(
            f'channel_dim={channel_dim} is not a channel dimension of a tensor of shape {tuple(x.shape)}; '
            'use 1 (NCHW, the default) or -1 (NHWC and tokens)')
    channel_dim %= x.dim()
    xg, dims = _grouped_view(x, norm, channel_dim, parse_norm(norm) if spec is None else spec)
    count = _reduced_count(xg, dims)
    if count < 2:
        raise ValueError(
            f'norm={norm!r} reduces over {count} element per sample for shape {tuple(x.shape)}: '
            'an unbiased variance needs at least 2')
    return xg, dims, channel_dim


def _reduced_count(xg: torch.Tensor, dims: Sequence[int]) -> int:
    """How many elements each mean and std reduces over (from the shape, so also for an empty batch)."""
    # A plain loop: torch.compile cannot trace math.prod over a generator of sizes.
    count = 1
    for d in dims:
        count *= xg.shape[d]
    return count


def _stat_shape(xg: torch.Tensor, dims: Sequence[int]) -> List[int]:
    return [1 if d in dims else size for d, size in enumerate(xg.shape)]


def moment_shape(x: torch.Tensor, norm: str = 'in', channel_dim: int = 1) -> Tuple[int, int]:
    """How many moments of each kind (means, or standard deviations) x has per sample.

    Args:
        x: Features with the batch first (see :func:`mix_moments`).
        norm: Which moments (``MOEX_NORMS``).
        channel_dim: The channel dimension: 1 for NCHW, -1 for NHWC and tokens.

    Returns:
        (B, K): K is C for 'in', H * W for 'pono', G for 'gnG', 1 for 'ln'. This is the shape
        of the noise that :func:`perturb_moments` takes.
    """
    xg, dims, _ = moment_view(x, norm, channel_dim, 'moment_shape')
    stats = 1
    for size in _stat_shape(xg, dims)[1:]:
        stats *= size
    return x.shape[0], stats


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def replace_moments(
        x: torch.Tensor,
        xg: torch.Tensor,
        dims: Sequence[int],
        eps: float,
        kind: str,
        params: Tuple[torch.Tensor, ...],
        norm_grad: bool = True,
        moment_grad: bool = True,
) -> torch.Tensor:
    """``(x - mean) / std * new_std + new_mean`` with the new moments of ``kind``.

    The common step of ``moment_exchange``, :func:`mix_moments` and :func:`perturb_moments`,
    which check their arguments and call it.

    Args:
        x: The features.
        xg: x as :func:`moment_view` views it.
        dims: The dims of xg that one mean and std reduce over.
        eps: Added to the unbiased variance inside the square root (for 'perturb', also to
            the variance over the batch).
        kind: 'exchange' (params: perm), 'mix' (params: perm, weight of shape (B,)) or
            'perturb' (params: noise of the means, noise of the standard deviations, each
            with B * K elements as :func:`moment_shape` gives).
        params: The tensors of ``kind``.
        norm_grad: Let gradients flow through the sample's own mean and std in ``x - mean``
            and ``/ std``.
        moment_grad: Let gradients flow through the new moments into the statistics they
            are made of.

    Returns:
        A tensor of x's shape, dtype and memory format.
    """
    if kind not in _KINDS:
        raise ValueError(f'kind must be one of {_KINDS}; got {kind!r}')
    stat_dtype = torch.promote_types(x.dtype, torch.float32)
    shape = _stat_shape(xg, dims)
    if kind in ('exchange', 'mix'):
        # donors counted from the end (-1 is sample B-1) as indexing counts them; the backward's index_add_ does not
        perm = params[0].remainder(xg.shape[0]) if xg.shape[0] else params[0]
        params = (perm, *params[1:])
    if kind == 'mix':
        perm, weight = params
        params = (perm, weight.to(xg.device, stat_dtype).reshape([-1] + [1] * (xg.dim() - 1)))
    elif kind == 'perturb':
        params = tuple(noise.to(xg.device, stat_dtype).reshape(shape) for noise in params)
    out = _ReplaceMoments.apply(xg, tuple(dims), float(eps), kind, bool(norm_grad), bool(moment_grad), *params)
    # Grouped statistics can lead the broadcast to pick another layout; give back x's own.
    return out.reshape(x.shape).contiguous(memory_format=_memory_format(x))


def _batch_std(stat: torch.Tensor, eps: float) -> torch.Tensor:
    """DSU's uncertainty of a statistic: its standard deviation over the batch."""
    return (stat.var(0, correction=1, keepdim=True) + eps).sqrt()


def _new_moments(kind: str, mean: torch.Tensor, std: torch.Tensor, params: Tuple[torch.Tensor, ...],
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    if kind == 'exchange':
        (perm,) = params
        return mean[perm], std[perm]
    if kind == 'mix':
        perm, weight = params
        return torch.lerp(mean[perm], mean, weight), torch.lerp(std[perm], std, weight)
    noise_mean, noise_std = params
    return mean + noise_mean * _batch_std(mean, eps), std + noise_std * _batch_std(std, eps)


def _new_moments_vjp(kind: str, mean: torch.Tensor, std: torch.Tensor, params: Tuple[torch.Tensor, ...], eps: float,
                     grad_mean: torch.Tensor, grad_std: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The gradients into (mean, std) of the gradients of (new_mean, new_std)."""
    if kind == 'exchange':
        (perm,) = params
        return (torch.zeros_like(grad_mean).index_add_(0, perm, grad_mean),
                torch.zeros_like(grad_std).index_add_(0, perm, grad_std))
    if kind == 'mix':
        perm, weight = params
        return tuple(weight * g + torch.zeros_like(g).index_add_(0, perm, (1 - weight) * g)
                     for g in (grad_mean, grad_std))
    # d/ds_j of s_i + n_i * sqrt(var_batch(s) + eps) is [i == j] + n_i * (s_j - mean_batch(s)) / ((B - 1) * sqrt(...))
    batch = mean.shape[0]
    return tuple(g + (g * noise).sum(0, keepdim=True) * (stat - stat.mean(0, keepdim=True)) / (
        (batch - 1) * _batch_std(stat, eps)) for g, stat, noise in zip((grad_mean, grad_std), (mean, std), params))


class _ReplaceMoments(torch.autograd.Function):
    """``(x - mean) / std * new_std + new_mean`` with a hand-written backward.

    Autograd through the composed ops would keep float32 copies of x and run a dozen passes
    over them; here the forward reads x twice (statistics, then one affine that writes x's
    dtype) and the backward a few times (two sums, two fused multiply-adds), and nothing of x's
    size is saved but x itself.

    With n = (x - mean) / std over the N elements of a group, the new moments (m', s') and g the
    incoming gradient, the gradient is ``g * a + x * b + c``, where, per group,

        a = s' / s
        b = (G_s - s' * sum(g n) / s) / ((N - 1) * s)
        c = G_m / N - s' * sum(g) / (N * s) - mean * b

    and G_m, G_s are the gradients of the group's mean and std through the new moments: the
    vector-Jacobian product of (m', s') as functions of all (mean, std) with sum(g) and sum(g n)
    (zero without ``moment_grad``). Without ``norm_grad`` the terms in s' / s of b and c drop;
    without both, the statistics are constants and the gradient is ``g * a``.
    """

    @staticmethod
    def forward(ctx, xg: torch.Tensor, dims: Tuple[int, ...], eps: float, kind: str, norm_grad: bool,
                moment_grad: bool, *params: torch.Tensor):
        with autocast_off(xg.device.type):
            var, mean = torch.var_mean(xg.to(torch.promote_types(xg.dtype, torch.float32)), dim=dims, correction=1,
                                       keepdim=True)
            std = (var + eps).sqrt()
            new_mean, new_std = _new_moments(kind, mean, std, params, eps)
            scale = new_std / std
            # Mixed dtypes: computed in float32, written in x's dtype, in one pass.
            out = torch.addcmul(new_mean - mean * scale, xg, scale, out=torch.empty_like(xg))
        ctx.save_for_backward(xg, mean, std, *params)
        ctx.dims, ctx.eps, ctx.kind, ctx.count = dims, eps, kind, _reduced_count(xg, dims)
        ctx.norm_grad, ctx.moment_grad = norm_grad, moment_grad
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xg, mean, std, *params = ctx.saved_tensors
        dims, count, kind, eps = ctx.dims, ctx.count, ctx.kind, ctx.eps
        nones = (None,) * (5 + len(params))
        with autocast_off(xg.device.type):
            new_std = _new_moments(kind, mean, std, params, eps)[1]
            if not (ctx.norm_grad or ctx.moment_grad):
                return (torch.mul(grad, new_std / std, out=torch.empty_like(xg)),) + nones
            xs = xg.to(mean.dtype)
            g_sum = grad.sum(dims, keepdim=True, dtype=mean.dtype)
            gn_sum = ((grad * xs).sum(dims, keepdim=True, dtype=mean.dtype) - mean * g_sum) / std
            b = c = 0
            if ctx.norm_grad:
                b = -new_std * gn_sum / std
                c = -new_std * g_sum / (count * std)
            if ctx.moment_grad:
                d_mean, d_std = _new_moments_vjp(kind, mean, std, params, eps, g_sum, gn_sum)
                b = b + d_std
                c = c + d_mean / count
            b = b / ((count - 1) * std)
            c = c - mean * b
            dx = torch.addcmul(torch.addcmul(c, xs, b), grad, new_std / std, out=torch.empty_like(xg))
        return (dx,) + nones


def mix_moments(
        x: torch.Tensor,
        perm: torch.Tensor,
        weight: torch.Tensor,
        norm: str = 'in',
        eps: float = 1e-6,
        channel_dim: int = 1,
        detach: bool = True,
) -> torch.Tensor:
    """MixStyle: give every sample ``i`` a mix of its own moments and those of sample ``perm[i]``.

    Zhou et al., "Domain Generalization with MixStyle", ICLR 2021::

        mean_mix = w * mean + (1 - w) * mean[perm],  std_mix = w * std + (1 - w) * std[perm]
        out = (x - mean) / std * std_mix + mean_mix

    ``w = 0`` is ``moment_exchange(x, perm, norm, eps)`` (same moments; note its default eps
    is MoEx's 1e-5, this one MixStyle's 1e-6) and ``w = 1`` returns x. The defaults are the
    authors' code: instance-norm moments, eps 1e-6 added to the unbiased variance, statistics
    detached.

    Args:
        x: Features with the batch first: (B, C, H, W) (contiguous or channels_last),
            (B, H, W, C) or tokens (B, N, C) with ``channel_dim=-1``, or any (B, C, ...).
        perm: Integer tensor of shape (B,) on x's device or the CPU; ``perm[i]`` is the sample
            whose moments are mixed in.
        weight: Floating tensor of shape (B,): ``w`` of each sample (MixStyle draws it from
            Beta(alpha, alpha)).
        norm: Which moments (``MOEX_NORMS``); 'in' (per channel over positions) is MixStyle's.
        eps: Added to the unbiased variance inside the square root.
        channel_dim: The channel dimension: 1 for NCHW, -1 for NHWC and tokens.
        detach: Treat the statistics as constants, as the authors' code does: the gradient is
            then ``g * std_mix / std``. False lets gradients flow through every sample's mean
            and std (own and mixed-in).

    Returns:
        A tensor of x's shape, dtype and memory format.
    """
    xg, dims, _ = moment_view(x, norm, channel_dim, 'mix_moments')
    check_perm(perm, x.shape[0], x.device)
    check_eps(eps)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.shape != (x.shape[0],):
        raise ValueError(
            f'weight must be a floating tensor of shape ({x.shape[0]},), one per sample; got {weight!r:.80}')
    return replace_moments(x, xg, dims, eps, 'mix', (perm.to(x.device), weight), not detach, not detach)


def perturb_moments(
        x: torch.Tensor,
        noise_mean: torch.Tensor,
        noise_std: torch.Tensor,
        norm: str = 'in',
        eps: float = 1e-6,
        channel_dim: int = 1,
        detach: bool = False,
) -> torch.Tensor:
    """DSU: shift every moment by noise scaled with that moment's spread over the batch.

    Li et al., "Uncertainty Modeling for Out-of-Distribution Generalization", ICLR 2022::

        mean' = mean + noise_mean * sqrt(var_batch(mean) + eps)
        std'  = std  + noise_std  * sqrt(var_batch(std) + eps)
        out = (x - mean) / std * std' + mean'

    where ``var_batch`` is the unbiased variance over the batch of each statistic (of channel
    c, for 'in'). Zero noise returns x. The defaults are the authors' code: instance-norm
    moments, the same eps 1e-6 added to both variances (over positions, and over the batch),
    unbiased variances, and no statistic detached (their module lets gradients flow through
    the means, the standard deviations and their batch spreads).

    Args:
        x: Features with the batch first, as in :func:`mix_moments`; B >= 2.
        noise_mean: Standard-normal draws, one per mean: B * K elements, shaped (B, K) as
            :func:`moment_shape` gives ((B, C) for 'in', in any layout).
        noise_std: The same for the standard deviations.
        norm: Which moments (``MOEX_NORMS``); 'in' is DSU's.
        eps: Added to the unbiased variances inside the square roots.
        channel_dim: The channel dimension: 1 for NCHW, -1 for NHWC and tokens.
        detach: Treat the statistics as constants: the gradient is then ``g * std' / std``.

    Returns:
        A tensor of x's shape, dtype and memory format.

    Raises:
        ValueError: The batch has one sample (no spread over the batch), or a noise tensor
            does not hold B * K elements.
    """
    xg, dims, _ = moment_view(x, norm, channel_dim, 'perturb_moments')
    check_eps(eps)
    if x.shape[0] < 2:
        raise ValueError(f'perturb_moments needs a batch of at least 2 samples (the spread of a statistic over the '
                         f'batch); got shape {tuple(x.shape)}')
    expected = moment_shape(x, norm, channel_dim)
    for name, noise in (('noise_mean', noise_mean), ('noise_std', noise_std)):
        if not isinstance(noise, torch.Tensor) or noise.numel() != expected[0] * expected[1]:
            raise ValueError(f'{name} must be a tensor of shape {expected} (moment_shape(x, {norm!r})); '
                             f'got {noise!r:.80}')
    return replace_moments(x, xg, dims, eps, 'perturb', (noise_mean, noise_std), not detach, not detach)
