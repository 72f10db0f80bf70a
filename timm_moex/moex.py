"""Moment Exchange (MoEx), the pure operation.

Li et al., "On Feature Normalization and Data Augmentation", CVPR 2021.

Each sample's features are normalized by their own moments (mean and standard deviation over
the dimensions that the normalization names) and de-normalized with the moments of a donor
sample, ``x[perm[i]]``::

    out = (x - mean) / std * std[perm] + mean[perm]

computed as one affine ``x * scale + shift`` with statistics in float32 (float64 stays float64).

Two implementations give the same result: PyTorch ops with a hand-written backward (every
device, every norm, and what ``torch.compile`` traces), and fused Triton kernels for 'pono' and
'gponoG' on CUDA tensors in eager mode (``timm_moex.moex_triton``), chosen by ``impl``.
"""
import re
import warnings
from types import ModuleType
from typing import List, Optional, Tuple

import torch

__all__ = ['moment_exchange', 'parse_norm', 'MOEX_NORMS', 'MOEX_IMPLS']

MOEX_NORMS = ('pono', 'in', 'ln', 'gnG', 'gn-dD', 'gponoG')
"""Normalizations that ``moment_exchange`` accepts; G and D stand for positive integers."""

MOEX_IMPLS = ('auto', 'triton', 'torch')
"""Implementations of ``moment_exchange``: 'auto' takes the Triton kernels wherever they apply."""

_GROUP_NORM = re.compile(r'^(gn|gpono)(\d+)$')
_GROUP_SIZE_NORM = re.compile(r'^gn-d(\d+)$')


def parse_norm(norm: str) -> Tuple[str, int, int]:
    """Split a normalization name into (kind, groups, group_size).

    kind is one of 'pono', 'in', 'ln', 'gn', 'gpono'; ``groups`` (G) or ``group_size`` (D) is
    set for the grouped kinds and 0 otherwise.
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


def _grouped_view(x: torch.Tensor, norm: str, channel_dim: int) -> Tuple[torch.Tensor, List[int]]:
    """View x so that the statistics of ``norm`` reduce over the returned dims."""
    kind, groups, group_size = parse_norm(norm)
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


def moment_exchange(
        x: torch.Tensor,
        perm: torch.Tensor,
        norm: str = 'pono',
        eps: float = 1e-5,
        channel_dim: int = 1,
        detach: bool = False,
        *,
        impl: str = 'auto',
) -> torch.Tensor:
    """Give every sample ``i`` of ``x`` the moments of sample ``perm[i]``.

    Args:
        x: Features with the batch first: (B, C, H, W) (contiguous or channels_last),
            (B, H, W, C) or tokens (B, N, C) with ``channel_dim=-1``, or any (B, C, ...).
        perm: Integer tensor of shape (B,); ``perm[i]`` is the donor of sample i's moments.
        norm: Which moments: 'pono' (over channels at each position; the paper's default),
            'in' (per channel over positions), 'ln' (over everything but the batch), 'gnG' (G
            channel groups), 'gn-dD' (groups of D channels), 'gponoG' (PONO inside G groups).
        eps: Added to the unbiased variance inside the square root.
        channel_dim: The channel dimension: 1 for NCHW, -1 for NHWC and tokens.
        detach: Stop gradients through the donor's moments (the paper lets them flow).
        impl: 'auto' (fused Triton kernels for 'pono' and 'gponoG' on CUDA outside
            ``torch.compile``, PyTorch ops otherwise), 'triton' (the kernels or an error that
            says why they do not apply) or 'torch' (PyTorch ops always).

    Returns:
        A tensor of x's shape, dtype and memory format.
    """
    if x.dim() < 2:
        raise ValueError(f'moment_exchange needs a batched tensor of rank >= 2; got shape {tuple(x.shape)}')
    if not x.is_floating_point():
        raise TypeError(f'moment_exchange needs floating-point features; got {x.dtype}')
    if not -x.dim() <= channel_dim < x.dim() or channel_dim % x.dim() == 0:
        raise ValueError(
            f'channel_dim={channel_dim} is not a channel dimension of a tensor of shape {tuple(x.shape)}; '
            'use 1 (NCHW, the default) or -1 (NHWC and tokens)')
    channel_dim %= x.dim()
    _check_perm(perm, x.shape[0])

    xg, dims = _grouped_view(x, norm, channel_dim)
    count = 1
    for d in dims:
        count *= xg.shape[d]
    if count < 2:
        raise ValueError(
            f'norm={norm!r} reduces over {count} element per sample for shape {tuple(x.shape)}: '
            'an unbiased variance needs at least 2')

    groups = xg.shape[channel_dim] if xg.dim() > x.dim() else 1  # channel groups of the grouped norms
    kernels = _fused_kernels(impl, x, norm, channel_dim, groups)
    if kernels is not None:
        return _FusedPonoExchange.apply(x, perm.to(x.device).contiguous(), kernels, groups, channel_dim, float(eps),
                                        bool(detach))
    out = _MomentExchange.apply(xg, perm, tuple(dims), float(eps), bool(detach)).reshape(x.shape)
    # Grouped statistics can lead the broadcast to pick another layout; give back x's own.
    return out.contiguous(memory_format=_memory_format(x))


class _MomentExchange(torch.autograd.Function):
    """``(x - mean) / std * std[perm] + mean[perm]`` with a hand-written backward.

    Autograd through the composed ops would keep float32 copies of x and run a dozen passes
    over them; here the forward reads x twice (statistics, then one affine that writes x's
    dtype) and the backward a few times (two sums, two fused multiply-adds), and nothing of x's
    size is saved but x itself.

    With n = (x - mean) / std over the N elements of a group, the donor's moments (m', s')
    and g the incoming gradient, the gradient is ``g * a + x * b + c``, where, per group,

        a = s' / s
        b = (G_s - s' * sum(g n) / s) / ((N - 1) * s)
        c = G_m / N - s' * sum(g) / (N * s) - mean * b

    and G_m, G_s are sum(g) and sum(g n) of the samples that took their moments from this one
    (zero with ``detach``): the gradient through the donor's mean and std.
    """

    @staticmethod
    def forward(ctx, xg: torch.Tensor, perm: torch.Tensor, dims: Tuple[int, ...], eps: float, detach: bool):
        with torch.autocast(xg.device.type, enabled=False):
            var, mean = torch.var_mean(xg.to(torch.promote_types(xg.dtype, torch.float32)), dim=dims, correction=1,
                                       keepdim=True)
            std = (var + eps).sqrt()
            scale = std[perm] / std
            # Mixed dtypes: computed in float32, written in x's dtype, in one pass.
            out = torch.addcmul(mean[perm] - mean * scale, xg, scale, out=torch.empty_like(xg))
        ctx.save_for_backward(xg, perm, mean, std)
        ctx.dims, ctx.detach, ctx.count = dims, detach, xg.numel() // mean.numel()
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xg, perm, mean, std = ctx.saved_tensors
        dims, count = ctx.dims, ctx.count
        with torch.autocast(xg.device.type, enabled=False):
            xs = xg.to(mean.dtype)
            g_sum = grad.sum(dims, keepdim=True, dtype=mean.dtype)
            gn_sum = ((grad * xs).sum(dims, keepdim=True, dtype=mean.dtype) - mean * g_sum) / std
            donor_std = std[perm]
            b = -donor_std * gn_sum / std
            c = -donor_std * g_sum / (count * std)
            if not ctx.detach:
                b = b + torch.zeros_like(gn_sum).index_add_(0, perm, gn_sum)
                c = c + torch.zeros_like(g_sum).index_add_(0, perm, g_sum) / count
            b = b / ((count - 1) * std)
            c = c - mean * b
            dx = torch.addcmul(torch.addcmul(c, xs, b), grad, donor_std / std, out=torch.empty_like(xg))
        return dx, None, None, None, None


class _FusedPonoExchange(torch.autograd.Function):
    """PONO moment exchange inside channel groups by the Triton kernels of ``moex_triton``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, kernels: ModuleType, groups: int, channel_dim: int,
                eps: float, detach: bool):
        out, mean, std = kernels.pono_exchange_forward(x, perm, groups, channel_dim, eps)
        ctx.save_for_backward(x, perm, mean, std)
        ctx.kernels, ctx.channel_dim, ctx.detach = kernels, channel_dim, detach
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, perm, mean, std = ctx.saved_tensors
        dx = ctx.kernels.pono_exchange_backward(grad, x, perm, mean, std, ctx.channel_dim, ctx.detach)
        return dx, None, None, None, None, None, None


_triton_kernels: Optional[ModuleType] = None
_triton_import_error: Optional[str] = None


def _load_triton_kernels() -> Optional[ModuleType]:
    """timm_moex.moex_triton, or None (once, with a warning, if Triton is there but fails to load)."""
    global _triton_kernels, _triton_import_error
    if _triton_kernels is None and _triton_import_error is None:
        try:
            from . import moex_triton
        except ImportError as e:  # no Triton (CPU-only or macOS builds of torch)
            _triton_import_error = f'Triton is not installed ({e})'
        except Exception as e:  # noqa: BLE001  a Triton this module does not work with
            _triton_import_error = f'timm_moex.moex_triton failed to load ({type(e).__name__}: {e})'
            warnings.warn(f"{_triton_import_error}; moment_exchange uses PyTorch ops (impl='torch')")
        else:
            _triton_kernels = moex_triton
    return _triton_kernels


def _fused_kernels(impl: str, x: torch.Tensor, norm: str, channel_dim: int, groups: int) -> Optional[ModuleType]:
    """The Triton kernel module if ``impl`` and x call for it, else None (PyTorch ops)."""
    check_impl(impl)
    if impl == 'torch' or (impl == 'auto' and not x.is_cuda):
        return None
    kind = parse_norm(norm)[0]
    group_width = x.shape[channel_dim] // groups
    compiling = torch.compiler.is_compiling()
    kernels = None if compiling else _load_triton_kernels()
    if compiling:
        why = 'torch.compile traces the PyTorch ops (Inductor fuses them)'
    elif kernels is None:
        why = _triton_import_error
    elif kind not in ('pono', 'gpono'):
        why = f"the kernels cover 'pono' and 'gponoG', not norm={norm!r}"
    elif not (x.is_cuda or (impl == 'triton' and kernels.interpreted())):
        why = f'x is on {x.device.type}; the kernels run on CUDA (or on the CPU with TRITON_INTERPRET=1)'
    elif x.numel() == 0:
        why = 'x is empty'
    elif group_width > kernels.MAX_GROUP_CHANNELS:
        why = f'a group of {group_width} channels is wider than the kernels\' {kernels.MAX_GROUP_CHANNELS}'
    elif kernels.layout(x, channel_dim) is None:
        why = f'the positions of x (shape {tuple(x.shape)}, strides {x.stride()}) do not flatten into one stride'
    else:
        return kernels
    if impl == 'triton':
        raise ValueError(f"impl='triton' cannot be used: {why}. Use impl='auto' or 'torch'.")
    return None


def check_impl(impl: str) -> None:
    """Refuse an ``impl`` that is not one of ``MOEX_IMPLS``.

    Args:
        impl: The implementation asked for.

    Raises:
        ValueError: ``impl`` is not in ``MOEX_IMPLS``.
    """
    if impl not in MOEX_IMPLS:
        raise ValueError(f'impl={impl!r} is not an implementation of moment_exchange; use one of {MOEX_IMPLS}')


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check_perm(perm: torch.Tensor, batch_size: int) -> None:
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f'perm must be a tensor of sample indices; got {type(perm).__name__}')
    if perm.dtype not in (torch.int64, torch.int32):
        raise TypeError(f'perm must hold integer indices (torch.int64 or torch.int32); got {perm.dtype}')
    if perm.shape != (batch_size,):
        raise ValueError(
            f'perm must have shape ({batch_size},), one donor index per sample of the batch; '
            f'got shape {tuple(perm.shape)}')

