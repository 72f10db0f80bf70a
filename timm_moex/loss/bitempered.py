"""Bi-Tempered Logistic Loss.

Amid, Warmuth, Anil, Koren, "Robust Bi-Tempered Logistic Loss Based on Bregman Divergences",
NeurIPS 2019. Two temperatures replace the softmax cross-entropy's logarithm and exponential
with tempered ones::

    log_t(u) = (u^(1-t) - 1) / (1 - t)            exp_t(u) = max(0, 1 + (1-t) u)^(1/(1-t))

* t2 (> 1: heavier tails than the softmax) makes the *tempered softmax*
  ``p = exp_t2(a - lam(a))``, whose normalizer ``lam(a)`` solves ``sum_k exp_t2(a_k - lam) = 1``;
* t1 (< 1: bounded loss, robust to label noise) makes the loss, the Bregman divergence::

      sum_k [ y (log_t1 y - log_t1 p) - (y^(2-t1) - p^(2-t1)) / (2 - t1) ]

t1 = t2 = 1 gives KL(y || softmax(a)): the cross-entropy for one-hot targets, and the
cross-entropy minus the (logit-independent) entropy of y for soft ones.
"""
import math

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from ..utils.amp import autocast_off
from ..utils.checks import check_class_indices

__all__ = ['BiTemperedLogisticLoss', 'bi_tempered_logistic_loss', 'tempered_softmax', 'tempered_normalizer',
           'log_t', 'exp_t']

# Newton refinement after the paper's fixed-point iteration / bisection. Newton's method on the
# convex decreasing normalization condition converges monotonically from the left and
# quadratically near the root; 8 steps reach float64 precision from a 5-iteration start over
# 0.01 <= t2 <= 10, up to 10^4 classes and logits up to 10^4.
_NEWTON_STEPS = 8


def log_t(u: torch.Tensor, t: float) -> torch.Tensor:
    """Tempered logarithm ``(u^(1-t) - 1) / (1 - t)``; ``log`` at t = 1."""
    if t == 1.0:
        return torch.log(u)
    return (u.pow(1.0 - t) - 1.0) / (1.0 - t)


def exp_t(u: torch.Tensor, t: float) -> torch.Tensor:
    """Tempered exponential ``max(0, 1 + (1-t) u)^(1/(1-t))``; ``exp`` at t = 1."""
    if t == 1.0:
        return torch.exp(u)
    return torch.clamp_min(1.0 + (1.0 - t) * u, 0.0).pow(1.0 / (1.0 - t))


def _compute_normalizer(a: torch.Tensor, t: float, num_iters: int) -> torch.Tensor:
    """``lam`` with ``sum(exp_t(a - lam), -1) == 1``, shape (..., 1), for t != 1 (no autograd)."""
    mu = a.amax(-1, keepdim=True)
    a0 = a - mu  # <= 0 with a 0 entry, so lam0 below is >= 0: exp_t(0) = 1 alone sums to >= 1
    if t > 1.0:
        # The paper's fixed point: Z = sum exp_t(a0 * Z^(1-t)), then lam0 = -log_t(1/Z).
        z = a0
        for _ in range(num_iters):
            z = a0 * exp_t(z, t).sum(-1, keepdim=True).pow(1.0 - t)
        lam0 = -log_t(1.0 / exp_t(z, t).sum(-1, keepdim=True), t)
    else:
        # The paper's bisection on [0, -log_t(1/n)], n = the classes inside exp_t's support at
        # lam0 = 0: each of them has exp_t(a0 - hi) <= exp_t(-hi) = 1/n there.
        n = (a0 > -1.0 / (1.0 - t)).sum(-1, keepdim=True).to(a.dtype)
        lo, hi = torch.zeros_like(n), -log_t(1.0 / n, t)
        for _ in range(num_iters):
            mid = (lo + hi) / 2
            below = exp_t(a0 - mid, t).sum(-1, keepdim=True) < 1.0
            lo, hi = torch.where(below, lo, mid), torch.where(below, mid, hi)
        lam0 = lo  # sum >= 1 there: Newton from the left never overshoots
    for _ in range(_NEWTON_STEPS):
        p = exp_t(a0 - lam0, t)
        # d/dlam sum exp_t(a0 - lam) = -sum p^t. The root is >= 0, and clamping there keeps
        # 1 + (1-t)(a0 - lam0) > 0 for t > 1, where exp_t has a pole.
        lam0 = (lam0 + (p.sum(-1, keepdim=True) - 1.0) / p.pow(t).sum(-1, keepdim=True)).clamp_min(0.0)
    return lam0 + mu


class _TemperedNormalizer(torch.autograd.Function):
    """lam(a) of the tempered softmax, with its implicit-function gradient.

    Differentiating ``sum_k exp_t(a_k - lam(a)) = 1`` gives ``dlam/da_j = p_j^t / sum_k p_k^t``,
    since ``exp_t'(u) = exp_t(u)^t``: the gradient holds exactly at the solution, whatever
    iterations found it.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(a: torch.Tensor, t: float, num_iters: int) -> torch.Tensor:
        return _compute_normalizer(a, t, num_iters)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, t, _ = inputs
        w = exp_t(a - output, t).pow(t)
        ctx.save_for_backward(w / w.sum(-1, keepdim=True))

    @staticmethod
    @once_differentiable  # q is saved without a graph: a second derivative must not pass silently
    def backward(ctx, grad_lam):
        q, = ctx.saved_tensors
        return grad_lam * q, None, None


def tempered_normalizer(a: torch.Tensor, t: float, num_iters: int = 5) -> torch.Tensor:
    """``lam(a)`` of shape (..., 1) with ``sum(exp_t(a - lam), -1) == 1``, differentiable in ``a``.

    Found by the paper's fixed-point iteration (t > 1) or bisection (t < 1), ``num_iters``
    iterations, then refined by Newton steps to float precision; ``logsumexp`` at t = 1.
    """
    if t == 1.0:
        return torch.logsumexp(a, -1, keepdim=True)
    return _TemperedNormalizer.apply(a, t, num_iters)


def _tempered_argument(a: torch.Tensor, t: float, num_iters: int) -> torch.Tensor:
    """``u = a - lam(a)``, the argument of exp_t in the tempered softmax ``p = exp_t(u)``."""
    # Shift by the (constant) max first: lam(a) = mu + lam(a - mu), and adding mu back to lam
    # before subtracting would round away lam's small part (float32 logits of 1e4, say).
    a0 = a - a.detach().amax(-1, keepdim=True)
    return a0 - tempered_normalizer(a0, t, num_iters)


def _log_exp_t(u: torch.Tensor, t: float) -> torch.Tensor:
    """``log exp_t(u)`` (never ``log`` of an underflowed exp_t).

    Where ``exp_t(u) = 0`` (outside its support, t < 1) it is -inf, with a zero gradient.
    """
    if t == 1.0:
        return u
    base = 1.0 + (1.0 - t) * u
    inside = base > 0
    return torch.where(inside, torch.log(torch.where(inside, base, 1.0)) / (1.0 - t), -math.inf)


def _tempered_log_softmax(a: torch.Tensor, t: float, num_iters: int) -> torch.Tensor:
    """``log p`` of the tempered softmax; classes outside exp_t's support (t < 1) get -inf."""
    return _log_exp_t(_tempered_argument(a, t, num_iters), t)


def tempered_softmax(a: torch.Tensor, t: float, num_iters: int = 5) -> torch.Tensor:
    """``exp_t(a - lam(a))`` over the last dimension: sums to 1; the softmax at t = 1.

    Args:
        a: Activations (..., K).
        t: Temperature; > 1 gives heavy tails, < 1 a finite support.
        num_iters: Iterations of the normalizer's fixed-point iteration or bisection (see
            :func:`tempered_normalizer`).

    Returns:
        Probabilities of a's shape.
    """
    return torch.exp(_tempered_log_softmax(a, t, num_iters))


def _log_t_of_log(log_u: torch.Tensor, t: float) -> torch.Tensor:
    """``log_t(u)`` from ``log u``: accurate for tiny u and finite at u = 0 when t < 1."""
    if t == 1.0:
        return log_u
    return torch.expm1((1.0 - t) * log_u) / (1.0 - t)


def bi_tempered_logistic_loss(
        logits: torch.Tensor,
        target: torch.Tensor,
        t1: float,
        t2: float,
        smoothing: float = 0.0,
        num_iters: int = 5,
        reduction: str = 'mean',
) -> torch.Tensor:
    """The bi-tempered logistic loss of ``logits`` (..., K) and ``target``.

    The loss is computed in float32 (float64 stays float64) with autocast off. With t1 = t2 < 1
    the gradient at a class outside the tempered softmax's support is the authors' released
    code's, ``p - y``, not the zero derivative of the loss there (docs/methods.md).

    Args:
        logits: Floating-point activations (..., K).
        target: Class indices in [0, K) (an integer tensor of shape (...)) or probabilities (a
            float tensor of the logits' shape, such as ``timm.data.Mixup`` makes; rows need not
            sum to 1).
        t1: Temperature of the loss' logarithm, in (0, 2); < 1 bounds the loss.
        t2: Temperature of the softmax, > 0; > 1 gives heavy tails.
        smoothing: Label smoothing s, in [0, 1): either target becomes ``(1 - s) * y + s / K``
            (timm's convention).
        num_iters: Iterations of the softmax normalizer's fixed-point iteration or bisection; >= 1.
        reduction: 'mean', 'sum' or 'none' (one value per row).

    Returns:
        The loss: a scalar, or one value per row with ``reduction='none'``. A row with a NaN or
        infinite logit has a NaN loss, and so has a row whose class index is out of range where
        it is not refused (CUDA, vmap, torch.compile: checking there would synchronize).

    Raises:
        ValueError: A class index on the CPU is outside [0, K), or an argument is out of range.
    """
    _check_args(t1, t2, smoothing, num_iters)
    if reduction not in ('mean', 'sum', 'none'):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")
    if logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(f'logits must be a floating-point tensor (..., num_classes); got {logits.dtype} '
                         f'of shape {tuple(logits.shape)}')
    num_classes = logits.shape[-1]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    with autocast_off(logits.device.type):
        a = logits.to(dtype)
        # No finite loss stands for a row with a NaN or infinite logit (a diverging run): it is NaN.
        valid = torch.isfinite(a).all(-1)
        if target.is_floating_point():
            if target.shape != logits.shape:
                raise ValueError(f'soft targets must have the logits\' shape {tuple(logits.shape)}; '
                                 f'got {tuple(target.shape)}')
            y = target.to(dtype)
        elif target.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            if target.shape != logits.shape[:-1]:
                raise ValueError(f'class-index targets must have shape {tuple(logits.shape[:-1])} for logits of '
                                 f'shape {tuple(logits.shape)}; got {tuple(target.shape)}')
            check_class_indices(target, num_classes, 'the logits')
            # A comparison, not F.one_hot: no data-dependent check, so it runs under vmap.
            classes = torch.arange(num_classes, device=target.device)
            y = (target.unsqueeze(-1) == classes).to(dtype)
            # An index that the check above cannot see (CUDA, vmap, torch.compile) makes its row NaN.
            valid = valid & (target >= 0) & (target < num_classes)
        else:
            raise TypeError(f'target must hold class indices (integer) or probabilities (float); got {target.dtype}')
        if smoothing:
            y = y * (1.0 - smoothing) + smoothing / num_classes

        u = _tempered_argument(a, t2, num_iters)
        log_p = _log_exp_t(u, t2)
        if t1 == t2 < 1.0:
            # log_t1(p) is u inside the support and log_t1(0) = -1 / (1 - t1) outside it, where the
            # loss does not change with the logit. The authors' released code gives such a class the
            # gradient (p - y) * p^(t2 - t1) = -y (0^0 = 1), which pulls a labelled class back into
            # the support: the same value, with u's gradient.
            log_t1_p = u + (u.clamp_min(-1.0 / (1.0 - t1)) - u).detach()
        else:
            log_t1_p = _log_t_of_log(log_p, t1)
        positive = y > 0
        # y log_t1(y) -> 0 as y -> 0 (t1 < 2); p^(2-t1) and y^(2-t1) vanish at 0.
        log_y = torch.log(torch.where(positive, y, 1.0))
        y_log_y = torch.where(positive, y * _log_t_of_log(log_y, t1), 0.0)
        y_log_p = y * torch.where(positive, log_t1_p, 0.0)
        # Summed term by term: at t1 = 1 the last two sums are both 1 and cancel to rounding.
        loss = (y_log_y.sum(-1) - y_log_p.sum(-1)
                - (y.pow(2.0 - t1).sum(-1) - torch.exp((2.0 - t1) * log_p).sum(-1)) / (2.0 - t1))
        loss = torch.where(valid, loss, math.nan)
    if reduction == 'mean':
        return loss.mean()
    if reduction == 'sum':
        return loss.sum()
    return loss


def _check_args(t1: float, t2: float, smoothing: float, num_iters: int) -> None:
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (number(t1) and 0.0 < t1 < 2.0):
        raise ValueError(f't1 must be a number in (0, 2) (t1 < 1 bounds the loss, 1 is the logistic loss; '
                         f'the loss divides by 2 - t1); got {t1!r}')
    if not (number(t2) and t2 > 0.0):
        raise ValueError(f't2 must be a number > 0 (t2 > 1 gives heavier tails than the softmax, 1 is the '
                         f'softmax); got {t2!r}')
    if not (number(smoothing) and 0.0 <= smoothing < 1.0):
        raise ValueError(f'smoothing must be a number in [0, 1); got {smoothing!r}')
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f'num_iters must be an integer >= 1; got {num_iters!r}')


class BiTemperedLogisticLoss(nn.Module):
    """Bi-tempered logistic loss as a criterion: ``loss_fn(logits, target)``.

    Works alone, inside :class:`timm_moex.MoExLoss` and as the criterion of a timm task, with
    class indices or soft targets (timm ``Mixup``: leave smoothing to Mixup then, or it is
    applied twice).

    Args:
        t1: Temperature of the loss' logarithm; t1 < 1 bounds the loss by
            ``1 / (1 - t1)`` for one-hot targets (robust to label noise). In (0, 2).
        t2: Temperature of the softmax; t2 > 1 gives heavy tails. > 0.
            The paper's typical pair is t1 = 0.8, t2 = 1.2; t1 = t2 = 1 is the cross-entropy.
            With t2 < 1 classes far below the top one get probability exactly 0, so t1 >= 1
            (an unbounded loss) can be infinite there; t1 < 1 keeps it finite.
        smoothing: Label smoothing, ``(1 - s) * y + s / K``, in [0, 1).
        num_iters: Iterations of the paper's fixed-point iteration (t2 > 1) or bisection
            (t2 < 1) for the softmax normalizer, before Newton refinement; >= 1.
        reduction: 'mean' (over samples), 'sum' or 'none'.
    """

    def __init__(self, t1: float = 0.8, t2: float = 1.2, smoothing: float = 0.0, num_iters: int = 5,
                 reduction: str = 'mean'):
        super().__init__()
        _check_args(t1, t2, smoothing, num_iters)
        if reduction not in ('mean', 'sum', 'none'):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")
        self.t1 = float(t1)
        self.t2 = float(t2)
        self.smoothing = float(smoothing)
        self.num_iters = num_iters
        self.reduction = reduction

    def extra_repr(self) -> str:
        return f't1={self.t1}, t2={self.t2}, smoothing={self.smoothing}, num_iters={self.num_iters}'

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bi_tempered_logistic_loss(logits, target, self.t1, self.t2, smoothing=self.smoothing,
                                         num_iters=self.num_iters, reduction=self.reduction)
