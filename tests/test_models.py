import pytest
import timm
import torch

import timm_moex  # noqa: F401  (registers the models)
from timm_moex.models.pyramidnet import ShakeDrop

CIFAR_PYRAMIDNETS = {  # name -> (alpha, bottleneck)
    'pyramidnet110_a48': (48, False), 'pyramidnet110_a270': (270, False), 'pyramidnet164_a270': (270, True),
    'pyramidnet200_a240': (240, True), 'pyramidnet200': (240, True), 'pyramidnet236_a220': (220, True),
    'pyramidnet272_a200': (200, True),
}
IMAGENET_PYRAMIDNETS = {'pyramidnet101_a360': 360, 'pyramidnet200_a300': 300}
# small enough for a forward pass on 2 CPU cores in well under a second
SMALL = ['pyramidnet110_a48', 'resnet18_cifar']
SHALLOW = dict(layers=(2, 2, 2))  # a 3-stage PyramidNet of 6 blocks, for the training-mode tests


def num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name, count', [('pyramidnet200_a240', 26_844_952), ('pyramidnet110_a48', 1_778_556)])
def test_parameter_parity_with_the_reference_code(name, count):
    assert num_params(timm.create_model(name, num_classes=100)) == count


@pytest.mark.parametrize('name', CIFAR_PYRAMIDNETS)
def test_cifar_pyramidnet_final_width(name):
    alpha, bottleneck = CIFAR_PYRAMIDNETS[name]
    model = timm.create_model(name)
    assert model.num_classes == 100 and model.pretrained_cfg['input_size'] == (3, 32, 32)
    assert model.num_features == (4 if bottleneck else 1) * (16 + alpha)


@pytest.mark.parametrize('name', IMAGENET_PYRAMIDNETS)
def test_imagenet_pyramidnet_final_width(name):
    model = timm.create_model(name)
    assert model.num_classes == 1000 and model.pretrained_cfg['input_size'] == (3, 224, 224)
    assert model.num_features == 4 * (64 + IMAGENET_PYRAMIDNETS[name])


def test_pyramidnet200_is_the_a240_model():
    short, full = timm.create_model('pyramidnet200'), timm.create_model('pyramidnet200_a240')
    assert {k: v.shape for k, v in short.state_dict().items()} == {k: v.shape for k, v in full.state_dict().items()}


def test_cifar_baselines():
    assert timm.create_model('resnet18_cifar').num_classes == 10
    assert num_params(timm.create_model('wide_resnet28_10_cifar')) == 36_479_194  # WRN-28-10, 10 classes
    assert 11.1e6 < num_params(timm.create_model('resnet18_cifar')) < 11.2e6


@pytest.mark.parametrize('name', SMALL)
def test_forward_shapes(name):
    model = timm.create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 7)
    features = model.forward_features(x)
    assert features.shape[:2] == (2, model.num_features)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)


def test_imagenet_pyramidnet_forward():
    model = timm.create_model('pyramidnet101_a360', num_classes=5).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize('name', SMALL + ['wide_resnet28_10_cifar', 'pyramidnet101_a360'])
def test_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    size = 64 if name == 'pyramidnet101_a360' else 32
    maps = model(torch.randn(1, 3, size, size))
    assert [m.shape[1] for m in maps] == model.feature_info.channels()
    assert [size // m.shape[-1] for m in maps] == model.feature_info.reduction()
    assert len(maps) == (5 if name in ('resnet18_cifar', 'pyramidnet101_a360') else 4)


@pytest.mark.parametrize('name', SMALL)
def test_reset_classifier(name):
    model = timm.create_model(name).eval()
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize('name', SMALL)
def test_channels_last_and_dtypes(name):
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-4)
    assert model.double()(x.double()).dtype == torch.float64
    out = model.bfloat16()(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_group_matcher_stem_is_the_moex_layer():
    assert timm_moex.resolve_moex_layer(timm.create_model('pyramidnet110_a48')) == 'bn1'
    assert timm_moex.resolve_moex_layer(timm.create_model('pyramidnet101_a360')) == 'maxpool'
    assert timm_moex.resolve_moex_layer(timm.create_model('resnet18_cifar')) == 'act1'
    assert timm_moex.resolve_moex_layer(timm.create_model('wide_resnet28_10_cifar')) == 'conv1'


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model('pyramidnet110_a48', num_classes=4, **SHALLOW)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_drop_rate_is_used_in_training_only():
    model = timm.create_model('resnet18_cifar', drop_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    features = model.forward_features(x)
    assert not torch.equal(model.forward_head(features), model.forward_head(features))


def test_shakedrop():
    probs = [m.p for m in timm.create_model('pyramidnet110_a48', shakedrop_prob=0.5).modules()
             if isinstance(m, ShakeDrop)]
    assert len(probs) == 54 and probs[-1] == pytest.approx(0.5) and probs[0] == pytest.approx(0.5 / 54)
    assert all(a < b for a, b in zip(probs, probs[1:]))  # rising linearly with depth

    plain = timm.create_model('pyramidnet110_a48', num_classes=4, **SHALLOW)
    shaken = timm.create_model('pyramidnet110_a48', num_classes=4, shakedrop_prob=0.5, **SHALLOW)
    shaken.load_state_dict(plain.state_dict())
    block, plain_block = shaken.layer2[0], plain.layer2[0]
    block.eval(), plain_block.eval()
    x = torch.randn(2, block.bn1.num_features, 8, 8)
    residual = plain_block.residual(x)
    expected = residual * (1 - block.shakedrop.p) + torch.nn.functional.pad(
        block.downsample(x), (0, 0, 0, 0, 0, residual.shape[1] - x.shape[1]))
    torch.testing.assert_close(block(x), expected)

    shaken.train()
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    shaken(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_shakedrop_off_is_the_plain_model_in_training():
    torch.manual_seed(0)
    plain = timm.create_model('pyramidnet110_a48', num_classes=4, **SHALLOW)
    off = timm.create_model('pyramidnet110_a48', num_classes=4, shakedrop_prob=0.0, **SHALLOW)
    off.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(off.train()(x), plain.train()(x))


def test_unknown_model_name():
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('pyramidnet999')
