"""CIFAR baselines (timm_moex.models.cifar_resnet): resnet18_cifar and wide_resnet28_10_cifar."""
import re

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.resnet import BasicBlock

import timm_moex.models.cifar_resnet as cifar_resnet  # registers the models
from timm_moex.models.cifar_resnet import CifarResNet, WideBasicBlock, WideResNetCifar

from helpers import calibrate_bn, gradients, num_params

# reduced models for the forward / training tests, built through the registered entrypoints
SMALL_RESNET = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
SMALL_WRN = dict(depth=10, widen_factor=2)


def resnet18_cifar_count(num_classes: int) -> int:
    """Parameters of the CIFAR ResNet-18, counted from its definition."""
    count = 3 * 64 * 9 + 2 * 64  # stem conv + BN
    in_chs = 64
    for stage, out_chs in enumerate((64, 128, 256, 512)):
        for block in range(2):
            count += in_chs * out_chs * 9 + out_chs * out_chs * 9 + 2 * (2 * out_chs)
            if stage > 0 and block == 0:
                count += in_chs * out_chs + 2 * out_chs  # 1x1 projection + BN
            in_chs = out_chs
    return count + 512 * num_classes + num_classes


def wrn_cifar_count(depth: int, k: int, num_classes: int) -> int:
    """Parameters of a pre-activation WRN-depth-k, counted from its definition."""
    n = (depth - 4) // 6
    count = 3 * 16 * 9
    in_chs = 16
    for out_chs in (16 * k, 32 * k, 64 * k):
        for block in range(n):
            count += 2 * in_chs + in_chs * out_chs * 9 + 2 * out_chs + out_chs * out_chs * 9
            if block == 0:
                count += in_chs * out_chs  # 1x1 projection (16 -> 16k changes width too)
            in_chs = out_chs
    return count + 2 * in_chs + in_chs * num_classes + num_classes


# ---------------------------------------------------------------- architecture and registry

@pytest.mark.parametrize('num_classes', [10, 100])
def test_resnet18_cifar_parameter_count(num_classes):
    count = num_params(timm.create_model('resnet18_cifar', num_classes=num_classes))
    assert count == resnet18_cifar_count(num_classes)
    assert 11.1e6 < count < 11.3e6


@pytest.mark.parametrize('num_classes', [10, 100])
def test_wide_resnet28_10_parameter_count(num_classes):
    model = timm.create_model('wide_resnet28_10_cifar', num_classes=num_classes)
    assert num_params(model) == wrn_cifar_count(28, 10, num_classes)
    assert 36.4e6 < num_params(model) < 36.6e6
    assert model.num_features == 640 and model.num_classes == num_classes


def test_resnet18_cifar_architecture():
    model = timm.create_model('resnet18_cifar')
    assert isinstance(model, CifarResNet) and model.num_classes == 10 and model.num_features == 512
    assert [n for n, _ in model.named_children()] == [
        'conv1', 'bn1', 'act1', 'layer1', 'layer2', 'layer3', 'layer4', 'global_pool', 'fc']
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8
    projections = [b for b in blocks if b.downsample is not None]
    assert projections == [model.layer2[0], model.layer3[0], model.layer4[0]]
    assert all(b.conv1.stride == (2, 2) and b.downsample[0].kernel_size == (1, 1) for b in projections)
    assert all(b.bn2.weight.eq(1).all() for b in blocks)  # no zero-init of the last BN by default
    zero_init = timm.create_model('resnet18_cifar', zero_init_last=True, **SMALL_RESNET)
    assert all(m.bn2.weight.eq(0).all() for m in zero_init.modules() if isinstance(m, BasicBlock))


def test_wide_resnet_architecture():
    model = timm.create_model('wide_resnet28_10_cifar')
    assert isinstance(model, WideResNetCifar)
    blocks = [m for m in model.modules() if isinstance(m, WideBasicBlock)]
    assert len(blocks) == 12
    assert [b.conv2.out_channels for b in blocks] == [160] * 4 + [320] * 4 + [640] * 4
    assert [b for b in blocks if b.shortcut is not None] == [model.layer1[0], model.layer2[0], model.layer3[0]]
    assert [b.conv1.stride for b in blocks if b.shortcut is not None] == [(1, 1), (2, 2), (2, 2)]
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    dropped = timm.create_model('wide_resnet28_10_cifar', block_drop_rate=0.3, **SMALL_WRN)
    assert [m.p for m in dropped.modules() if isinstance(m, nn.Dropout)] == [0.3] * 3
    with pytest.raises(ValueError):
        timm.create_model('wide_resnet28_10_cifar', depth=27)


@pytest.mark.parametrize('name, kwargs', [('resnet18_cifar', SMALL_RESNET), ('wide_resnet28_10_cifar', SMALL_WRN)])
def test_default_cfg(name, kwargs):
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    assert not cfg['url'] and not cfg.get('hf_hub_id')
    assert cfg['num_classes'] == 10 and cfg['input_size'] == (3, 32, 32) and cfg['crop_pct'] == 1.0
    assert cfg['mean'] == cifar_resnet.CIFAR10_MEAN and cfg['std'] == cifar_resnet.CIFAR10_STD
    assert cfg['first_conv'] == 'conv1' and cfg['classifier'] == 'fc'
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, *cfg['input_size']))
    assert tuple(features.shape[-2:]) == cfg['pool_size']


def test_unknown_model_name_raises():
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('wide_resnet28_12_cifar')


# ---------------------------------------------------------------- forward and timm conventions

def test_resnet18_cifar_forward_shapes():
    model = timm.create_model('resnet18_cifar', num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 512, 4, 4)
        assert model.forward_head(features, pre_logits=True).shape == (2, 512)
        torch.testing.assert_close(model(x), model.forward_head(features))
        assert model(x).shape == (2, 7)


def test_wide_resnet_forward_shapes_and_in_chans():
    model = timm.create_model('wide_resnet28_10_cifar', num_classes=7, in_chans=1, **SMALL_WRN).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 128, 8, 8) and (features >= 0).all()  # ends with the final BN-ReLU
        assert model.forward_head(features, pre_logits=True).shape == (2, 128)
        assert model(x).shape == (2, 7)


def test_wide_block_semantics():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    for block in (WideBasicBlock(4, 6, stride=2), WideBasicBlock(4, 4)):
        block = calibrate_bn(block, x)
        with torch.no_grad():
            pre = F.relu(block.bn1(x))
            residual = block.conv2(F.relu(block.bn2(block.conv1(pre))))
            # the projection takes the pre-activated input, the identity the raw input
            shortcut = x if block.shortcut is None else block.shortcut(pre)
            torch.testing.assert_close(block(x), residual + shortcut)


@pytest.mark.parametrize('name, kwargs, reductions', [
    ('resnet18_cifar', SMALL_RESNET, [1, 1, 2, 4, 8]),
    ('wide_resnet28_10_cifar', SMALL_WRN, [1, 1, 2, 4]),
])
def test_features_only(name, kwargs, reductions):
    model = timm.create_model(name, **kwargs)
    extractor = timm.create_model(name, features_only=True, **kwargs).eval()
    with torch.no_grad():
        maps = extractor(torch.randn(2, 3, 32, 32))
    assert len(maps) == len(reductions) == len(model.feature_info)
    assert [m.shape[1] for m in maps] == extractor.feature_info.channels() == [f['num_chs'] for f in model.feature_info]
    assert [32 // m.shape[-1] for m in maps] == extractor.feature_info.reduction() == reductions


@pytest.mark.parametrize('name, kwargs', [('resnet18_cifar', SMALL_RESNET), ('wide_resnet28_10_cifar', SMALL_WRN)])
def test_reset_classifier(name, kwargs):
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(x).shape == (2, model.num_features) and model.head_hidden_size == model.num_features
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model.num_classes == 3 and model(x).shape == (2, 3)
    model.reset_classifier(0, global_pool='')
    assert model(x).dim() == 4


def test_drop_rate_only_in_training():
    model = timm.create_model('resnet18_cifar', drop_rate=0.5, **SMALL_RESNET)
    features = model.eval().forward_features(torch.randn(4, 3, 32, 32)).detach()
    torch.testing.assert_close(model.forward_head(features), model.forward_head(features))
    model.train()
    assert not torch.equal(model.forward_head(features), model.forward_head(features))


def test_block_dropout_only_in_training():
    model = timm.create_model('wide_resnet28_10_cifar', block_drop_rate=0.3, **SMALL_WRN)
    x = torch.randn(2, 3, 32, 32)
    model = calibrate_bn(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize('name, kwargs', [('resnet18_cifar', {}), ('wide_resnet28_10_cifar', SMALL_WRN)])
def test_channels_last_matches_contiguous(name, kwargs):
    x = torch.randn(4, 3, 32, 32)
    model = calibrate_bn(timm.create_model(name, **kwargs), x)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name, kwargs', [('resnet18_cifar', SMALL_RESNET), ('wide_resnet28_10_cifar', SMALL_WRN)])
def test_float64_and_bfloat16(name, kwargs):
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.double()(x.double()).dtype == torch.float64
        out = model.bfloat16()(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize('name, kwargs', [
    ('resnet18_cifar', SMALL_RESNET),
    ('wide_resnet28_10_cifar', dict(SMALL_WRN, block_drop_rate=0.3)),
])
def test_grad_checkpointing_same_gradients(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4, **kwargs).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    calls = []
    # an inner module: non-reentrant checkpointing stops recomputing a block once it has what backward needs
    model.layer2[0].conv1.register_forward_hook(lambda *_: calls.append(1))
    reference = gradients(model, x, y)
    model.set_grad_checkpointing(True)
    checkpointed = gradients(model, x, y)
    assert len(calls) == 3  # 1 without checkpointing, forward + recompute with it
    torch.testing.assert_close(checkpointed, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name, stem', [
    ('resnet18_cifar', ['conv1', 'bn1', 'act1']),
    ('wide_resnet28_10_cifar', ['conv1']),
])
def test_group_matcher_stem(name, stem):
    model = timm.create_model(name, **(SMALL_RESNET if name == 'resnet18_cifar' else SMALL_WRN))
    pattern = model.group_matcher()['stem']
    assert [n for n, _ in model.named_children() if re.match(pattern, n)] == stem
    stem_params = [n for n, _ in model.named_parameters() if re.match(pattern, n)]
    assert stem_params == [n for n, _ in model.named_parameters() if n.split('.')[0] in stem]
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    assert sorted(groups[0]) == sorted(stem_params)


# ---------------------------------------------------------------- TorchScript, FX, intermediates

MODELS = [('resnet18_cifar', SMALL_RESNET), ('wide_resnet28_10_cifar', SMALL_WRN)]


@pytest.mark.parametrize('name, kwargs', MODELS)
def test_torchscript_and_fx_give_the_eager_output(name, kwargs):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    x = torch.randn(2, 3, 32, 32)
    with timm.set_scriptable(True):
        model = calibrate_bn(timm.create_model(name, num_classes=5, **kwargs), x)
    tracer_kwargs = dict(leaf_modules=timm.models.get_notrace_modules(),
                         autowrap_functions=timm.models.get_notrace_functions())
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(next(iter(fx_model(x).values())), expected, rtol=0, atol=0)


def test_stage_count_is_checked():
    with pytest.raises(ValueError, match='1 to 4 stages'):
        timm.create_model('resnet18_cifar', layers=(1,) * 5, channels=(8,) * 5)


@pytest.mark.parametrize('name, kwargs', MODELS)
def test_forward_intermediates_are_the_feature_maps(name, kwargs):
    x = torch.randn(2, 3, 32, 32)
    model = calibrate_bn(timm.create_model(name, **kwargs), x)
    extractor = timm.create_model(name, features_only=True, **kwargs).eval()
    result = extractor.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys
    getter = timm.create_model(name, features_only=True, feature_cls='getter', out_indices=(0, 1), **kwargs)
    result = getter.model.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        for got, expected in zip(maps, extractor(x), strict=True):
            torch.testing.assert_close(got, expected)
        assert [m.shape[1] for m in maps] == [f['num_chs'] for f in model.feature_info]
        assert [32 // m.shape[-1] for m in maps] == [f['reduction'] for f in model.feature_info]
        torch.testing.assert_close(model.forward_intermediates(x, indices=2, intermediates_only=True), maps[-2:])
        torch.testing.assert_close(getter.eval()(x), maps[:2])
        # the WRN's final BN-ReLU applies to its last map on request; the ResNet has none
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(normed, final)
