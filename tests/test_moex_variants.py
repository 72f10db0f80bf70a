import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models._features_fx import GraphExtractNet
from timm.models._registry import get_pretrained_cfg, model_entrypoint

import timm_moex
from timm_moex import get_moex_hook
from timm_moex.models.moex_variants import MOEX_BASE_MODELS

from helpers import slow_cases

REQUIRED = ['resnet18', 'resnet50', 'resnet101', 'resnext50_32x4d', 'wide_resnet50_2', 'densenet121', 'densenet201',
            'convnext_tiny', 'efficientnet_b0', 'vit_small_patch16_224', 'pyramidnet200', 'pyramidnet200_a240',
            'pyramidnet110_a48', 'pyramidnet110_a270', 'pyramidnet164_a270', 'pyramidnet236_a220',
            'pyramidnet272_a200', 'pyramidnet101_a360', 'pyramidnet200_a300', 'resnet18_cifar',
            'wide_resnet28_10_cifar']

# variant -> (kwargs for a quick CPU forward, input size, expected MoEx layer)
SMALL = {
    'resnet18_moex': (dict(num_classes=10), 32, 'maxpool'),
    'densenet121_moex': (dict(num_classes=10), 32, 'features.pool0'),
    'pyramidnet110_a48_moex': (dict(num_classes=100), 32, 'bn1'),
    'resnet18_cifar_moex': (dict(num_classes=10), 32, 'act1'),
}
# DenseNet-121 takes a second or more per test on the CPU: outside the fast subset
SMALL_PARAMS = slow_cases(SMALL, ('densenet121_moex',))


def test_every_listed_model_has_a_variant():
    names = set(timm.list_models('*_moex'))
    for base in REQUIRED:
        assert f'{base}_moex' in names
    assert names == {f'{base}_moex' for base in MOEX_BASE_MODELS}


def test_import_changes_no_existing_model():
    assert model_entrypoint('resnet18').__module__ == 'timm.models.resnet'
    assert get_moex_hook(timm.create_model('resnet18')) is None
    assert get_pretrained_cfg('resnet50').architecture == 'resnet50'


def test_variant_carries_the_base_pretrained_configs():
    base, variant = get_pretrained_cfg('resnet50.a1_in1k'), get_pretrained_cfg('resnet50_moex.a1_in1k')
    assert variant.hf_hub_id == base.hf_hub_id == 'timm/resnet50.a1_in1k'
    assert variant.architecture == 'resnet50_moex'
    assert timm.list_pretrained('resnet50_moex*') == [n.replace('resnet50', 'resnet50_moex', 1)
                                                      for n in timm.list_pretrained('resnet50.*')]


def test_the_paper_call():
    model = timm.create_model('pyramidnet200_moex', num_classes=100, moex_norm='pono', moex_layer='stem')
    hook = get_moex_hook(model)
    assert hook.layer == 'bn1' and hook.norm == 'pono'
    assert sum(p.numel() for p in model.parameters()) == 26_844_952


@pytest.mark.parametrize('variant', SMALL_PARAMS)
def test_variant_in_eval_equals_its_base_and_exchanges_in_training(variant):
    kwargs, size, layer = SMALL[variant]
    base = timm.create_model(variant[:-len('_moex')], **kwargs)
    model = timm.create_model(variant, **kwargs)
    assert get_moex_hook(model).layer == layer
    model.load_state_dict(base.state_dict())
    x = torch.randn(4, 3, size, size)
    base.eval(), model.eval()
    get_moex_hook(model).arm(torch.tensor([1, 2, 3, 0]))
    torch.testing.assert_close(model(x), base(x))

    model.train(), base.train()
    get_moex_hook(model).arm(torch.tensor([1, 2, 3, 0]))
    assert (model(x) - base(x)).abs().max() > 1e-4


def test_state_dict_round_trip_through_safetensors(tmp_path):
    base = timm.create_model('resnet18', num_classes=10)
    variant = timm.create_model('resnet18_moex', num_classes=10)
    assert list(variant.state_dict()) == list(base.state_dict())

    save_file(variant.state_dict(), tmp_path / 'variant.safetensors')
    base.load_state_dict(load_file(tmp_path / 'variant.safetensors'))
    save_file(base.state_dict(), tmp_path / 'base.safetensors')
    fresh = timm.create_model('resnet18_moex', num_classes=10)
    fresh.load_state_dict(load_file(tmp_path / 'base.safetensors'))
    for key, value in variant.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)


def test_pretrained_loads_what_the_base_loads(tmp_path):
    # 1000 classes, as the pretrained config says: with others timm re-initializes the classifier.
    source = timm.create_model('resnet18')
    save_file(source.state_dict(), tmp_path / 'weights.safetensors')
    overlay = dict(file=str(tmp_path / 'weights.safetensors'))
    base = timm.create_model('resnet18', pretrained=True, pretrained_cfg_overlay=overlay)
    variant = timm.create_model('resnet18_moex', pretrained=True, pretrained_cfg_overlay=overlay)
    assert get_moex_hook(variant) is not None
    for key, value in base.state_dict().items():
        torch.testing.assert_close(variant.state_dict()[key], value)
        torch.testing.assert_close(source.state_dict()[key], value)


def test_create_model_for_any_timm_model():
    model = timm_moex.create_model('resnet10t', moex=dict(norm='gn-d8', layer='layer1'), num_classes=3)
    hook = get_moex_hook(model)
    assert (hook.layer, hook.norm) == ('layer1', 'gn-d8')
    assert get_moex_hook(timm_moex.create_model('resnet10t')).layer == 'maxpool'
    variant = timm_moex.create_model('resnet18_moex', moex=dict(norm='in'), num_classes=3)
    assert get_moex_hook(variant).norm == 'in'


def test_bad_names_and_arguments():
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('pyramidnet999_moex')
    with pytest.raises(TypeError, match="'moex_nrom'.*moex_norm"):
        timm.create_model('resnet18_moex', moex_nrom='in')
    with pytest.raises(TypeError, match="'nrom'"):
        timm_moex.create_model('resnet18', moex=dict(nrom='in'))
    with pytest.raises(ValueError, match="'bogus'"):
        timm.create_model('resnet18_moex', moex_norm='bogus')


def test_impl_is_a_variant_argument_checked_when_the_hook_is_made():
    model = timm.create_model('resnet18_moex', num_classes=3, moex_impl='torch')
    assert get_moex_hook(model).impl == 'torch'
    assert timm_moex.get_moex_hook(timm_moex.create_model('resnet10t', moex=dict(impl='torch'))).impl == 'torch'
    with pytest.raises(ValueError, match=r"^impl='fast' is not an implementation of moment_exchange"):
        timm.create_model('resnet18_moex', num_classes=3, moex_impl='fast')


def test_the_stem_of_this_package_models_is_the_moex_layer():
    """The MoEx paper: after conv1 + bn1 for the CIFAR PyramidNet, after the stem elsewhere."""
    assert timm_moex.resolve_moex_layer(timm.create_model('pyramidnet110_a48')) == 'bn1'
    assert timm_moex.resolve_moex_layer(timm.create_model('pyramidnet101_a360')) == 'maxpool'
    assert timm_moex.resolve_moex_layer(timm.create_model('resnet18_cifar')) == 'act1'
    assert timm_moex.resolve_moex_layer(timm.create_model('wide_resnet28_10_cifar')) == 'conv1'


# ---- dense-task backbones: features_only and forward_intermediates keep MoEx at the stem ----

PERM = torch.tensor([1, 2, 3, 0])


def _base_and_variant(variant, **kwargs):
    """The base model and its variant with the same weights (both built with ``kwargs``)."""
    base = timm.create_model(variant[:-len('_moex')], **kwargs)
    model = timm.create_model(variant, **kwargs)
    model.load_state_dict(base.state_dict())
    assert get_moex_hook(model) is not None
    return base, model


@pytest.mark.parametrize('feature_cls', [None, 'getter'], ids=['list', 'getter'])
@pytest.mark.parametrize('variant', SMALL_PARAMS)
def test_features_only_variant_exchanges_at_the_stem_in_training_only(variant, feature_cls):
    _, size, _ = SMALL[variant]
    kwargs = dict(features_only=True, feature_cls=feature_cls) if feature_cls else dict(features_only=True)
    base, model = _base_and_variant(variant, **kwargs)
    hook = get_moex_hook(model)
    x = torch.randn(4, 3, size, size)
    # (eval first: an exchanged training forward moves the running statistics of the later BN layers)
    with torch.no_grad():
        model.eval(), base.eval()
        hook.arm(PERM)
        for got, want in zip(model(x), base(x)):  # eval: MoEx never applies
            torch.testing.assert_close(got, want)
        hook.disarm()
        model.train(), base.train()
        for got, want in zip(model(x), base(x)):  # not armed: the plain backbone
            torch.testing.assert_close(got, want)
        hook.arm(PERM)
        armed, plain = model(x), base(x)
        assert not hook.armed  # one forward used the arming
        assert len(armed) == len(plain) > 1
        assert (armed[-1] - plain[-1]).abs().max() > 1e-4  # the deepest map comes after the stem


@pytest.mark.parametrize('variant', ['pyramidnet110_a48_moex', 'resnet18_cifar_moex', 'resnet18_moex'])
def test_forward_intermediates_of_a_variant_exchange_in_training_only(variant):
    kwargs, size, _ = SMALL[variant]
    base, model = _base_and_variant(variant, **kwargs)
    hook = get_moex_hook(model)
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        model.eval(), base.eval()
        hook.arm(PERM)
        final, maps = model.forward_intermediates(x)
        final_base, maps_base = base.forward_intermediates(x)
        torch.testing.assert_close(final, final_base)
        for got, want in zip(maps, maps_base):
            torch.testing.assert_close(got, want)
        hook.disarm()
        model.train(), base.train()
        hook.arm(PERM)
        final, maps = model.forward_intermediates(x)
        final_base, maps_base = base.forward_intermediates(x)
        assert (final - final_base).abs().max() > 1e-4 and (maps[-1] - maps_base[-1]).abs().max() > 1e-4


def test_feature_wrapper_layer_finds_the_module_under_each_wrapper():
    plain = timm.create_model('densenet121')
    listed = timm.create_model('densenet121', features_only=True)
    getter = timm.create_model('densenet121', features_only=True, feature_cls='getter')
    assert timm_moex.hooks.layers.feature_wrapper_layer(listed, plain, 'features.pool0') == 'features_pool0'
    assert timm_moex.hooks.layers.feature_wrapper_layer(getter, plain, 'features.pool0') == 'model.features.pool0'
    resnet = timm.create_model('resnet18')
    assert timm_moex.hooks.layers.feature_wrapper_layer(timm.create_model('resnet18', features_only=True), resnet,
                                                 'maxpool') == 'maxpool'
    with pytest.raises(ValueError, match=r"does not keep the module 'fc' \(Linear\) of ResNet"):
        timm_moex.hooks.layers.feature_wrapper_layer(timm.create_model('resnet18', features_only=True), resnet, 'fc')


# ---- export: strip_moex returns the plain model ----

@pytest.mark.slow  # TorchScript, FX and torch.export of whole models
@pytest.mark.parametrize('variant', ['pyramidnet110_a48_moex', 'resnet18_cifar_moex'])
def test_strip_moex_gives_a_model_that_scripts_traces_and_exports(variant):
    kwargs, size, _ = SMALL[variant]
    base, model = _base_and_variant(variant, **kwargs)
    model.eval(), base.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():  # TorchScript compiles the hook too, to a no-op (MoEx acts in training only)
        torch.testing.assert_close(torch.jit.script(model)(x), base(x))
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    plain = timm_moex.strip_moex(model)
    assert plain is model and get_moex_hook(plain) is None
    assert all(torch.equal(v, keys[k]) for k, v in plain.state_dict().items())
    with torch.no_grad():
        expected = base(x)
        torch.testing.assert_close(plain(x), expected)
        torch.testing.assert_close(torch.jit.script(plain)(x), expected)
        traced = GraphExtractNet(plain, ['fc'])  # FX, with timm's leaf modules and untraced functions
        torch.testing.assert_close(traced(x), expected)
        exported = torch.export.export(plain, (x,))
        torch.testing.assert_close(exported.module()(x), expected)
    assert timm_moex.strip_moex(plain) is plain  # no hook: nothing to do


@pytest.mark.slow
def test_strip_moex_unwraps_compile():
    model = timm.create_model('resnet18_cifar_moex', num_classes=10)
    compiled = torch.compile(model)
    assert timm_moex.strip_moex(compiled) is model and get_moex_hook(model) is None


# ---- DenseNet-265, the paper's ImageNet DenseNet ----

@pytest.mark.slow
def test_densenet265_is_torchvisions_layout_and_loads_its_state_dict():
    torchvision = pytest.importorskip('torchvision')
    reference = torchvision.models.DenseNet(growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64)
    model = timm.create_model('densenet265')
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) == 33_337_704
    model.load_state_dict(reference.state_dict(), strict=True)
    variant = timm.create_model('densenet265_moex')
    variant.load_state_dict(reference.state_dict(), strict=True)
    assert get_moex_hook(variant).layer == 'features.pool0'
    model.eval(), reference.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
