"""MixStyle and DSU: the operations against their formulas, and the hooks on several layers."""
import copy

import pytest
import timm
import torch
from timm.data import Mixup

import timm_moex
from timm_moex import (MoExClassificationTask, MoExMixing, attach_dsu, attach_mixstyle, attach_moex, dsu_layers,
                       get_dsu_hook, get_mixstyle_hook, mix_moments, mixstyle_layers, moment_exchange, moment_shape,
                       perturb_moments)
from timm_moex.ops.moments import moment_view, replace_moments

from helpers import freeze_batch_stats, make

NORMS = ['in', 'pono', 'gn2', 'ln']
LAYOUTS = ['nchw', 'channels_last', 'nhwc', 'tokens']


# ---------------------------------------------------------------- the operations, against the formulas in float64

def rows_of(x: torch.Tensor, norm: str) -> torch.Tensor:
    """(B, R, K) float64 from (B, C, *positions): each of the R rows holds the K elements of one statistic."""
    b, c = x.shape[:2]
    flat = x.double().reshape(b, c, -1)
    if norm == 'in':
        return flat
    if norm == 'pono':
        return flat.transpose(1, 2)
    if norm == 'ln':
        return flat.reshape(b, 1, -1)
    groups = int(norm[2:])
    return flat.reshape(b, groups, -1)


def from_rows(rows: torch.Tensor, norm: str, shape) -> torch.Tensor:
    return (rows.transpose(1, 2) if norm == 'pono' else rows).reshape(shape)


def moments_of(rows, eps):
    return rows.mean(-1, keepdim=True), (rows.var(-1, keepdim=True, unbiased=True) + eps).sqrt()


def mixstyle_reference(x, perm, weight, norm, eps=1e-6):
    """MixStyle (Zhou et al., 2021) in float64 on a channels-first x."""
    rows = rows_of(x, norm)
    mean, std = moments_of(rows, eps)
    w = weight.double().reshape(-1, 1, 1)
    mean_mix = w * mean + (1 - w) * mean[perm]
    std_mix = w * std + (1 - w) * std[perm]
    return from_rows((rows - mean) / std * std_mix + mean_mix, norm, x.shape)


def dsu_reference(x, noise_mean, noise_std, norm, eps=1e-6):
    """DSU (Li et al., 2022) in float64 on a channels-first x; noise of shape (B, R)."""
    rows = rows_of(x, norm)
    mean, std = moments_of(rows, eps)
    spread_mean = (mean.var(0, keepdim=True, unbiased=True) + eps).sqrt()
    spread_std = (std.var(0, keepdim=True, unbiased=True) + eps).sqrt()
    new_mean = mean + noise_mean.double().unsqueeze(-1) * spread_mean
    new_std = std + noise_std.double().unsqueeze(-1) * spread_std
    return from_rows((rows - mean) / std * new_std + new_mean, norm, x.shape)


def in_layout(x: torch.Tensor, layout: str):
    """x (channels first) in ``layout``, its channel_dim, and how to bring a result back to channels first."""
    if layout == 'nchw':
        return x, 1, lambda t: t
    if layout == 'channels_last':
        return x.to(memory_format=torch.channels_last), 1, lambda t: t
    if layout == 'nhwc':
        return x.permute(0, 2, 3, 1).contiguous(), -1, lambda t: t.permute(0, 3, 1, 2)
    return x.transpose(1, 2).contiguous(), -1, lambda t: t.transpose(1, 2)  # tokens (B, N, C) from (B, C, N)


def features(layout, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (5, 8, 11) if layout == 'tokens' else (5, 8, 6, 7)
    return (torch.randn(shape, generator=g) * 3 + 1).to(dtype)


PERM = torch.tensor([2, 0, 3, 1, 1])
WEIGHT = torch.tensor([0.0, 0.3, 0.9, 1.0, 0.5])
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.mark.parametrize('dtype', TOLERANCE)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('norm', NORMS)
def test_mix_moments_matches_the_formula(norm, layout, dtype):
    x = features(layout, dtype)
    xl, channel_dim, back = in_layout(x, layout)
    out = mix_moments(xl, PERM, WEIGHT, norm=norm, channel_dim=channel_dim)
    assert out.dtype == dtype and out.shape == xl.shape and out.stride() == xl.stride()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(back(out).double(), mixstyle_reference(x, PERM, WEIGHT, norm), rtol=tol, atol=tol)


@pytest.mark.parametrize('dtype', TOLERANCE)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('norm', NORMS)
def test_perturb_moments_matches_the_formula(norm, layout, dtype):
    x = features(layout, dtype)
    xl, channel_dim, back = in_layout(x, layout)
    shape = moment_shape(xl, norm, channel_dim)
    assert shape == moment_shape(x, norm), 'one noise shape whatever the layout'
    g = torch.Generator().manual_seed(1)
    noise_mean, noise_std = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    out = perturb_moments(xl, noise_mean, noise_std, norm=norm, channel_dim=channel_dim)
    assert out.dtype == dtype and out.shape == xl.shape and out.stride() == xl.stride()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(back(out).double(), dsu_reference(x, noise_mean, noise_std, norm), rtol=tol, atol=tol)


def test_moment_shape_is_one_moment_per_channel_for_instance_norm():
    assert moment_shape(torch.randn(3, 16, 5, 5)) == (3, 16)
    assert moment_shape(torch.randn(3, 5, 5, 16), channel_dim=-1) == (3, 16)
    assert moment_shape(torch.randn(3, 7, 16), channel_dim=-1) == (3, 16)
    assert moment_shape(torch.randn(3, 16, 5, 5), 'pono') == (3, 25)
    assert moment_shape(torch.randn(3, 16, 5, 5), 'gn4') == (3, 4)


@pytest.mark.parametrize('layout', LAYOUTS)
def test_weight_zero_is_moment_exchange_with_instance_norm(layout):
    """Same moments as MoEx; MoEx's default eps is 1e-5 and MixStyle's 1e-6, so both are given 1e-6."""
    x, channel_dim, _ = in_layout(features(layout, torch.float64), layout)
    g = torch.randn_like(x)
    results = []
    for op in (lambda t: mix_moments(t, PERM, torch.zeros(5, dtype=torch.float64), channel_dim=channel_dim,
                                     detach=False),
               lambda t: moment_exchange(t, PERM, norm='in', eps=1e-6, channel_dim=channel_dim)):
        t = x.clone().requires_grad_()
        out = op(t)
        out.backward(g)
        results.append((out.detach(), t.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('layout', LAYOUTS)
def test_weight_one_and_zero_noise_return_the_input(layout):
    x, channel_dim, _ = in_layout(features(layout), layout)
    torch.testing.assert_close(mix_moments(x, PERM, torch.ones(5), channel_dim=channel_dim), x, rtol=0, atol=1e-6)
    zeros = torch.zeros(moment_shape(x, 'in', channel_dim))
    torch.testing.assert_close(perturb_moments(x, zeros, zeros, channel_dim=channel_dim), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('norm', ['in', 'pono', 'gn2', 'ln'])
def test_gradcheck(norm):
    """The hand-written backward against finite differences (detach=True is not the true gradient, on purpose)."""
    x = torch.randn(4, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    perm, weight = torch.tensor([1, 2, 0, 0]), torch.tensor([0.2, 0.7, 0.0, 1.0], dtype=torch.float64)
    noise = torch.randn(2, *moment_shape(x, norm), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: mix_moments(t, perm, weight, norm=norm, detach=False), (x,))
    assert torch.autograd.gradcheck(lambda t: perturb_moments(t, noise[0], noise[1], norm=norm), (x,))


def test_gradients_are_the_authors():
    """MixStyle's code detaches the statistics; DSU's lets gradients flow through them and their batch spreads."""
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    perm, weight = torch.tensor([1, 2, 3, 0]), torch.tensor([0.2, 0.7, 0.1, 0.9], dtype=torch.float64)
    noise = torch.randn(2, 4, 6, dtype=torch.float64)
    g = torch.randn_like(x)

    def by_autograd(reference, *args):
        (grad,) = torch.autograd.grad((reference(x, *args, 'in') * g).sum(), x)
        return grad

    def mixstyle_detached(t, perm, weight, norm):
        mean = t.mean((2, 3), keepdim=True).detach()
        std = (t.var((2, 3), keepdim=True) + 1e-6).sqrt().detach()
        w = weight.reshape(-1, 1, 1, 1)
        return (t - mean) / std * (w * std + (1 - w) * std[perm]) + w * mean + (1 - w) * mean[perm]

    (grad,) = torch.autograd.grad((mix_moments(x, perm, weight) * g).sum(), x)
    torch.testing.assert_close(grad, by_autograd(mixstyle_detached, perm, weight))
    (grad,) = torch.autograd.grad((mix_moments(x, perm, weight, detach=False) * g).sum(), x)
    torch.testing.assert_close(grad, by_autograd(mixstyle_reference, perm, weight))
    (grad,) = torch.autograd.grad((perturb_moments(x, noise[0], noise[1]) * g).sum(), x)
    torch.testing.assert_close(grad, by_autograd(dsu_reference, noise[0], noise[1]))

    # detach=True: the statistics are constants, the gradient is g * std' / std
    (grad,) = torch.autograd.grad((perturb_moments(x, noise[0], noise[1], detach=True) * g).sum(), x)
    std = (x.var((2, 3), keepdim=True) + 1e-6).sqrt().detach()
    new_std = std + noise[1].reshape(4, 6, 1, 1) * (std.var(0, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(grad, g * new_std / std)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_keeps_the_dtype_with_float32_statistics(dtype):
    x = torch.randn(5, 16, 8, 8) * 4 + 2
    noise = torch.randn(2, 5, 16)
    with torch.autocast('cpu', dtype=dtype):
        mixed = mix_moments(x.to(dtype), PERM, WEIGHT)
        perturbed = perturb_moments(x.to(dtype), noise[0], noise[1])
    for out, expected in ((mixed, mix_moments(x.to(dtype).float(), PERM, WEIGHT)),
                          (perturbed, perturb_moments(x.to(dtype).float(), noise[0], noise[1]))):
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=5e-2)


def test_bad_arguments_are_refused():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r'weight .*shape \(2,\)'):
        mix_moments(x, torch.tensor([1, 0]), torch.ones(3))
    with pytest.raises(TypeError, match='integer'):
        mix_moments(x, torch.tensor([1.0, 0.0]), torch.ones(2))
    with pytest.raises(ValueError, match=r'noise_std .*\(2, 4\)'):
        perturb_moments(x, torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match='at least 2 samples'):
        perturb_moments(x[:1], torch.zeros(1, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match='shared by every sample'):
        mix_moments(x, torch.tensor([1, 0]), torch.ones(2), norm='bn')
    with pytest.raises(ValueError, match='at least 2'):
        mix_moments(torch.randn(2, 4, 1, 1), torch.tensor([1, 0]), torch.ones(2))


def test_errors_name_the_operation_and_the_argument():
    x, perm = torch.randn(2, 4, 3, 3), torch.tensor([1, 0])
    for weight in (0.5, torch.ones(2, dtype=torch.int64), torch.ones(2, 1)):  # a number, integers, a wrong shape
        with pytest.raises(ValueError, match=r'^weight must be a floating tensor of shape \(2,\), one per sample'):
            mix_moments(x, perm, weight)
    with pytest.raises(ValueError, match=r'^mix_moments needs a batched tensor'):
        mix_moments(torch.randn(4), perm, torch.ones(2))
    with pytest.raises(ValueError, match=r'^moment_shape needs a batched tensor of rank >= 2; got shape \(4,\)$'):
        moment_shape(torch.randn(4))
    with pytest.raises(ValueError, match=r'^perturb_moments needs a batched tensor'):
        perturb_moments(torch.randn(4), torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"^noise_mean must be a tensor of shape \(2, 4\) \(moment_shape\(x, 'in'\)\)"):
        perturb_moments(x, torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r'^noise_std must be a tensor'):
        perturb_moments(x, torch.zeros(2, 4), [0.0] * 8)


# ---------------------------------------------------------------- the hooks

@pytest.mark.parametrize('name, mixstyle, dsu', [
    # the authors' placements: MixStyle after layer1 and layer2; DSU after conv1, maxpool and every stage
    ('resnet18', ['layer1', 'layer2'], ['conv1', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4']),
    ('resnet50', ['layer1', 'layer2'], ['conv1', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4']),
    # the CIFAR models' stems have no max pooling: the stem ends at act1 (bn1 for PyramidNet)
    ('resnet18_cifar', ['layer1', 'layer2'], ['conv1', 'act1', 'layer1', 'layer2', 'layer3', 'layer4']),
    ('pyramidnet110_a48', ['layer1', 'layer2'], ['conv1', 'bn1', 'layer1', 'layer2', 'layer3']),
    ('convnext_atto', ['stages.0', 'stages.1'], ['stem.0', 'stem', 'stages.0', 'stages.1', 'stages.2', 'stages.3']),
])
def test_default_layers(name, mixstyle, dsu):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert mixstyle_layers(model) == mixstyle
    assert dsu_layers(model) == dsu


@pytest.mark.parametrize('attach', [attach_mixstyle, attach_dsu])
def test_hooks_change_training_forwards_only(attach):
    model, x = make()
    freeze_batch_stats(model)
    plain_train = model(x)
    model.eval()
    plain_eval = model(x)

    hook = attach(model, p=1.0)
    assert hook.attached and (get_mixstyle_hook(model) if attach is attach_mixstyle else get_dsu_hook(model)) is hook
    torch.testing.assert_close(model(x), plain_eval, rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(x), plain_train, atol=1e-3)
    hook.p = 0.0
    torch.testing.assert_close(model(x), plain_train, rtol=0, atol=0)

    hook.remove()
    assert not hook.attached and get_mixstyle_hook(model) is None and get_dsu_hook(model) is None
    assert all(not m._forward_hooks for m in model.modules())
    hook.p = 1.0
    torch.testing.assert_close(model(x), plain_train, rtol=0, atol=0)
    attach(model)  # attachable again


def spy(module):
    """The output a module's earlier hooks leave, and the one its hooks return in the end."""
    seen = {}
    module.register_forward_hook(lambda m, a, out: seen.__setitem__('before', out.detach().clone()), prepend=True)
    module.register_forward_hook(lambda m, a, out: seen.__setitem__('after', out.detach().clone()))
    return seen


def test_hook_output_is_the_operation_on_the_authors_draws():
    model, x = make()
    freeze_batch_stats(model)
    attach_mixstyle(model, layers=['layer1'], p=1.0)
    attach_dsu(model, layers=['layer2'], p=1.0)
    seen1, seen2 = spy(model.layer1), spy(model.layer2)
    torch.manual_seed(0)
    model(x)

    torch.manual_seed(0)  # the draws in the order the hooks make them: weights, pairing, then noise
    weight = torch.distributions.Beta(torch.tensor(0.1), torch.tensor(0.1)).sample((4,))
    perm = torch.randperm(4)
    noise = torch.randn(2, 4, 128)
    torch.testing.assert_close(seen1['after'], mix_moments(seen1['before'], perm, weight))
    torch.testing.assert_close(seen2['after'], perturb_moments(seen2['before'], noise[0], noise[1]))


def test_composes_with_a_moex_hook_at_the_stem():
    model, x = make()
    freeze_batch_stats(model)
    moex = attach_moex(model)
    attach_dsu(model, layers=['maxpool'], p=1.0)
    attach_mixstyle(model, p=1.0)
    seen = spy(model.maxpool)
    perm = torch.tensor([3, 2, 1, 0])
    moex.arm(perm)
    torch.manual_seed(0)
    model(x)
    assert not moex.armed
    torch.manual_seed(0)
    noise = torch.randn(2, 4, 64)
    expected = perturb_moments(moment_exchange(seen['before'], perm), noise[0], noise[1])
    torch.testing.assert_close(seen['after'], expected)


def test_composes_with_mixup_cutmix_and_a_moex_task():
    model, x = make()
    hook = attach_moex(model)
    attach_mixstyle(model, p=1.0)
    attach_dsu(model, p=1.0)
    task = MoExClassificationTask(model, MoExMixing(hook, prob=1.0), verbose=False)
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=10, label_smoothing=0.0)
    images, targets = mixup(x, torch.tensor([0, 1, 2, 3]))
    result = task(images, targets)
    assert result['moex'] and torch.isfinite(result['loss'])
    result['loss'].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize('attach', [attach_mixstyle, attach_dsu])
def test_reproducible_under_manual_seed(attach):
    model, x = make()
    freeze_batch_stats(model)
    attach(model)  # p = 0.5: the coins are drawn too
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.equal(outs[0], outs[2])


def test_cross_domain_pairing_never_pairs_one_domain():
    model, _ = make()
    hook = attach_mixstyle(model, mix='crossdomain')
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        domains = torch.randint(0, 3, (12,), generator=g)
        if (domains == domains[0]).all():
            continue
        hook.set_domains(domains)
        perm = hook.pairing(12)
        assert (domains[perm] != domains).all()
    hook.set_domains(None)  # the authors' batches: two halves from two domains
    for _ in range(20):
        perm = hook.pairing(8)
        assert (perm[:4] >= 4).all() and (perm[4:] < 4).all() and len(set(perm.tolist())) == 8

    with pytest.raises(ValueError, match='odd batch'):
        hook.pairing(7)
    hook.set_domains(torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match='two domains'):
        hook.pairing(6)
    with pytest.raises(ValueError, match='batch of 8'):
        hook.pairing(8)
    with pytest.raises(ValueError, match='integer'):
        hook.set_domains(torch.zeros(6))
    hook.remove()
    with pytest.raises(ValueError, match="mix='random'"):
        attach_mixstyle(model).set_domains(torch.arange(4))


def test_cross_domain_forward():
    model, x = make()
    freeze_batch_stats(model)
    hook = attach_mixstyle(model, p=1.0, mix='crossdomain')
    hook.set_domains(torch.tensor([0, 1, 0, 1]))
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize('feature_cls', [None, 'getter'])
def test_features_only_wrappers(feature_cls):
    kwargs = dict(features_only=True, feature_cls=feature_cls) if feature_cls else dict(features_only=True)
    torch.manual_seed(0)
    model = timm.create_model('resnet18', **kwargs)
    x = torch.randn(4, 3, 64, 64)
    prefix = 'model.' if feature_cls else ''
    assert mixstyle_layers(model) == [prefix + 'layer1', prefix + 'layer2']
    assert dsu_layers(model) == [prefix + n for n in ('conv1', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4')]
    freeze_batch_stats(model)
    plain = model(x)
    model.eval()
    plain_eval = model(x)
    attach_mixstyle(model, p=1.0)
    attach_dsu(model, p=1.0)
    for a, b in zip(model(x), plain_eval):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(x)[-1], plain[-1], atol=1e-3)


def test_features_only_wrapper_keeps_the_layers_it_runs():
    with torch.device('meta'):
        model = timm.create_model('densenet121', features_only=True, out_indices=(0, 1))
    assert dsu_layers(model) == ['features_conv0', 'features_pool0', 'features_denseblock1']


def test_deepcopy_gives_the_copy_its_own_hooks():
    model, _ = make()
    hook = attach_dsu(model)
    ema = copy.deepcopy(model)
    ema_hook = get_dsu_hook(ema)
    assert ema_hook is not hook and ema_hook.attached
    ema_hook.remove()
    assert hook.attached and not ema_hook.attached and not ema.layer1._forward_hooks


def test_bad_attach_arguments():
    model, _ = make()
    with pytest.raises(ValueError, match=r"'layer9'.*'conv1', 'bn1'"):
        attach_dsu(model, layers=['layer9'])
    with pytest.raises(ValueError, match='p must be'):
        attach_dsu(model, p=1.5)
    with pytest.raises(ValueError, match='alpha'):
        attach_mixstyle(model, alpha=0)
    with pytest.raises(ValueError, match='mix must be'):
        attach_mixstyle(model, mix='shuffle')
    with pytest.raises(ValueError, match='twice'):
        attach_mixstyle(model, layers=['layer1', 'layer1'])
    attach_dsu(model)
    with pytest.raises(ValueError, match='already has'):
        attach_dsu(model)
    with pytest.raises(ValueError, match='compile'):
        attach_mixstyle(torch.compile(make()[0]))
    with pytest.raises(ValueError, match=r"Pass layer=.*\['0', '1'\]"):
        attach_dsu(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()))



@pytest.mark.parametrize('attach', [attach_mixstyle, attach_dsu])
def test_a_model_name_is_refused_by_type(attach):
    """An AttributeError from inside the layer lookup before."""
    with pytest.raises(TypeError, match=r"^model must be a torch.nn.Module; got str 'resnet18': build it first, "
                                        r"e.g. timm.create_model\('resnet18'\)$"):
        attach('resnet18')


def test_one_by_one_maps_are_left_alone_with_a_warning():
    model, x = make(size=32)  # resnet18's layer4 gives 1x1 maps at 32 px
    freeze_batch_stats(model)
    attach_dsu(model, layers=['layer4'], p=1.0)
    with pytest.warns(UserWarning, match='fewer than 2 positions'):
        model(x)


@pytest.mark.slow
def test_compiled_eager_backend_equals_eager():
    model, x = make()
    freeze_batch_stats(model)
    attach_mixstyle(model, p=1.0)
    attach_dsu(model, p=1.0)
    compiled = torch.compile(model, backend='eager')
    torch.manual_seed(0)
    eager = model(x)
    torch.manual_seed(0)
    torch.testing.assert_close(compiled(x), eager)
    model.eval()
    torch.testing.assert_close(compiled(x), model(x))


def test_public_names():
    for name in ('mix_moments', 'perturb_moments', 'moment_shape', 'attach_mixstyle', 'attach_dsu', 'MixStyleHook',
                 'DSUHook', 'StyleHook', 'get_mixstyle_hook', 'get_dsu_hook', 'mixstyle_layers', 'dsu_layers',
                 'MIXSTYLE_MIXES'):
        assert name in timm_moex.__all__ and hasattr(timm_moex, name)


def autograd_replace_moments(x, kind, params, norm_grad, moment_grad, eps=1e-5):
    """replace_moments written with autograd and detach() (PONO statistics), the reference for its hand-written backward."""
    var, mean = torch.var_mean(x, dim=1, correction=1, keepdim=True)
    std = (var + eps).sqrt()
    own_mean, own_std = (mean, std) if norm_grad else (mean.detach(), std.detach())
    mean, std = (mean, std) if moment_grad else (mean.detach(), std.detach())
    if kind == 'exchange':
        new_mean, new_std = mean[params[0]], std[params[0]]
    elif kind == 'mix':
        perm, weight = params
        weight = weight.view(-1, 1, 1, 1)
        new_mean, new_std = weight * mean + (1 - weight) * mean[perm], weight * std + (1 - weight) * std[perm]
    else:
        noise_mean, noise_std = params
        new_mean = mean + noise_mean * (mean.var(0, keepdim=True) + eps).sqrt()
        new_std = std + noise_std * (std.var(0, keepdim=True) + eps).sqrt()
    return (x - own_mean) / own_std * new_std + new_mean


@pytest.mark.parametrize('norm_grad, moment_grad', [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize('kind', ['exchange', 'mix', 'perturb'])
def test_replace_moments_stops_exactly_the_gradients_it_is_told_to(kind, norm_grad, moment_grad):
    torch.manual_seed(0)
    x = (torch.randn(4, 6, 3, 3, dtype=torch.float64) * 2 + 1).requires_grad_()
    perm = torch.tensor([2, 0, 3, 1])
    params = {'exchange': (perm,), 'mix': (perm, torch.rand(4, dtype=torch.float64)),
              'perturb': (torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.randn(4, 1, 3, 3, dtype=torch.float64))}[kind]
    upstream = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    xg, dims, _ = moment_view(x, 'pono', 1, 'test')
    stat_params = params if kind != 'mix' else (perm, params[1])
    out = replace_moments(x, xg, dims, 1e-5, kind, stat_params, norm_grad=norm_grad, moment_grad=moment_grad)
    expected = autograd_replace_moments(x, kind, params, norm_grad, moment_grad)
    torch.testing.assert_close(out, expected)
    got, = torch.autograd.grad(out, x, upstream)
    want, = torch.autograd.grad(expected, x, upstream)
    torch.testing.assert_close(got, want)
    if norm_grad and moment_grad:  # the default lets both through
        default, = torch.autograd.grad(replace_moments(x, xg, dims, 1e-5, kind, stat_params), x, upstream)
        torch.testing.assert_close(default, want)


def test_replace_moments_refuses_an_unknown_kind_in_full():
    x = torch.randn(2, 4, 3, 3)
    xg, dims, _ = moment_view(x, 'pono', 1, 'test')
    with pytest.raises(ValueError, match=r"^kind must be one of \('exchange', 'mix', 'perturb'\); got 'swap'$"):
        replace_moments(x, xg, dims, 1e-5, 'swap', (torch.tensor([1, 0]),))


@pytest.mark.parametrize('norm', ['pono', 'in'])
def test_low_precision_gradients_are_computed_in_float32(norm):
    """bf16 features: the backward's sums run in float32, so the gradient is the float32 one rounded once."""
    torch.manual_seed(0)
    x = (torch.randn(4, 32, 6, 6) * 3 + 2).bfloat16()
    perm, upstream = torch.tensor([2, 0, 3, 1]), torch.randn(4, 32, 6, 6).bfloat16()
    grads = []
    for t in (x, x.float()):
        leaf = t.clone().requires_grad_()
        grads.append(torch.autograd.grad(moment_exchange(leaf, perm, norm=norm, impl='torch'), leaf,
                                         upstream.to(t.dtype))[0])
    assert grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(grads[0].float(), grads[1].bfloat16().float(), rtol=1.6e-2, atol=1e-3)


def test_noise_of_another_dtype_is_taken_in_the_statistics_dtype():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5)
    noise_mean, noise_std = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    out = perturb_moments(x, noise_mean, noise_std)
    assert out.dtype == torch.float32
    assert torch.equal(out, perturb_moments(x, noise_mean.float(), noise_std.float()))
