import re

import pytest
import torch

from timm_moex import MOEX_NORMS, mix_moments, moment_exchange, moment_shape, perturb_moments
from timm_moex.ops.moex import parse_norm

NORMS = ['pono', 'in', 'ln', 'gn2', 'gn-d4', 'gpono2', 'gn1', 'gpono4']


def reference_nchw(x: torch.Tensor, perm: torch.Tensor, norm: str, eps: float = 1e-5) -> torch.Tensor:
    """The MoEx formula (Li et al., 2021) in float64, written with explicit reshapes to (B, rows, K) where each
    row's K elements share one mean and std."""
    x = x.double()
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    flat = x.reshape(b, c, -1)  # (B, C, P)
    p = flat.shape[-1]
    if norm == 'pono':
        rows = flat.transpose(1, 2)  # (B, P, C)
    elif norm == 'in':
        rows = flat  # (B, C, P)
    elif norm == 'ln':
        rows = flat.reshape(b, 1, c * p)
    elif norm.startswith('gn-d'):
        d = int(norm[4:])
        rows = flat.reshape(b, c // d, d * p)
    elif norm.startswith('gpono'):
        g = int(norm[5:])
        rows = flat.reshape(b, g, c // g, p).permute(0, 1, 3, 2).reshape(b, g * p, c // g)
    elif norm.startswith('gn'):
        g = int(norm[2:])
        rows = flat.reshape(b, g, (c // g) * p)
    mean = rows.mean(-1, keepdim=True)
    std = (rows.var(-1, keepdim=True, unbiased=True) + eps).sqrt()
    out = (rows - mean) / std * std[perm] + mean[perm]
    if norm == 'pono':
        out = out.transpose(1, 2)
    elif norm.startswith('gpono'):
        g = int(norm[5:])
        out = out.reshape(b, g, p, c // g).permute(0, 1, 3, 2)
    return out.reshape(b, c, *spatial)


@pytest.fixture
def perm():
    return torch.tensor([2, 0, 3, 1, 1])


# float64 input checks the formula itself; float32 input checks the float32 statistics path
# (small groups such as gpono4's two channels make the normalization ill-conditioned).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-3}


@pytest.mark.parametrize('dtype', TOLERANCE)
@pytest.mark.parametrize('norm', NORMS)
def test_matches_reference_nchw(norm, dtype, perm):
    x = (torch.randn(5, 8, 6, 7) * 3 + 1).to(dtype)
    out = moment_exchange(x, perm, norm=norm)
    assert out.dtype == x.dtype and out.shape == x.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), reference_nchw(x, perm, norm), rtol=tol, atol=tol)


@pytest.mark.parametrize('dtype', TOLERANCE)
@pytest.mark.parametrize('norm', NORMS)
def test_matches_reference_nhwc_and_tokens(norm, dtype, perm):
    tol = TOLERANCE[dtype]
    x = torch.randn(5, 8, 6, 7, dtype=dtype)
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    out = moment_exchange(nhwc, perm, norm=norm, channel_dim=-1)
    torch.testing.assert_close(out.double(), reference_nchw(x, perm, norm).permute(0, 2, 3, 1), rtol=tol, atol=tol)

    tokens = torch.randn(5, 11, 8, dtype=dtype)  # (B, N, C)
    out = moment_exchange(tokens, perm, norm=norm, channel_dim=-1)
    expected = reference_nchw(tokens.transpose(1, 2), perm, norm).transpose(1, 2)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize('norm', NORMS)
def test_identity_permutation_returns_input(norm):
    x = torch.randn(4, 8, 5, 5) * 2 - 1
    torch.testing.assert_close(moment_exchange(x, torch.arange(4), norm=norm), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('norm', NORMS)
def test_channels_last_equals_contiguous_and_keeps_format(norm, perm):
    x = torch.randn(5, 8, 6, 7)
    cl = x.to(memory_format=torch.channels_last)
    out = moment_exchange(cl, perm, norm=norm)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, moment_exchange(x, perm, norm=norm))
    assert moment_exchange(x, perm, norm=norm).is_contiguous()


def test_pono_gives_each_position_the_donor_moments(perm):
    x = torch.randn(5, 16, 4, 4, dtype=torch.float64)
    out = moment_exchange(x, perm, eps=0.0)
    torch.testing.assert_close(out.mean(1), x.mean(1)[perm])
    torch.testing.assert_close(out.std(1), x.std(1)[perm])


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_is_finite_and_close_to_fp32(dtype, perm):
    x = torch.randn(5, 16, 8, 8) * 4 + 2
    out = moment_exchange(x.to(dtype), perm)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    expected = moment_exchange(x.to(dtype).float(), perm)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_float64_stays_float64(perm):
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    assert moment_exchange(x, perm).dtype == torch.float64


@pytest.mark.parametrize('norm', ['pono', 'in', 'ln', 'gn2', 'gn-d2', 'gpono2'])
def test_gradcheck(norm):
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    perm = torch.tensor([1, 2, 0])
    assert torch.autograd.gradcheck(lambda t: moment_exchange(t, perm, norm=norm), (x,))


def test_detach_treats_donor_moments_as_constants():
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    perm = torch.tensor([1, 2, 0])
    weights = torch.randn_like(x)
    (grad,) = torch.autograd.grad((moment_exchange(x, perm, detach=True) * weights).sum(), x)

    mean = x.mean(1, keepdim=True)
    std = (x.var(1, keepdim=True) + 1e-5).sqrt()
    by_hand = (x - mean) / std * std[perm].detach() + mean[perm].detach()
    (expected,) = torch.autograd.grad((by_hand * weights).sum(), x)
    torch.testing.assert_close(grad, expected)


def test_gradients_flow_through_donor_moments_unless_detached():
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    perm = torch.tensor([1, 0])
    for detach, donor_grad_is_zero in [(False, False), (True, True)]:
        (grad,) = torch.autograd.grad(moment_exchange(x, perm, detach=detach)[0].pow(2).sum(), x)
        assert (grad[1].abs().max() == 0) == donor_grad_is_zero
        assert grad[0].abs().max() > 0


def test_batch_of_one():
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(moment_exchange(x, torch.zeros(1, dtype=torch.long)), x, rtol=1e-5, atol=1e-5)


def test_int32_perm_is_accepted(perm):
    x = torch.randn(5, 8, 2, 2)
    torch.testing.assert_close(moment_exchange(x, perm.int()), moment_exchange(x, perm))


USE = "Use one of pono, in, ln, gnG, gn-dD, gponoG (PONO, 'pono', is the paper's default)."
CHANNEL_DIM = 'is not a channel dimension of a tensor of shape (2, 4, 3, 3); use 1 (NCHW, the default) or -1 (NHWC and tokens)'


@pytest.mark.parametrize('x, perm, kwargs, error, message', [
    ((2, 4, 3, 3), [1, 0], dict(norm='bn'), ValueError,
     "norm='bn' is not supported: batch-norm statistics are shared by every sample of the batch, so exchanging "
     f"them between samples would change nothing. {USE}"),
    ((2, 4, 3, 3), [1, 0], dict(norm='bogus'), ValueError,
     "Unknown MoEx norm 'bogus'; valid norms are pono, in, ln, gnG, gn-dD, gponoG (G groups, or groups of D "
     "channels, as positive integers, e.g. gn4, gn-d16, gpono2)."),
    ((2, 8, 3, 3), [1, 0], dict(norm='gn3'), ValueError,
     "norm='gn3' needs the channel count to be a multiple of 3; got 8 channels"),
    ((2, 8, 3, 3), [1, 0], dict(norm='gn-d3'), ValueError,
     "norm='gn-d3' needs the channel count to be a multiple of 3; got 8 channels"),
    ((2, 8, 3, 3), [1, 0], dict(norm='gpono3'), ValueError,
     "norm='gpono3' needs the channel count to be a multiple of 3; got 8 channels"),
    ((2, 4, 3, 3), [1, 0, 2], {}, ValueError,
     'perm must have shape (2,), one donor index per sample of the batch; got shape (3,)'),
    ((2, 4, 3, 3), [[1, 0]], {}, ValueError,
     'perm must have shape (2,), one donor index per sample of the batch; got shape (1, 2)'),
    ((2, 4, 3, 3), torch.tensor([1.0, 0.0]), {}, TypeError,
     'perm must hold integer indices (torch.int64 or torch.int32); got torch.float32'),
    ((2, 4, 3, 3), (1, 0), {}, TypeError, 'perm must be a tensor of sample indices; got tuple'),
    ((2, 4, 3, 3), [1, 0], dict(channel_dim=0), ValueError, f'channel_dim=0 {CHANNEL_DIM}'),
    ((2, 4, 3, 3), [1, 0], dict(channel_dim=4), ValueError, f'channel_dim=4 {CHANNEL_DIM}'),
    ((2, 4, 3, 3), [1, 0], dict(channel_dim=-5), ValueError, f'channel_dim=-5 {CHANNEL_DIM}'),
    ((2, 4, 3, 3), [1, 0], dict(channel_dim=-4), ValueError, f'channel_dim=-4 {CHANNEL_DIM}'),
    (torch.ones(2, 4, 3, 3, dtype=torch.long), [1, 0], {}, TypeError,
     'moment_exchange needs floating-point features; got torch.int64'),
    ((4,), [1, 0], {}, ValueError, 'moment_exchange needs a batched tensor of rank >= 2; got shape (4,)'),
    ((2, 1, 3, 3), [1, 0], {}, ValueError,
     "norm='pono' reduces over 1 element per sample for shape (2, 1, 3, 3): an unbiased variance needs at least 2"),
    ((2, 4), [1, 0], dict(norm='in'), ValueError,
     "norm='in' needs dimensions besides batch and channels; got shape (2, 4)"),
    ((2, 4, 1, 1), [1, 0], dict(norm='in'), ValueError,
     "norm='in' reduces over 1 element per sample for shape (2, 4, 1, 1): an unbiased variance needs at least 2"),
])
def test_refusals_say_what_is_wrong_in_full(x, perm, kwargs, error, message):
    x = x if isinstance(x, torch.Tensor) else torch.randn(x)
    perm = torch.tensor(perm) if isinstance(perm, list) else perm
    with pytest.raises(error, match='^' + re.escape(message) + '$'):
        moment_exchange(x, perm, **kwargs)


@pytest.mark.parametrize('norm', ['bogus', 'gn0', 'gn-d0', 'gn', 'PONO', 'gpono'])
def test_unknown_norm_lists_the_valid_ones(norm):
    with pytest.raises(ValueError) as err:
        moment_exchange(torch.randn(2, 4, 3, 3), torch.tensor([1, 0]), norm=norm)
    assert repr(norm) in str(err.value)
    for valid in MOEX_NORMS:
        assert valid in str(err.value)


@pytest.mark.filterwarnings('ignore:var_mean')  # torch's remark on a mean of no elements
@pytest.mark.parametrize('norm', NORMS)
def test_an_empty_batch_passes_through(norm):
    """A batch of no samples (a last, empty shard) gives an empty output and gradient, not a division by zero."""
    x = torch.randn(0, 8, 3, 3, requires_grad=True)
    out = moment_exchange(x, torch.zeros(0, dtype=torch.long), norm=norm, impl='torch')
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape


def test_flat_features_exchange_over_their_channels():
    """(B, C) features: PONO's moments are each sample's mean and std over its C values."""
    torch.manual_seed(0)
    x, perm = torch.randn(3, 8, dtype=torch.float64) * 2 + 1, torch.tensor([2, 0, 1])
    mean, std = x.mean(1, keepdim=True), (x.var(1, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(moment_exchange(x, perm), (x - mean) / std * std[perm] + mean[perm])


def test_parse_norm_names_the_kind_and_its_grouping():
    assert [parse_norm(n) for n in ('pono', 'in', 'ln', 'gn4', 'gpono2', 'gn-d16', 'gn-d1', 'gn1')] == [
        ('pono', 0, 0), ('in', 0, 0), ('ln', 0, 0), ('gn', 4, 0), ('gpono', 2, 0), ('gn', 0, 16), ('gn', 0, 1),
        ('gn', 1, 0)]


def test_every_reduced_dimension_counts_towards_the_two_elements():
    x = torch.randn(2, 4, 3, 1)  # instance norm over 3 x 1 positions: 3 elements each
    assert moment_exchange(x, torch.tensor([1, 0]), norm='in').shape == x.shape


@pytest.mark.parametrize('norm', ['pono', 'gn2', 'gn-d4', 'gpono2'])
def test_the_moment_ops_trace_into_one_graph(norm):
    """torch.compile(fullgraph=True) traces MoEx, MixStyle and DSU, forward and backward, with no graph break.

    The model compiles are slow tests; this one keeps Python the tracer cannot follow out of
    the op in the fast subset too.
    """
    x = torch.randn(4, 8, 3, 3, requires_grad=True)
    perm, weight = torch.tensor([1, 2, 3, 0]), torch.rand(4)
    shape = moment_shape(x, norm)
    noise = torch.randn(shape), torch.randn(shape)

    def ops(t):
        return (moment_exchange(t, perm, norm=norm, impl='torch'), mix_moments(t, perm, weight, norm=norm),
                perturb_moments(t, *noise, norm=norm))

    compiled = torch.compile(ops, fullgraph=True, backend='eager')
    outs, expected = compiled(x), ops(x)
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(sum(o.square().sum() for o in outs), x)
    torch.testing.assert_close(grads, torch.autograd.grad(sum(o.square().sum() for o in expected), x))


def _ops(x, perm, **kwargs):
    """MoEx and MixStyle on the same pairing (the two ops that take one)."""
    return (lambda: moment_exchange(x, perm, **kwargs), lambda: mix_moments(x, perm, torch.rand(x.shape[0]), **kwargs))


@pytest.mark.parametrize('eps', [-1.0, -1e-9, float('inf'), float('nan'), True, '1e-5'])
def test_a_negative_or_non_finite_eps_is_refused_in_one_line(eps):
    """A negative eps gave NaN features; the ops refuse it as the hook and the command line do."""
    x = torch.randn(4, 8, 3, 3)
    message = f'eps must be a finite number >= 0 (it is added to the variance); got {eps!r}'
    noise = torch.randn(moment_shape(x, 'in'))
    for op in _ops(x, torch.tensor([1, 2, 3, 0]), eps=eps) + (lambda: perturb_moments(x, noise, noise, eps=eps),):
        with pytest.raises(ValueError, match='^' + re.escape(message) + '$'):
            op()


def test_eps_zero_is_accepted():
    x = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    assert torch.isfinite(moment_exchange(x, torch.tensor([1, 2, 3, 0]), eps=0)).all()


def test_a_perm_on_another_device_is_refused():
    """A perm on the meta device gave values that changed from call to call."""
    x = torch.randn(4, 8, 3, 3)
    for op in _ops(x, torch.tensor([1, 2, 3, 0], device='meta')):
        with pytest.raises(ValueError, match=r'^perm is on meta, the features on cpu: put perm on cpu$'):
            op()


@pytest.mark.parametrize('perm, message', [
    ([1, 2, 3, 4], 'perm[3] = 4 is not a sample of the batch of 4'),
    ([1, 9, 3, 0], 'perm[1] = 9 is not a sample of the batch of 4'),
    ([1, 2, -5, 0], 'perm[2] = -5 is not a sample of the batch of 4'),
])
def test_a_donor_index_out_of_range_names_perm_its_value_and_the_batch(perm, message):
    x = torch.randn(4, 8, 3, 3)
    for op in _ops(x, torch.tensor(perm)):
        with pytest.raises(ValueError, match='^' + re.escape(message) + r': donor indices must be in 0\.\.3 '
                                             r'\(or -4\.\.-1, from the end\)$'):
            op()


def test_negative_donor_indices_count_from_the_end():
    x, perm = torch.randn(4, 8, 3, 3), torch.tensor([1, -1, -4, 2])
    torch.testing.assert_close(moment_exchange(x, perm), moment_exchange(x, perm % 4))


@pytest.mark.parametrize('op', ['exchange', 'mix'])
def test_donors_counted_from_the_end_give_the_same_values_and_gradients(op):
    """perm may count from the end, as indexing does; the backward's index_add_ does not, so perm is taken mod B."""
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    negative = torch.tensor([-3, 0, 4, -4, 1])
    weight = torch.rand(5, dtype=torch.float64)
    results = []
    for perm in (negative, negative.remainder(5)):
        out = moment_exchange(x, perm, impl='torch') if op == 'exchange' else mix_moments(x, perm, weight)
        results.append((out, *torch.autograd.grad((out ** 2).sum(), x)))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
