"""Fused Triton kernels of ``moment_exchange`` for the PONO family ('pono', 'gponoG').

``moment_exchange`` composed of PyTorch ops launches about ten kernels forward and twenty-five
backward, with float32 temporaries of the features' size; in eager mode on a GPU that is
launch-bound at stem sizes. These kernels do the same arithmetic in one launch per direction,
with nothing that waits on the host:

- forward, one program per (sample, channel group, block of positions): load the sample's
  tile and its donor's, take both moments in registers, write ``(x - m) / s * s' + m'`` and
  the sample's own (m, s) for the backward;
- backward, one program per the same tile: the gradient ``g * s'/s + (x - m) * b + c`` with
  the own and donor terms of ``moment_exchange``'s backward. The donor terms are the sums
  ``sum(g)`` and ``sum(g * n)`` of the samples that took this sample's moments (its
  recipients): the program finds them in ``perm`` and reads their tiles itself, so the
  backward needs no second pass, no zero-filled buffer and no atomics, and adds the
  recipients in batch order (deterministic, also when a donor serves several samples).

The features are seen as (B, C, S) with S the flattened positions, which covers NCHW (S
stride 1), channels_last, NHWC and tokens (C stride 1) without a copy. Statistics are kept in
float32 (float64 for float64 input), the output is written in the input's dtype.

Only ``moment_exchange`` calls this module, and only on CUDA tensors outside
``torch.compile`` (Inductor fuses the composed ops itself). With ``TRITON_INTERPRET=1`` set
before the first import, the kernels run on CPU tensors, which is how the tests check them.
"""
import os
from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ['MAX_GROUP_CHANNELS', 'interpreted', 'layout', 'pono_exchange_forward', 'pono_exchange_backward']

MAX_GROUP_CHANNELS = 2048
"""Groups wider than this are left to the composed ops: a tile holds a whole group's channels."""

_MAX_BLOCK_B = 1024  # donor indices the backward scans at once for a sample's recipients
_TILE = 4096  # elements of a (channels, positions) tile per program: a first guess, not yet tuned on a GPU

# Triton reads TRITON_INTERPRET when a kernel is defined, i.e. at this module's import
# (triton.knobs is Triton >= 3.4's view of its settings; older ones read the variable itself).
try:
    _INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:
    _INTERPRETED = os.environ.get('TRITON_INTERPRET', '0').lower() in ('1', 'true', 'yes', 'on')


def interpreted() -> bool:
    """Whether these kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return _INTERPRETED


def layout(t: torch.Tensor, channel_dim: int) -> Optional[Tuple[int, int, int]]:
    """Strides (batch, channel, position) of ``t`` seen as (B, C, S), or None if its positions
    (every dimension but the batch and ``channel_dim``) cannot be flattened into one stride."""
    spatial = [d for d in range(1, t.dim()) if d != channel_dim and t.shape[d] != 1]
    for outer, inner in zip(spatial, spatial[1:]):
        if t.stride(outer) != t.stride(inner) * t.shape[inner]:
            return None
    return t.stride(0), t.stride(channel_dim), t.stride(spatial[-1]) if spatial else 1


def _blocks(group_channels: int) -> Tuple[int, int, int]:
    block_c = triton.next_power_of_2(group_channels)
    block_s = max(2, _TILE // block_c)
    return block_c, block_s, 8 if block_c * block_s >= _TILE else 4


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _moments(v, mask, n: tl.constexpr, EPS: tl.constexpr, ACC: tl.constexpr):
    """Mean, centred values and sqrt(unbiased variance + EPS) of each column of a masked tile."""
    mean = tl.sum(v, 0) / n
    centred = tl.where(mask, v - mean[None, :], 0.0)
    var = tl.sum(centred * centred, 0) / (n - 1)
    # EPS is made in the statistics' dtype, as PyTorch adds eps. A Python float is float32 in a
    # kernel, as an argument or as a bare constant: 1e-5 would arrive as 1e-5 * (1 - 2.5e-9), and
    # where a group's variance is near eps (groups of 2 channels) the float64 gradient, whose terms
    # cancel down to about eps / variance of their size, would move by up to ~1e-7 relative.
    return mean, centred, tl.sqrt(var + tl.full([], EPS, ACC))


@triton.jit
def _program(GROUPS: tl.constexpr):
    """This program's id along the (sample, group) axis, its sample and its channel group."""
    pid = tl.program_id(0)
    return pid, (pid // GROUPS).to(tl.int64), pid % GROUPS


@triton.jit
def _donor(perm_ptr, sample, B):
    """perm[sample] as an index into the batch (negative ones count from the end, as in PyTorch),
    and whether it is one: an invalid donor is replaced by the sample itself, for safe addresses."""
    index = tl.load(perm_ptr + sample).to(tl.int64)
    index = tl.where(index < 0, index + B, index)
    valid = (index >= 0) & (index < B)
    return tl.where(valid, index, sample), valid


@triton.jit
def _tile_offsets(pid_s, group, S, sc, ss, GROUP_C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = offs_s < S
    mask = (offs_c < GROUP_C)[:, None] & s_mask[None, :]
    chan = (group * GROUP_C + offs_c).to(tl.int64)
    return chan[:, None] * sc + offs_s[None, :].to(tl.int64) * ss, mask, offs_s, s_mask


@triton.jit
def _forward_kernel(
        x_ptr, perm_ptr, out_ptr, mean_ptr, std_ptr,
        B, S,
        x_sb, x_sc, x_ss, o_sb, o_sc, o_ss,
        GROUPS: tl.constexpr, GROUP_C: tl.constexpr, EPS: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    pid, sample, group = _program(GROUPS)
    donor, valid = _donor(perm_ptr, sample, B)
    x_off, mask, offs_s, s_mask = _tile_offsets(tl.program_id(1), group, S, x_sc, x_ss, GROUP_C, BLOCK_C, BLOCK_S)
    own = tl.load(x_ptr + sample * x_sb + x_off, mask=mask, other=0.0).to(ACC)
    don = tl.load(x_ptr + donor * x_sb + x_off, mask=mask, other=0.0).to(ACC)
    mean, centred, std = _moments(own, mask, GROUP_C, EPS, ACC)
    donor_mean, _, donor_std = _moments(don, mask, GROUP_C, EPS, ACC)
    donor_mean = tl.where(valid, donor_mean, float('nan'))  # no silent result for an index out of range
    out = centred * (donor_std / std)[None, :] + donor_mean[None, :]
    o_off, _, _, _ = _tile_offsets(tl.program_id(1), group, S, o_sc, o_ss, GROUP_C, BLOCK_C, BLOCK_S)
    tl.store(out_ptr + sample * o_sb + o_off, out.to(out_ptr.dtype.element_ty), mask=mask)
    stat = pid.to(tl.int64) * S + offs_s
    tl.store(mean_ptr + stat, mean, mask=s_mask)
    tl.store(std_ptr + stat, std, mask=s_mask)


@triton.jit
def _grad_sums(g_ptr, x_ptr, mean_ptr, std_ptr, sample, group, S,
               g_sb, g_sc, g_ss, x_sb, x_sc, x_ss,
               GROUPS: tl.constexpr, GROUP_C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
               ACC: tl.constexpr):
    """The incoming gradient, the centred input and the moments of one sample's tile, with
    sum(g) and sum(g * n) over each position's channels."""
    g_off, mask, offs_s, s_mask = _tile_offsets(tl.program_id(1), group, S, g_sc, g_ss, GROUP_C, BLOCK_C, BLOCK_S)
    x_off, _, _, _ = _tile_offsets(tl.program_id(1), group, S, x_sc, x_ss, GROUP_C, BLOCK_C, BLOCK_S)
    g = tl.load(g_ptr + sample * g_sb + g_off, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + sample * x_sb + x_off, mask=mask, other=0.0).to(ACC)
    stat = (sample * GROUPS + group) * S + offs_s
    mean = tl.load(mean_ptr + stat, mask=s_mask, other=0.0)
    std = tl.load(std_ptr + stat, mask=s_mask, other=1.0)
    centred = tl.where(mask, x - mean[None, :], 0.0)
    g_sum = tl.sum(g, 0)
    gn_sum = tl.sum(g * centred, 0) / std
    return g, centred, std, g_sum, gn_sum, offs_s, s_mask, mask


@triton.jit
def _recipient_sums(g_ptr, x_ptr, perm_ptr, mean_ptr, std_ptr, sample, group, B, S,
                    g_sb, g_sc, g_ss, x_sb, x_sc, x_ss,
                    GROUPS: tl.constexpr, GROUP_C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_B: tl.constexpr, ACC: tl.constexpr):
    """sum(g) and sum(g * n) of the samples whose donor is ``sample``, added in batch order.

    Indices are read as ``_donor`` reads them: a negative one counts from the end, one out of
    range is nobody's (its recipient's output is NaN already)."""
    g_acc = tl.zeros([BLOCK_S], ACC)
    gn_acc = tl.zeros([BLOCK_S], ACC)
    for start in range(0, B, BLOCK_B):
        ks = start + tl.arange(0, BLOCK_B)
        donors = tl.load(perm_ptr + ks, mask=ks < B, other=0).to(tl.int64)
        donors = tl.where(donors < 0, donors + B, donors)
        todo = (ks < B) & (donors == sample)
        for _ in range(tl.sum(todo.to(tl.int32), 0)):
            recipient = tl.min(tl.where(todo, ks, B), 0)
            todo = todo & (ks != recipient)
            _, _, _, g_sum, gn_sum, _, _, _ = _grad_sums(
                g_ptr, x_ptr, mean_ptr, std_ptr, recipient.to(tl.int64), group, S, g_sb, g_sc, g_ss, x_sb, x_sc, x_ss,
                GROUPS, GROUP_C, BLOCK_C, BLOCK_S, ACC)
            g_acc += g_sum
            gn_acc += gn_sum
    return g_acc, gn_acc


@triton.jit
def _backward_kernel(
        g_ptr, x_ptr, perm_ptr, mean_ptr, std_ptr, dx_ptr,
        B, S,
        g_sb, g_sc, g_ss, x_sb, x_sc, x_ss, d_sb, d_sc, d_ss,
        GROUPS: tl.constexpr, GROUP_C: tl.constexpr, DONOR_GRAD: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr, ACC: tl.constexpr,
):
    _, sample, group = _program(GROUPS)
    g, centred, std, g_sum, gn_sum, offs_s, s_mask, mask = _grad_sums(
        g_ptr, x_ptr, mean_ptr, std_ptr, sample, group, S, g_sb, g_sc, g_ss, x_sb, x_sc, x_ss,
        GROUPS, GROUP_C, BLOCK_C, BLOCK_S, ACC)
    donor, _ = _donor(perm_ptr, sample, B)
    donor_std = tl.load(std_ptr + (donor * GROUPS + group) * S + offs_s, mask=s_mask, other=1.0)
    b = -donor_std * gn_sum / std
    c = -donor_std * g_sum / (GROUP_C * std)
    if DONOR_GRAD:
        recipients_g, recipients_gn = _recipient_sums(
            g_ptr, x_ptr, perm_ptr, mean_ptr, std_ptr, sample, group, B, S, g_sb, g_sc, g_ss, x_sb, x_sc, x_ss,
            GROUPS, GROUP_C, BLOCK_C, BLOCK_S, BLOCK_B, ACC)
        b += recipients_gn
        c += recipients_g / GROUP_C
    b = b / ((GROUP_C - 1) * std)
    dx = g * (donor_std / std)[None, :] + centred * b[None, :] + c[None, :]
    d_off, _, _, _ = _tile_offsets(tl.program_id(1), group, S, d_sc, d_ss, GROUP_C, BLOCK_C, BLOCK_S)
    tl.store(dx_ptr + sample * d_sb + d_off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@contextmanager
def _launching_on(t: torch.Tensor) -> Iterator[None]:
    """Launch on t's GPU (Triton launches on the current device), and turn a Triton failure (a
    compiler error on an untested GPU, say) into one that says what to do."""
    try:
        with torch.cuda.device(t.device) if t.is_cuda else nullcontext():
            yield
    except Exception as e:  # noqa: BLE001  Triton raises many kinds
        raise RuntimeError(
            f"a Triton kernel of moment_exchange failed ({type(e).__name__}: {e}); impl='torch' (moex_impl: torch "
            "in train_moex.py) computes the same with PyTorch ops") from e


def _positions(x: torch.Tensor, channel_dim: int) -> int:
    return x.numel() // (x.shape[0] * x.shape[channel_dim]) if x.numel() else 0


def pono_exchange_forward(x: torch.Tensor, perm: torch.Tensor, groups: int, channel_dim: int, eps: float
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, std) of PONO moment exchange inside ``groups`` channel groups.

    ``mean`` and ``std`` are the sample's own moments, of shape (B, groups, S), for the backward.
    The caller checks that ``layout(x, channel_dim)`` is not None and the group fits a tile.
    ``eps`` is a compile-time constant of the kernel (one compilation per value), so that it
    reaches a float64 kernel as the float64 number, not rounded to float32.
    """
    batch, channels, positions = x.shape[0], x.shape[channel_dim], _positions(x, channel_dim)
    group_c = channels // groups
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty_like(x)
    mean = torch.empty((batch, groups, positions), device=x.device, dtype=acc)
    std = torch.empty_like(mean)
    block_c, block_s, warps = _blocks(group_c)
    grid = (batch * groups, triton.cdiv(positions, block_s))
    with _launching_on(x):
        _forward_kernel[grid](
            x, perm, out, mean, std, batch, positions, *layout(x, channel_dim), *layout(out, channel_dim),
            GROUPS=groups, GROUP_C=group_c, EPS=eps, BLOCK_C=block_c, BLOCK_S=block_s, ACC=_acc_dtype(x.dtype),
            num_warps=warps)
    return out, mean, std


def pono_exchange_backward(grad: torch.Tensor, x: torch.Tensor, perm: torch.Tensor, mean: torch.Tensor,
                           std: torch.Tensor, channel_dim: int, detach: bool) -> torch.Tensor:
    """The gradient of ``pono_exchange_forward`` with respect to x (through the donors' moments
    too, unless ``detach``)."""
    if layout(grad, channel_dim) is None:
        grad = grad.contiguous()
    batch, groups, positions = mean.shape
    group_c = x.shape[channel_dim] // groups
    block_c, block_s, warps = _blocks(group_c)
    grid = (batch * groups, triton.cdiv(positions, block_s))
    dx = torch.empty_like(x)
    with _launching_on(x):
        _backward_kernel[grid](
            grad, x, perm, mean, std, dx, batch, positions,
            *layout(grad, channel_dim), *layout(x, channel_dim), *layout(dx, channel_dim),
            GROUPS=groups, GROUP_C=group_c, DONOR_GRAD=not detach, BLOCK_C=block_c, BLOCK_S=block_s,
            BLOCK_B=min(triton.next_power_of_2(batch), _MAX_BLOCK_B), ACC=_acc_dtype(x.dtype), num_warps=warps)
    return dx
