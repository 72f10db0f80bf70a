import pytest
import torch

from timm_moex import MOEX_NORMS, moment_exchange

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


def test_bn_is_refused_with_the_reason():
    with pytest.raises(ValueError, match='shared by every sample'):
        moment_exchange(torch.randn(2, 4, 3, 3), torch.tensor([1, 0]), norm='bn')


@pytest.mark.parametrize('norm', ['bogus', 'gn0', 'gn-d0', 'gn', 'PONO', 'gpono'])
def test_unknown_norm_lists_the_valid_ones(norm):
    with pytest.raises(ValueError) as err:
        moment_exchange(torch.randn(2, 4, 3, 3), torch.tensor([1, 0]), norm=norm)
    assert repr(norm) in str(err.value)
    for valid in MOEX_NORMS:
        assert valid in str(err.value)


def test_group_count_must_divide_channels():
    with pytest.raises(ValueError, match='multiple of 3'):
        moment_exchange(torch.randn(2, 8, 3, 3), torch.tensor([1, 0]), norm='gn3')
    with pytest.raises(ValueError, match='multiple of 3'):
        moment_exchange(torch.randn(2, 8, 3, 3), torch.tensor([1, 0]), norm='gn-d3')


@pytest.mark.parametrize('bad, error, match', [
    (torch.tensor([1, 0, 2]), ValueError, r'shape \(2,\)'),
    (torch.tensor([[1, 0]]), ValueError, r'shape \(2,\)'),
    (torch.tensor([1.0, 0.0]), TypeError, 'integer'),
    ([1, 0], TypeError, 'tensor'),
])
def test_bad_perm_is_refused(bad, error, match):
    with pytest.raises(error, match=match):
        moment_exchange(torch.randn(2, 4, 3, 3), bad)


def test_bad_tensors_are_refused():
    perm = torch.tensor([1, 0])
    with pytest.raises(ValueError, match='channel_dim=0'):
        moment_exchange(torch.randn(2, 4, 3, 3), perm, channel_dim=0)
    with pytest.raises(ValueError, match='channel_dim=4'):
        moment_exchange(torch.randn(2, 4, 3, 3), perm, channel_dim=4)
    with pytest.raises(TypeError, match='floating'):
        moment_exchange(torch.ones(2, 4, 3, 3, dtype=torch.long), perm)
    with pytest.raises(ValueError, match='at least 2'):
        moment_exchange(torch.randn(2, 1, 3, 3), perm, norm='pono')
