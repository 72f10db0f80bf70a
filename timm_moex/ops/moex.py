"""Moment Exchange (MoEx), the pure operation.

Li et al., "On Feature Normalization and Data Augmentation", CVPR 2021.

Each sample's features are normalized by their own moments (mean and standard deviation over
the dimensions that the normalization names) and de-normalized with the moments of a donor
sample, ``x[perm[i]]``::

    out = (x - mean) / std * std[perm] + mean[perm]

computed as one affine ``x * scale + shift`` with statistics in float32 (float64 stays float64).

Two implementations give the same result: PyTorch ops with a hand-written backward (every
device, every norm, and what ``torch.compile`` traces; shared with MixStyle and DSU in
``timm_moex.ops.moments``), and fused Triton kernels for 'pono' and
'gponoG' on CUDA tensors in eager mode (``timm_moex.ops.moex_triton``), chosen by ``impl``.
"""
import warnings
from types import ModuleType
from typing import Optional, Tuple

import torch

from ..utils.checks import check_eps, check_perm
from .moments import MOEX_NORMS, moment_view, parse_norm, replace_moments

__all__ = ['moment_exchange', 'exchange_parsed', 'check_impl', 'parse_norm', 'MOEX_NORMS', 'MOEX_IMPLS']

MOEX_IMPLS = ('auto', 'triton', 'torch')
"""Implementations of ``moment_exchange``: 'auto' takes the Triton kernels wherever they apply."""


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
        perm: Integer tensor of shape (B,) on x's device or the CPU; ``perm[i]`` is the donor
            of sample i's moments, in [-B, B) (negative ones count from the end).
        norm: Which moments: 'pono' (over channels at each position; the paper's default),
            'in' (per channel over positions), 'ln' (over everything but the batch), 'gnG' (G
            channel groups), 'gn-dD' (groups of D channels), 'gponoG' (PONO inside G groups).
        eps: Added to the unbiased variance inside the square root; a finite number >= 0.
        channel_dim: The channel dimension: 1 for NCHW, -1 for NHWC and tokens.
        detach: Stop gradients through the donor's moments (the paper lets them flow).
        impl: 'auto' (fused Triton kernels for 'pono' and 'gponoG' on CUDA outside
            ``torch.compile``, PyTorch ops otherwise), 'triton' (the kernels or an error that
            says why they do not apply) or 'torch' (PyTorch ops always).

    Returns:
        A tensor of x's shape, dtype and memory format.
    """
    check_impl(impl)
    check_eps(eps)
    return exchange_parsed(x, perm, norm, parse_norm(norm), eps, channel_dim, detach, impl)


def exchange_parsed(x: torch.Tensor, perm: torch.Tensor, norm: str, spec: Tuple[str, int, int], eps: float,
                    channel_dim: int, detach: bool, impl: str) -> torch.Tensor:
    """:func:`moment_exchange` for a caller that checked its fixed arguments once (``MoExHook``, in its constructor).

    ``x`` and ``perm``, new at every call, are checked here; ``norm``, ``eps`` and ``impl`` are not.

    Args:
        x, perm, eps, channel_dim, detach: As :func:`moment_exchange`.
        norm: The normalization's name (for the messages about x's shape).
        spec: ``parse_norm(norm)``.
        impl: One of ``MOEX_IMPLS`` (see :func:`check_impl`).

    Returns:
        A tensor of x's shape, dtype and memory format.
    """
    xg, dims, channel_dim = moment_view(x, norm, channel_dim, 'moment_exchange', spec)
    check_perm(perm, x.shape[0], x.device)

    groups = xg.shape[channel_dim] if xg.dim() > x.dim() else 1  # channel groups of the grouped norms
    kernels = _fused_kernels(impl, x, norm, spec[0], channel_dim, groups)
    if kernels is not None:
        return _FusedPonoExchange.apply(x, perm.to(x.device).contiguous(), kernels, groups, channel_dim, float(eps),
                                        bool(detach))
    return replace_moments(x, xg, dims, eps, 'exchange', (perm,), moment_grad=not detach)


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
    """timm_moex.ops.moex_triton, or None (once, with a warning, if Triton is there but fails to load)."""
    global _triton_kernels, _triton_import_error
    if _triton_kernels is None and _triton_import_error is None:
        try:
            import timm_moex.ops.moex_triton as moex_triton  # the module, not the package: no import cycle
        except ImportError as e:  # no Triton (CPU-only or macOS builds of torch)
            _triton_import_error = f'Triton is not installed ({e})'
        except Exception as e:  # noqa: BLE001  a Triton this module does not work with
            _triton_import_error = f'timm_moex.ops.moex_triton failed to load ({type(e).__name__}: {e})'
            warnings.warn(f"{_triton_import_error}; moment_exchange uses PyTorch ops (impl='torch')")
        else:
            _triton_kernels = moex_triton
    return _triton_kernels


def _fused_kernels(impl: str, x: torch.Tensor, norm: str, kind: str, channel_dim: int,
                   groups: int) -> Optional[ModuleType]:
    """The Triton kernel module if ``impl`` and x call for it, else None (PyTorch ops); ``kind`` is norm's."""
    if impl == 'torch' or (impl == 'auto' and not x.is_cuda):
        return None
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


def check_impl(impl: str) -> str:
    """Refuse an ``impl`` that is not one of ``MOEX_IMPLS``.

    Args:
        impl: The implementation asked for.

    Returns:
        ``impl``, unchanged.

    Raises:
        ValueError: ``impl`` is not in ``MOEX_IMPLS``.
    """
    if impl not in MOEX_IMPLS:
        raise ValueError(f'impl={impl!r} is not an implementation of moment_exchange; use one of {MOEX_IMPLS}')
    return impl
