import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from timm_moex import MoExLoss
from timm_moex.loss import bitempered
from timm_moex.loss.bitempered import (
    BiTemperedLogisticLoss, bi_tempered_logistic_loss, exp_t, log_t, tempered_normalizer, tempered_softmax)

FIXED_POINT_T2 = [1.05, 1.2, 2.0, 4.0]  # t2 > 1
BISECTION_T2 = [0.2, 0.5, 0.8, 0.95]  # t2 < 1
TEMPERATURES = [(0.8, 1.2), (0.5, 0.8), (1.0, 1.0), (1.0, 1.5), (0.3, 2.0), (0.8, 0.5), (1.5, 0.9)]


def reference_normalizer(a: torch.Tensor, t: float) -> torch.Tensor:
    """lam with sum exp_t(a - lam) = 1 by 200 bisection steps in float64 (exp_t(a - lam) decreases in lam)."""
    a = a.double()
    lo = a.amax(-1, keepdim=True)  # the max entry alone gives exp_t(0) = 1
    hi = lo + 1.0
    while (exp_t(a - hi, t).sum(-1) > 1).any():
        hi = lo + 2 * (hi - lo)
    for _ in range(200):
        mid = (lo + hi) / 2
        above = exp_t(a - mid, t).sum(-1, keepdim=True) > 1
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2


def reference_loss(a: torch.Tensor, y: torch.Tensor, t1: float, t2: float) -> torch.Tensor:
    """The paper's per-sample loss, written out in float64 with y, p > 0."""
    p = exp_t(a.double() - reference_normalizer(a, t2), t2)
    y = y.double()
    return (y * (log_t(y, t1) - log_t(p, t1)) - (y ** (2 - t1) - p ** (2 - t1)) / (2 - t1)).sum(-1)


# ---- tempered log / exp ----

@pytest.mark.parametrize('t', [0.3, 0.8, 1.0, 1.2, 2.5])
def test_log_t_and_exp_t_are_inverse(t):
    u = torch.rand(50, dtype=torch.float64) + 0.1
    torch.testing.assert_close(exp_t(log_t(u, t), t), u)


def test_t_equal_one_is_log_and_exp():
    u = torch.rand(10, dtype=torch.float64) + 0.1
    torch.testing.assert_close(log_t(u, 1.0), u.log())
    torch.testing.assert_close(exp_t(u, 1.0), u.exp())
    torch.testing.assert_close(log_t(u, 1.0 + 1e-9), u.log(), rtol=1e-6, atol=1e-6)


# ---- the normalization ----

@pytest.mark.parametrize('t2', FIXED_POINT_T2 + BISECTION_T2)
@pytest.mark.parametrize('num_classes', [2, 10, 1000])
@pytest.mark.parametrize('scale', [0.1, 10.0, 1e4])
def test_normalization_converges(t2, num_classes, scale):
    torch.manual_seed(0)
    a = torch.randn(8, num_classes, dtype=torch.float64) * scale
    a[0] = 0.0  # all classes tied
    lam = tempered_normalizer(a, t2)
    torch.testing.assert_close(lam, reference_normalizer(a, t2), rtol=1e-10, atol=1e-9)
    assert (tempered_softmax(a, t2).sum(-1) - 1).abs().max() < 1e-12
    p32 = tempered_softmax(a.float(), t2)
    # float32 rounding, not convergence, limits this: lam ~ 300 for 1000 tied classes at t2 = 0.2
    assert p32.dtype == torch.float32 and (p32.sum(-1) - 1).abs().max() < 1e-4


@pytest.mark.parametrize('t2', [1.2, 0.5])
def test_normalization_does_not_depend_on_num_iters(t2):
    a = torch.randn(6, 20, dtype=torch.float64) * 3
    torch.testing.assert_close(tempered_normalizer(a, t2, num_iters=1), tempered_normalizer(a, t2, num_iters=30))


def test_tempered_softmax_at_t_one_is_softmax():
    a = torch.randn(4, 7)
    torch.testing.assert_close(tempered_softmax(a, 1.0), a.softmax(-1))


def test_t2_below_one_has_finite_support():
    a = torch.tensor([[10.0, 0.0, -10.0]], dtype=torch.float64)
    p = tempered_softmax(a, 0.5)
    assert p[0, 0] > 0.99 and p[0, 2] == 0
    assert tempered_softmax(a, 1.5)[0, 2] > 0  # heavy tails: never zero


@pytest.mark.parametrize('t2', [0.5, 1.0, 1.3, 3.0])
def test_tempered_softmax_gradcheck(t2):
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: (tempered_softmax(x, t2) * weights).sum(-1), (a,))


# ---- the loss ----

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_t1_t2_one_is_cross_entropy(dtype):
    out = (torch.randn(16, 10) * 5).to(dtype).requires_grad_()
    y = torch.randint(0, 10, (16,))
    loss = BiTemperedLogisticLoss(1.0, 1.0)(out, y)
    ce = F.cross_entropy(out, y)
    # 1e-6, relative in float32 (whose rounding unit is 6e-8; this loss is about 7)
    assert abs(loss.item() - ce.item()) < (1e-6 * ce.item() if dtype == torch.float32 else 1e-12)
    g_loss, = torch.autograd.grad(loss, out)
    g_ce, = torch.autograd.grad(ce, out)
    torch.testing.assert_close(g_loss, g_ce, rtol=1e-6, atol=1e-7)


def test_t1_t2_one_with_soft_targets_is_cross_entropy_minus_target_entropy():
    """KL(y || p): timm's SoftTargetCrossEntropy less a constant, so the same gradients."""
    out = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    y = torch.softmax(torch.randn(8, 6, dtype=torch.float64), -1)
    entropy = -(y * y.log()).sum(-1).mean()
    loss = BiTemperedLogisticLoss(1.0, 1.0)(out, y)
    ce = SoftTargetCrossEntropy()(out, y)
    assert abs(loss.item() + entropy.item() - ce.item()) < 1e-10
    g_loss, = torch.autograd.grad(loss, out)
    g_ce, = torch.autograd.grad(ce, out)
    torch.testing.assert_close(g_loss, g_ce)


def test_smoothing_is_timms_convention():
    out = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    loss = BiTemperedLogisticLoss(1.0, 1.0, smoothing=0.1)(out, y)
    ls = LabelSmoothingCrossEntropy(0.1)(out, y)
    g_loss, = torch.autograd.grad(loss, out)
    g_ls, = torch.autograd.grad(ls, out)
    torch.testing.assert_close(g_loss, g_ls)
    smoothed = 0.9 * F.one_hot(y, 5).double() + 0.1 / 5
    torch.testing.assert_close(loss, BiTemperedLogisticLoss(1.0, 1.0)(out, smoothed))


@pytest.mark.parametrize('t1, t2', TEMPERATURES)
def test_matches_the_papers_formula(t1, t2):
    out = torch.randn(6, 5, dtype=torch.float64) * 2
    y = torch.softmax(torch.randn(6, 5, dtype=torch.float64), -1)
    loss = bi_tempered_logistic_loss(out, y, t1, t2, reduction='none')
    torch.testing.assert_close(loss, reference_loss(out, y, t1, t2), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('t1', [0.2, 0.5, 0.8])
def test_loss_is_bounded_for_t1_below_one(t1):
    out = torch.zeros(2, 10)
    out[:, 0] = -1e4  # the labelled class has (almost) no probability
    y = torch.zeros(2, dtype=torch.long)
    bound = 1 / (1 - t1)
    for t2 in (0.7, 1.0, 1.2, 2.0):
        loss = BiTemperedLogisticLoss(t1, t2)(out, y).item()
        assert 0 < loss <= bound + 1e-5
    assert BiTemperedLogisticLoss(1.0, 1.0)(out, y).item() > 1e3  # the logistic loss is not bounded


def test_loss_is_zero_at_the_target():
    y = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    for t1, t2 in [(0.8, 1.2), (0.5, 0.8), (1.0, 1.0)]:
        # logits whose tempered softmax is y: a = log_t2(y) (lam = 0)
        assert abs(bi_tempered_logistic_loss(log_t(y, t2), y, t1, t2).item()) < 1e-10


@pytest.mark.parametrize('t1, t2', TEMPERATURES)
@pytest.mark.parametrize('soft', [False, True])
def test_gradcheck(t1, t2, soft):
    torch.manual_seed(1)
    out = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.softmax(torch.randn(4, 5, dtype=torch.float64), -1) if soft else torch.tensor([0, 3, 4, 1])
    for smoothing in (0.0, 0.1):
        assert torch.autograd.gradcheck(
            lambda x: bi_tempered_logistic_loss(x, y, t1, t2, smoothing=smoothing, reduction='none'), (out,))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('t1, t2', [(0.8, 1.2), (1.0, 1.0), (0.5, 0.8), (0.2, 4.0), (0.9, 1.05), (1.0, 1.2)])
def test_extreme_logits_under_autocast_stay_finite(dtype, t1, t2):
    torch.manual_seed(0)
    out = (torch.randint(0, 2, (8, 10)).float() * 2e4 - 1e4).to(dtype).requires_grad_()
    y = torch.randint(0, 10, (8,))
    with torch.autocast('cpu', dtype=dtype):
        loss = BiTemperedLogisticLoss(t1, t2, smoothing=0.1)(out, y)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert out.grad.dtype == dtype and torch.isfinite(out.grad).all()


def test_extreme_float32_logits_without_smoothing():
    out = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]], requires_grad=True)
    y = torch.tensor([1, 2])
    for t1, t2 in [(0.8, 1.2), (1.0, 1.0), (0.5, 0.5)]:
        out.grad = None
        loss = BiTemperedLogisticLoss(t1, t2)(out, y)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(out.grad).all()


def test_reductions():
    out, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    per = BiTemperedLogisticLoss(reduction='none')(out, y)
    assert per.shape == (5,)
    torch.testing.assert_close(BiTemperedLogisticLoss(reduction='sum')(out, y), per.sum())
    torch.testing.assert_close(BiTemperedLogisticLoss()(out, y), per.mean())


def test_runs_under_vmap():
    out, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    crit = BiTemperedLogisticLoss()
    per = torch.func.vmap(lambda o, t: crit(o[None], t[None]))(out, y)
    torch.testing.assert_close(per, BiTemperedLogisticLoss(reduction='none')(out, y))


# ---- with MoEx and Mixup ----

@pytest.mark.parametrize('soft', [False, True])
def test_inside_moex_loss(soft):
    out = torch.randn(6, 5, requires_grad=True)
    y = torch.softmax(torch.randn(6, 5), -1) if soft else torch.randint(0, 5, (6,))
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    crit = BiTemperedLogisticLoss(0.8, 1.2)
    loss = MoExLoss(crit)(out, y, perm, 0.7)
    torch.testing.assert_close(loss, 0.7 * crit(out, y) + 0.3 * crit(out, y[perm]))
    loss.backward()
    assert torch.isfinite(out.grad).all()


def test_with_timm_mixup_soft_targets():
    torch.manual_seed(0)
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=5)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    _, soft = mixup(x, y)
    assert soft.shape == (4, 5) and soft.is_floating_point()
    out = torch.randn(4, 5, requires_grad=True)
    loss = BiTemperedLogisticLoss(0.8, 1.2)(out, soft)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(out.grad).all()
    torch.testing.assert_close(loss.double(), reference_loss(out.detach(), soft, 0.8, 1.2).mean(),
                               rtol=1e-5, atol=1e-6)


# ---- argument checks ----

@pytest.mark.parametrize('kwargs, match', [
    (dict(t1=0.0), 't1 must be .*0.0'),
    (dict(t1=-1), 't1 must be .*-1'),
    (dict(t1=2.0), r't1 must be a number in \(0, 2\).*2.0'),
    (dict(t1=math.nan), 't1 must be .*nan'),
    (dict(t1=True), 't1 must be .*True'),
    (dict(t2=0.0), 't2 must be a number > 0.*0.0'),
    (dict(t2='1.2'), "t2 must be .*'1.2'"),
    (dict(smoothing=1.0), r'smoothing must be a number in \[0, 1\).*1.0'),
    (dict(smoothing=-0.1), 'smoothing must be .*-0.1'),
    (dict(num_iters=0), 'num_iters must be an integer >= 1.*0'),
    (dict(num_iters=2.5), 'num_iters must be .*2.5'),
    (dict(reduction='avg'), "reduction must be .*'avg'"),
])
def test_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BiTemperedLogisticLoss(**kwargs)


def test_targets_are_checked():
    crit = BiTemperedLogisticLoss()
    with pytest.raises(ValueError, match='class-index targets must have shape'):
        crit(torch.randn(4, 3), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match='soft targets must have'):
        crit(torch.randn(4, 3), torch.rand(4, 2))
    with pytest.raises(TypeError, match='torch.bool'):
        crit(torch.randn(4, 3), torch.zeros(4, dtype=torch.bool))


def test_second_derivatives_are_refused_not_wrong():
    out = torch.randn(3, 4, requires_grad=True)
    grad, = torch.autograd.grad(BiTemperedLogisticLoss(0.8, 1.2)(out, torch.tensor([0, 1, 2])), out, create_graph=True)
    with pytest.raises(RuntimeError, match='differentiate twice'):
        grad.sum().backward()


def test_function_checks_its_own_arguments_with_full_messages():
    out, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"^reduction must be 'mean', 'sum' or 'none'; got 'avg'$"):
        bi_tempered_logistic_loss(out, y, 0.8, 1.2, reduction='avg')
    with pytest.raises(ValueError, match=r'^logits must be a floating-point tensor \(\.\.\., num_classes\); '
                                         r'got torch.int64 of shape \(4, 3\)$'):
        bi_tempered_logistic_loss(torch.zeros(4, 3, dtype=torch.long), y, 0.8, 1.2)
    with pytest.raises(ValueError, match=r'^logits must be .* got torch.float32 of shape \(\)$'):
        bi_tempered_logistic_loss(torch.tensor(1.0), torch.tensor(0), 0.8, 1.2)
    with pytest.raises(ValueError, match=r'^class-index targets must have shape \(2, 5\) for logits of shape '
                                         r'\(2, 5, 3\); got \(2,\)$'):
        bi_tempered_logistic_loss(torch.randn(2, 5, 3), torch.zeros(2, dtype=torch.long), 0.8, 1.2)


@pytest.mark.parametrize('t1, t2', [(0.8, 1.2), (0.5, 0.8), (1.0, 1.0)])
@pytest.mark.parametrize('soft', [False, True])
def test_any_leading_shape_is_rows_of_classes(soft, t1, t2):
    """(..., K) logits: a single row (K,) and a (B, N, K) batch give the losses of their rows."""
    torch.manual_seed(0)
    out = torch.randn(2, 5, 4) * 3
    y = torch.softmax(torch.randn(2, 5, 4), -1) if soft else torch.randint(0, 4, (2, 5))
    crit = BiTemperedLogisticLoss(t1, t2, smoothing=0.1, reduction='none')
    flat = out.reshape(10, 4).requires_grad_()
    rows = crit(flat, y.reshape(10, 4) if soft else y.reshape(10))
    rows.sum().backward()
    batch = out.clone().requires_grad_()
    torch.testing.assert_close(crit(batch, y), rows.detach().reshape(2, 5))
    crit(batch, y).sum().backward()
    torch.testing.assert_close(batch.grad, flat.grad.reshape(2, 5, 4))
    torch.testing.assert_close(crit(out[1, 2], y[1, 2]), rows.detach()[7])


@pytest.mark.parametrize('t2', FIXED_POINT_T2 + BISECTION_T2)
def test_the_papers_iterations_alone_reach_the_normalizer(t2, monkeypatch):
    """Without the Newton refinement, enough fixed-point iterations (t2 > 1) or bisection steps (t2 < 1) converge
    on their own: the paper's algorithms, not only their starting point, are right."""
    monkeypatch.setattr(bitempered, '_NEWTON_STEPS', 0)
    torch.manual_seed(0)
    a = torch.randn(3, 4, 10, dtype=torch.float64) * 3  # some classes outside exp_t's support for t2 < 1
    lam = reference_normalizer(a, t2)
    torch.testing.assert_close(tempered_normalizer(a, t2, num_iters=60), lam, rtol=0, atol=1e-11)
    # and the softmax and the loss hand their num_iters on
    torch.testing.assert_close(tempered_softmax(a, t2, num_iters=60), exp_t(a - lam, t2), rtol=0, atol=1e-11)
    y = torch.softmax(torch.randn(3, 4, 10, dtype=torch.float64), -1)
    torch.testing.assert_close(bi_tempered_logistic_loss(a, y, 0.8, t2, num_iters=60, reduction='none'),
                               reference_loss(a, y, 0.8, t2), rtol=0, atol=1e-10)


def test_one_iteration_is_allowed():
    out, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    torch.testing.assert_close(BiTemperedLogisticLoss(num_iters=1)(out, y), BiTemperedLogisticLoss()(out, y))


def test_low_precision_inputs_are_computed_in_float32():
    torch.manual_seed(0)
    out = torch.randn(6, 5).to(torch.bfloat16)
    soft = torch.softmax(torch.randn(6, 5), -1).to(torch.float16)
    hard = torch.randint(0, 5, (6,))
    for target, target32 in ((soft, soft.float()), (hard, hard)):
        loss = bi_tempered_logistic_loss(out, target, 0.8, 1.2)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, bi_tempered_logistic_loss(out.float(), target32, 0.8, 1.2),
                                   rtol=1e-6, atol=1e-7)
    assert bi_tempered_logistic_loss(out.double(), hard, 0.8, 1.2).dtype == torch.float64


def test_defaults_are_the_papers():
    crit = BiTemperedLogisticLoss()
    assert (crit.t1, crit.t2, crit.smoothing, crit.num_iters, crit.reduction) == (0.8, 1.2, 0.0, 5, 'mean')
    for fn in (bi_tempered_logistic_loss, tempered_softmax, tempered_normalizer):
        assert inspect.signature(fn).parameters['num_iters'].default == 5


def test_the_module_passes_its_settings_on(monkeypatch):
    calls = []
    monkeypatch.setattr(bitempered, 'bi_tempered_logistic_loss', lambda *args, **kwargs: calls.append((args, kwargs)))
    out, y = torch.randn(2, 3), torch.tensor([0, 1])
    BiTemperedLogisticLoss(0.7, 1.3, smoothing=0.2, num_iters=3, reduction='sum')(out, y)
    (args, kwargs), = calls
    assert args[0] is out and args[1] is y and args[2:] == (0.7, 1.3)
    assert kwargs == dict(smoothing=0.2, num_iters=3, reduction='sum')


def test_five_iterations_by_default(monkeypatch):
    """The paper's 5 iterations before the Newton refinement (seen with the refinement off)."""
    monkeypatch.setattr(bitempered, '_NEWTON_STEPS', 0)
    torch.manual_seed(0)
    a, y = torch.randn(3, 10, dtype=torch.float64) * 0.5, torch.tensor([0, 4, 9])
    for t2 in (0.5, 1.5):
        assert torch.equal(tempered_normalizer(a, t2), tempered_normalizer(a, t2, num_iters=5))
        assert not torch.equal(tempered_normalizer(a, t2), tempered_normalizer(a, t2, num_iters=6))
        assert torch.equal(tempered_softmax(a, t2), tempered_softmax(a, t2, num_iters=5))
        five = bi_tempered_logistic_loss(a, y, 0.8, t2, num_iters=5)
        assert torch.equal(bi_tempered_logistic_loss(a, y, 0.8, t2), five)
        assert torch.equal(BiTemperedLogisticLoss(0.8, t2)(a, y), five)


# ---- a diverging run, a bad label ----

@pytest.mark.parametrize('bad', [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize('t1, t2', [(0.8, 1.2), (1.0, 1.0), (0.5, 0.5), (0.8, 0.5)])
def test_a_non_finite_logit_gives_a_nan_loss(bad, t1, t2):
    """A diverging run must trip the divergence stop at its first step: no finite loss for such a row."""
    out = torch.randn(3, 4)
    out[1, 2] = bad
    y = torch.tensor([0, 1, 3])
    per = BiTemperedLogisticLoss(t1, t2, reduction='none')(out, y)
    assert torch.isnan(per[1]) and torch.isfinite(per[[0, 2]]).all()
    assert torch.isnan(BiTemperedLogisticLoss(t1, t2)(out, y))
    assert torch.isnan(BiTemperedLogisticLoss(t1, t2)(torch.full((2, 3), math.nan), torch.tensor([0, 2])))


@pytest.mark.parametrize('index', [7, 3, -1])
def test_a_class_index_out_of_range_is_refused(index):
    with pytest.raises(ValueError, match=rf'^target holds class index {index}, outside the 3 classes of the logits: '
                                         r'class indices must be in 0\.\.2$'):
        BiTemperedLogisticLoss()(torch.randn(2, 3), torch.tensor([0, index]))


def test_an_unchecked_class_index_out_of_range_gives_a_nan_row():
    """Where the index cannot be checked without a device synchronization (here vmap), its row is NaN."""
    out, y = torch.randn(3, 4), torch.tensor([0, 4, 2])
    per = torch.func.vmap(lambda o, t: BiTemperedLogisticLoss()(o[None], t[None]))(out, y)
    assert torch.isnan(per[1]) and torch.isfinite(per[[0, 2]]).all()


# ---- the gradient of the authors' released code ----

def released_gradient(a: torch.Tensor, y: torch.Tensor, t1: float, t2: float) -> torch.Tensor:
    """The custom gradient of the authors' released bi_tempered_logistic_loss, written out:
    ``(p - y) p^(t2 - t1) - escort * sum((p - y) p^(t2 - t1))`` with ``escort = p^t2 / sum p^t2`` and 0^0 = 1."""
    p = exp_t(a - reference_normalizer(a, t2), t2)
    forget = (p - y) * torch.pow(p, t2 - t1)
    escort = p.pow(t2) / p.pow(t2).sum(-1, keepdim=True)
    return forget - escort * forget.sum(-1, keepdim=True)


@pytest.mark.parametrize('t1, t2', [(0.5, 0.5), (0.8, 0.8), (0.3, 0.3), (0.5, 0.8), (0.8, 1.2), (1.0, 1.5)])
@pytest.mark.parametrize('soft', [False, True])
def test_gradient_is_the_released_codes_also_outside_the_support(t1, t2, soft):
    """Row 0's label, row 1's soft mass lie outside the support of the tempered softmax when t2 < 1; there
    the released code's gradient is -y for t1 = t2 (the loss itself is flat)."""
    out = torch.tensor([[10.0, 0.0, -10.0, 1.0], [0.5, -0.3, 0.2, 0.1], [-12.0, 9.0, 0.0, 3.0]],
                       dtype=torch.float64, requires_grad=True)
    y = torch.tensor([2, 1, 0])
    target = F.one_hot(y, 4).double()
    if soft:
        target = 0.7 * target + 0.1
    loss = bi_tempered_logistic_loss(out, target if soft else y, t1, t2, reduction='sum')
    grad, = torch.autograd.grad(loss, out)
    torch.testing.assert_close(grad, released_gradient(out.detach(), target, t1, t2), rtol=1e-7, atol=1e-9)
    if t1 == t2 and not soft:
        assert grad[0, 2].item() == pytest.approx(-1.0)
