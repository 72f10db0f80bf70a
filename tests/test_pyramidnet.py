"""PyramidNet family (timm_moex.models.pyramidnet): parity, timm conventions, ShakeDrop."""
import re

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_moex.models.pyramidnet as pyramidnet  # registers the models
from timm_moex.models.pyramidnet import PyramidBasicBlock, PyramidBottleneck, ShakeDrop

from helpers import calibrate_bn, gradients, num_params, slow_cases

CIFAR_MODELS = {  # name -> (alpha, bottleneck)
    'pyramidnet110_a48': (48, False),
    'pyramidnet110_a270': (270, False),
    'pyramidnet164_a270': (270, True),
    'pyramidnet200_a240': (240, True),
    'pyramidnet200': (240, True),
    'pyramidnet236_a220': (220, True),
    'pyramidnet272_a200': (200, True),
}
IMAGENET_MODELS = {'pyramidnet101_a360': 360, 'pyramidnet200_a300': 300}
# the full-size builds beyond PyramidNet-110 (alpha 48) are outside the fast subset
FULL_SIZE = pytest.mark.slow
# reduced models for the forward / training tests, built through the registered entrypoints
SMALL_CIFAR = dict(layers=(2, 2, 2))
SMALL_IMAGENET = dict(layers=(1, 1, 1, 1))


def blocks_of(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (PyramidBasicBlock, PyramidBottleneck))]


def top_level_matches(model: nn.Module, pattern: str):
    return [name for name, _ in model.named_children() if re.match(pattern, name)]


# ---------------------------------------------------------------- architecture and registry

@pytest.mark.parametrize('name, count', [pytest.param('pyramidnet200_a240', 26_844_952, marks=FULL_SIZE),
                                         ('pyramidnet110_a48', 1_778_556)])
def test_parameter_parity_with_reference(name, count):
    assert num_params(timm.create_model(name, num_classes=100)) == count


@pytest.mark.parametrize('name', slow_cases(CIFAR_MODELS, set(CIFAR_MODELS) - {'pyramidnet110_a48'}))
def test_cifar_variant_builds_with_final_width(name):
    alpha, bottleneck = CIFAR_MODELS[name]
    model = timm.create_model(name)
    assert model.num_classes == 100
    assert model.num_features == model.head_hidden_size == (4 if bottleneck else 1) * (16 + alpha)
    assert model.fc.in_features == model.num_features and model.bn_final.num_features == model.num_features
    depth = int(re.match(r'pyramidnet(\d+)', name).group(1))
    blocks = blocks_of(model)
    assert len(blocks) == (depth - 2) // (3 if bottleneck else 2)
    assert all(isinstance(b, PyramidBottleneck if bottleneck else PyramidBasicBlock) for b in blocks)
    # every block takes the previous block's output width, and widths never shrink
    out_chs = [b.bn1.num_features for b in blocks[1:]] + [model.num_features]
    assert [b.bn1.num_features for b in blocks] == [16] + out_chs[:-1]
    assert out_chs == sorted(out_chs)


@FULL_SIZE
@pytest.mark.parametrize('name', IMAGENET_MODELS)
def test_imagenet_variant_builds_with_final_width(name):
    model = timm.create_model(name)
    assert model.num_classes == 1000 and model.pretrained_cfg['input_size'] == (3, 224, 224)
    assert model.num_features == 4 * (64 + IMAGENET_MODELS[name])
    assert [n for n, _ in model.named_children()][:4] == ['conv1', 'bn1', 'act1', 'maxpool']
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d) and model.maxpool.stride == 2
    assert all(isinstance(b, PyramidBottleneck) for b in blocks_of(model))


def test_width_rule_accumulates_a_float():
    widths = pyramidnet.pyramid_widths((18, 18, 18), 48, 16)
    flat = [w for stage in widths for w in stage]
    assert [len(s) for s in widths] == [18, 18, 18] and flat[-1] == 16 + 48
    assert all(b - a in (0, 1) for a, b in zip(flat, flat[1:]))
    # addrate 0.5 for 4 blocks from 16: 16.5, 17.0, 17.5, 18.0 -> round half to even
    assert pyramidnet.pyramid_widths((2, 2), 2, 16) == [[16, 17], [18, 18]]


def test_downsampling_blocks_and_strides():
    model = timm.create_model('pyramidnet110_a48', **SMALL_CIFAR)
    for stage_idx, stage in enumerate((model.layer1, model.layer2, model.layer3)):
        first, rest = stage[0], list(stage)[1:]
        expect_down = stage_idx > 0
        assert isinstance(first.downsample, nn.AvgPool2d) == expect_down
        assert first.conv1.stride == ((2, 2) if expect_down else (1, 1))
        assert all(isinstance(b.downsample, nn.Identity) and b.conv1.stride == (1, 1) for b in rest)
    assert all(not isinstance(m, nn.Conv2d) or m.bias is None for m in model.modules())


@FULL_SIZE
def test_pyramidnet200_is_the_a240_architecture():
    short, full = timm.create_model('pyramidnet200'), timm.create_model('pyramidnet200_a240')
    assert num_params(short) == num_params(full)
    assert {k: v.shape for k, v in short.state_dict().items()} == {k: v.shape for k, v in full.state_dict().items()}
    assert short.pretrained_cfg['architecture'] == 'pyramidnet200'
    assert full.pretrained_cfg['architecture'] == 'pyramidnet200_a240'


@pytest.mark.parametrize('name', ['pyramidnet110_a48', 'pyramidnet101_a360'])
def test_default_cfg(name):
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    assert not cfg['url'] and not cfg.get('hf_hub_id')
    assert cfg['first_conv'] == 'conv1' and cfg['classifier'] == 'fc'
    if name.startswith('pyramidnet110'):
        assert cfg['mean'] == pyramidnet.CIFAR100_MEAN and cfg['std'] == pyramidnet.CIFAR100_STD
        assert cfg['input_size'] == (3, 32, 32) and cfg['crop_pct'] == 1.0
    else:
        assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['crop_pct'] == 0.875
    # pool_size is the feature map size at the default input size (a reduced-depth model suffices)
    model = timm.create_model(name, **(SMALL_CIFAR if name.startswith('pyramidnet110') else SMALL_IMAGENET)).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, *cfg['input_size']))
    assert tuple(features.shape[-2:]) == cfg['pool_size']


def test_unknown_model_name_raises():
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('pyramidnet999')


# ---------------------------------------------------------------- forward and timm conventions

def test_forward_shapes():
    model = timm.create_model('pyramidnet110_a48', num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 64, 8, 8)
        assert (features >= 0).all()  # forward_features ends with the final BN-ReLU
        assert model.forward_head(features, pre_logits=True).shape == (2, 64)
        assert model.forward_head(features).shape == (2, 7)
        torch.testing.assert_close(model(x), model.forward_head(features))


def test_imagenet_forward_and_in_chans():
    model = timm.create_model('pyramidnet101_a360', num_classes=5, in_chans=1, **SMALL_IMAGENET).eval()
    assert model.num_features == 4 * (64 + 360)
    with torch.no_grad():
        assert model.forward_features(torch.randn(2, 1, 64, 64)).shape == (2, model.num_features, 2, 2)
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize('name, kwargs, size, reductions', [
    ('pyramidnet110_a48', SMALL_CIFAR, 32, [1, 1, 2, 4]),
    ('pyramidnet101_a360', SMALL_IMAGENET, 64, [2, 4, 8, 16, 32]),
])
def test_features_only(name, kwargs, size, reductions):
    model = timm.create_model(name, **kwargs)
    extractor = timm.create_model(name, features_only=True, **kwargs).eval()
    with torch.no_grad():
        maps = extractor(torch.randn(2, 3, size, size))
    assert len(maps) == len(reductions) == len(model.feature_info)
    assert [m.shape[1] for m in maps] == extractor.feature_info.channels() == [f['num_chs'] for f in model.feature_info]
    assert [size // m.shape[-1] for m in maps] == extractor.feature_info.reduction() == reductions
    assert extractor.feature_info.channels()[-1] == model.num_features

    picked = timm.create_model(name, features_only=True, out_indices=(1, -1), **kwargs).eval()
    with torch.no_grad():
        assert [m.shape[1] for m in picked(torch.randn(2, 3, size, size))] == [maps[1].shape[1], maps[-1].shape[1]]


def test_reset_classifier():
    model = timm.create_model('pyramidnet110_a48', **SMALL_CIFAR).eval()
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(0)
    assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
    assert model(x).shape == (2, model.num_features) and model.head_hidden_size == model.num_features
    model.reset_classifier(10)
    assert model.get_classifier().out_features == 10 and model.num_classes == 10 and model(x).shape == (2, 10)
    assert model.get_classifier(name_only=True) == 'fc'
    model.reset_classifier(0, global_pool='')
    assert model(x).shape == (2, model.num_features, 8, 8)


def test_drop_rate_only_in_training():
    model = timm.create_model('pyramidnet110_a48', drop_rate=0.5, **SMALL_CIFAR)
    features = model.eval().forward_features(torch.randn(4, 3, 32, 32)).detach()
    torch.testing.assert_close(model.forward_head(features), model.forward_head(features))
    model.train()
    assert not torch.equal(model.forward_head(features), model.forward_head(features))


@pytest.mark.parametrize('name, kwargs, size', [
    ('pyramidnet110_a48', SMALL_CIFAR, 32),
    ('pyramidnet101_a360', SMALL_IMAGENET, 64),
])
def test_channels_last_matches_contiguous(name, kwargs, size):
    x = torch.randn(4, 3, size, size)
    model = calibrate_bn(timm.create_model(name, **kwargs), x)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-4)
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('block_cls', [PyramidBasicBlock, PyramidBottleneck])
def test_zero_padded_shortcut(block_cls, channels_last, dtype):
    block = block_cls(4, 6, stride=2).to(dtype).eval()
    out_chs = 6 * block_cls.expansion
    last_bn = block.bn3 if block_cls is PyramidBasicBlock else block.bn4
    nn.init.zeros_(last_bn.weight)  # residual branch = 0: the output is the shortcut alone
    x = torch.randn(2, 4, 7, 7, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = block(x)
    assert out.dtype == dtype and out.shape == (2, out_chs, 4, 4)
    pooled = F.avg_pool2d(x, 2, stride=2, ceil_mode=True)
    torch.testing.assert_close(out[:, :4], pooled)
    assert (out[:, 4:] == 0).all()


def test_model_runs_in_float64_and_bfloat16():
    model = timm.create_model('pyramidnet110_a48', **SMALL_CIFAR).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.double()(x.double()).dtype == torch.float64
        out = model.bfloat16()(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize('shakedrop_prob', [0.0, 0.5])
def test_grad_checkpointing_same_gradients(shakedrop_prob):
    torch.manual_seed(0)
    model = timm.create_model('pyramidnet110_a48', num_classes=4, shakedrop_prob=shakedrop_prob, **SMALL_CIFAR).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    calls = []
    # an inner module: non-reentrant checkpointing stops recomputing a block once it has what backward needs
    model.layer2[1].conv1.register_forward_hook(lambda *_: calls.append(1))

    reference = gradients(model, x, y)
    assert len(calls) == 1
    model.set_grad_checkpointing(True)
    checkpointed = gradients(model, x, y)
    assert len(calls) == 3  # forward + recompute in backward: checkpointing is really on
    torch.testing.assert_close(checkpointed, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name, stem', [
    ('pyramidnet110_a48', ['conv1', 'bn1']),
    ('pyramidnet101_a360', ['conv1', 'bn1', 'act1', 'maxpool']),
])
def test_group_matcher_stem(name, stem):
    model = timm.create_model(name, **(SMALL_CIFAR if name.startswith('pyramidnet110') else SMALL_IMAGENET))
    matcher = model.group_matcher()
    assert top_level_matches(model, matcher['stem']) == stem
    stem_params = [n for n, _ in model.named_parameters() if re.match(matcher['stem'], n)]
    assert stem_params == [n for n, _ in model.named_parameters() if n.split('.')[0] in stem]
    groups = timm.models.group_parameters(model, matcher)
    assert sorted(groups[0]) == sorted(stem_params)
    assert len(groups) == 2 + len(blocks_of(model))  # stem, one group per block, head (bn_final)
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == 2 + model.num_stages


# ---------------------------------------------------------------- ShakeDrop

def test_shakedrop_probabilities_rise_linearly():
    model = timm.create_model('pyramidnet110_a48', shakedrop_prob=0.5)
    probs = [m.p for m in model.modules() if isinstance(m, ShakeDrop)]
    assert len(probs) == len(blocks_of(model)) == 54
    assert probs == pytest.approx([0.5 * (i + 1) / 54 for i in range(54)])
    assert not any(isinstance(m, ShakeDrop) for m in timm.create_model('pyramidnet110_a48').modules())


def test_shakedrop_eval_is_the_expected_scaling():
    plain = timm.create_model('pyramidnet110_a48', num_classes=4, **SMALL_CIFAR)
    shaken = timm.create_model('pyramidnet110_a48', num_classes=4, shakedrop_prob=0.5, **SMALL_CIFAR)
    calibrate_bn(plain, torch.randn(4, 3, 32, 32))
    shaken.load_state_dict(plain.state_dict())
    shaken.eval()
    block, plain_block = shaken.layer2[0], plain.layer2[0]
    x = torch.randn(2, block.bn1.num_features, 16, 16)
    with torch.no_grad():
        residual = plain_block.residual(x)
        expected = (1 - block.shakedrop.p) * residual + F.pad(
            F.avg_pool2d(x, 2, ceil_mode=True), (0, 0, 0, 0, 0, residual.shape[1] - x.shape[1]))
        torch.testing.assert_close(block(x), expected)
        y = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(shaken(y), shaken(y))  # deterministic in eval


def test_shakedrop_off_is_the_plain_model_in_training():
    plain = timm.create_model('pyramidnet110_a48', num_classes=4, **SMALL_CIFAR)
    off = timm.create_model('pyramidnet110_a48', num_classes=4, shakedrop_prob=0.0, **SMALL_CIFAR)
    off.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(off.train()(x), plain.train()(x))


def test_shakedrop_training_forward_and_backward():
    torch.manual_seed(0)
    drop = ShakeDrop(0.5).train()
    x = torch.randn(256, 3, 2, 2, dtype=torch.float64).abs().add(0.1).requires_grad_()
    out = drop(x)
    out.sum().backward()
    scale = (out / x).detach().flatten(1)
    grad = x.grad.flatten(1)
    # one forward scale and one backward scale per sample
    torch.testing.assert_close(scale, scale[:, :1].expand_as(scale))
    torch.testing.assert_close(grad, grad[:, :1].expand_as(grad))
    scale, grad = scale[:, 0], grad[:, 0]
    kept = scale == 1
    assert 0.3 < kept.double().mean() < 0.7  # gate ~ Bernoulli(0.5)
    assert (grad[kept] == 1).all()  # kept samples pass the gradient unchanged
    assert ((scale[~kept] >= -1) & (scale[~kept] <= 1)).all() and (scale[~kept] < 0).any()  # alpha ~ U[-1, 1]
    assert ((grad[~kept] >= 0) & (grad[~kept] <= 1)).all()  # beta ~ U[0, 1]
    assert not torch.allclose(grad[~kept], scale[~kept])  # backward uses its own draw

    model = timm.create_model('pyramidnet110_a48', num_classes=4, shakedrop_prob=0.5, **SMALL_CIFAR).train()
    y = torch.randn(4, 3, 32, 32, requires_grad=True)
    model(y).square().sum().backward()
    assert torch.isfinite(y.grad).all() and all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        assert not torch.equal(model(y), model(y))  # stochastic in training


# ---------------------------------------------------------------- TorchScript, FX, intermediates

def _fx_trace(model: nn.Module) -> nn.Module:
    """An FX graph of the model's output with timm's leaf modules and functions, as timm's tests trace."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    tracer_kwargs = dict(leaf_modules=timm.models.get_notrace_modules(),
                         autowrap_functions=timm.models.get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize('name, kwargs, size', [
    ('pyramidnet110_a48', SMALL_CIFAR, 32),
    ('pyramidnet164_a270', dict(layers=(1, 1, 1)), 32),
    ('pyramidnet101_a360', SMALL_IMAGENET, 64),
])
def test_torchscript_and_fx_give_the_eager_output(name, kwargs, size):
    x = torch.randn(2, 3, size, size)
    with timm.set_scriptable(True):
        model = timm.create_model(name, num_classes=5, shakedrop_prob=0.5, **kwargs)
    calibrate_bn(model, x)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected, rtol=0, atol=0)
        fx_model = _fx_trace(model).eval()
        torch.testing.assert_close(next(iter(fx_model(x).values())), expected, rtol=0, atol=0)
    # the training graph keeps ShakeDrop as one leaf, still random per sample
    fx_model.train()
    y = next(iter(fx_model(x).values()))
    assert y.shape == expected.shape and not torch.equal(y, next(iter(fx_model(x).values())))
    assert any(isinstance(m, ShakeDrop) for m in fx_model.modules())


def test_scripted_shakedrop_refuses_training_instead_of_skipping_it():
    with timm.set_scriptable(True):
        model = timm.create_model('pyramidnet110_a48', shakedrop_prob=0.5, **SMALL_CIFAR)
    scripted = torch.jit.script(model.train())
    with pytest.raises(torch.jit.Error):
        scripted(torch.randn(2, 3, 32, 32))


def test_shortcut_padding_is_fixed_at_construction():
    assert PyramidBasicBlock(4, 6).pad_chs == 2 and PyramidBottleneck(8, 6).pad_chs == 16
    with pytest.raises(ValueError, match='narrow'):
        PyramidBasicBlock(8, 6)
    with pytest.raises(ValueError, match='1 to 4 stages'):
        timm.create_model('pyramidnet110_a48', layers=(1, 1, 1, 1, 1))


def _load_all_but_head(target: nn.Module, source: nn.Module) -> None:
    """Copy the weights a feature extractor kept; only the parts it drops may be missing from it."""
    result = target.load_state_dict(source.state_dict(), strict=False)
    assert not result.missing_keys
    assert all(re.match(r'(fc|bn_final|layer\d+)\.', k) for k in result.unexpected_keys), result.unexpected_keys


@pytest.mark.parametrize('name, kwargs, size', [
    ('pyramidnet110_a48', SMALL_CIFAR, 32),
    ('pyramidnet101_a360', SMALL_IMAGENET, 64),
])
def test_forward_intermediates_are_the_feature_maps(name, kwargs, size):
    x = torch.randn(2, 3, size, size)
    model = calibrate_bn(timm.create_model(name, **kwargs), x)
    extractor = timm.create_model(name, features_only=True, **kwargs).eval()
    _load_all_but_head(extractor, model)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        for got, expected in zip(maps, extractor(x), strict=True):
            torch.testing.assert_close(got, expected)
        assert [m.shape[1] for m in maps] == [f['num_chs'] for f in model.feature_info]
        assert [size // m.shape[-1] for m in maps] == [f['reduction'] for f in model.feature_info]
        # a subset, the last n, stop_early, and the final norm on the last stage
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last_two, maps[-2:])
        _, early = model.forward_intermediates(x, indices=[0, 1], stop_early=True)
        torch.testing.assert_close(early, maps[:2])
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], final)

        getter = timm.create_model(name, features_only=True, feature_cls='getter', out_indices=(1, 2), **kwargs)
        _load_all_but_head(getter.model, model)  # pruned: the last stage, final norm and classifier are gone
        torch.testing.assert_close(getter.eval()(x), maps[1:3])
    assert getter.feature_info.channels() == [f['num_chs'] for f in model.feature_info[1:3]]
