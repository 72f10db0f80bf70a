import copy

import pytest
import timm
import torch

from timm_moex import attach_moex, get_moex_hook, moment_exchange, resolve_moex_layer

from conftest import slow_cases

# (timm model, kwargs that keep it small and fast on CPU, input size, the stem output module of that family)
MODELS = {
    'resnet18': (dict(num_classes=10), 32, 'maxpool'),
    # Layer scale 1e-6 (the default) makes every block an identity at init, and the next
    # LayerNorm over channels then undoes any PONO exchange: use trained-like layer scales.
    'convnext_atto': (dict(num_classes=10, ls_init_value=1.0), 32, 'stem'),
    # At 32 px its last maps are 1x1 and training-mode BN over them amplifies rounding.
    'efficientnet_b0': (dict(num_classes=10), 64, 'bn1'),
    'densenet121': (dict(num_classes=10), 32, 'features.pool0'),
    'vit_tiny_patch16_224': (dict(num_classes=10, img_size=32, patch_size=8), 32, 'norm_pre'),
}
# the families whose full-size models take a second per test on the CPU: outside the fast subset
MODEL_PARAMS = slow_cases(MODELS, ('efficientnet_b0', 'densenet121'))


def make(name, seed=0):
    kwargs, size, _ = MODELS[name]
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    if name.startswith('convnext'):
        # The stem ends in a LayerNorm over channels: at init (weight 1, bias 0) every position
        # has PONO moments (0, 1) and there is nothing to exchange. Trained weights differ.
        torch.nn.init.normal_(model.stem[1].weight)
        torch.nn.init.normal_(model.stem[1].bias)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def freeze_batch_stats(model):
    """Training mode with BN running statistics untouched, so forwards are comparable."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    return model


@pytest.mark.parametrize('name', MODEL_PARAMS)
def test_stem_resolution(name):
    model, _ = make(name)
    assert resolve_moex_layer(model) == MODELS[name][2]
    assert attach_moex(model).layer == MODELS[name][2]


@pytest.mark.parametrize('name', MODEL_PARAMS)
def test_hook_only_changes_armed_training_forwards(name):
    model, x = make(name)
    freeze_batch_stats(model)
    plain_train = model(x)
    model.eval()
    plain_eval = model(x)

    hook = attach_moex(model)
    assert get_moex_hook(model) is hook
    perm = torch.tensor([1, 2, 3, 0])

    hook.arm(perm)
    torch.testing.assert_close(model(x), plain_eval)
    assert not hook.armed, 'an eval forward must consume the arm'

    model.train()
    torch.testing.assert_close(model(x), plain_train)
    hook.arm(perm)
    assert hook.armed
    exchanged = model(x)
    assert not hook.armed
    assert (exchanged - plain_train).abs().max() > 1e-3
    torch.testing.assert_close(model(x), plain_train)


@pytest.mark.parametrize('name', MODEL_PARAMS)
def test_armed_output_is_the_exchanged_stem(name):
    """The rest of the network sees exactly moment_exchange(stem output)."""
    model, x = make(name)
    freeze_batch_stats(model)
    layer = model.get_submodule(resolve_moex_layer(model))
    seen = {}
    layer.register_forward_hook(lambda m, a, out: seen.__setitem__('stem', out.detach().clone()))
    model(x)
    stem = seen['stem']

    perm = torch.tensor([3, 0, 1, 2])
    after = {}
    hook = attach_moex(model)
    # A hook registered after MoEx's sees MoEx's output.
    layer.register_forward_hook(lambda m, a, out: after.__setitem__('stem', out.detach().clone()))
    hook.arm(perm)
    model(x)
    channel_dim = -1 if stem.dim() == 3 else 1
    torch.testing.assert_close(after['stem'], moment_exchange(stem, perm, channel_dim=channel_dim))


@pytest.mark.parametrize('name', MODEL_PARAMS)
def test_remove_restores_the_model(name):
    model, x = make(name)
    freeze_batch_stats(model)
    keys = list(model.state_dict())
    hooks_before = {n: dict(m._forward_hooks) for n, m in model.named_modules()}
    plain = model(x)

    hook = attach_moex(model)
    hook.arm(torch.tensor([1, 0, 3, 2]))
    hook.remove()
    assert get_moex_hook(model) is None
    assert {n: dict(m._forward_hooks) for n, m in model.named_modules()} == hooks_before
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), plain)
    with pytest.raises(RuntimeError, match='removed'):
        hook.arm(torch.tensor([1, 0, 3, 2]))
    attach_moex(model)  # a removed hook leaves room for a new one


# Dynamo traces the hook whatever the backend; inductor's code generation costs 20-40 s a model
# on 2 cores, so it runs on one CNN and one ViT, the rest through aot_eager.
INDUCTOR = ('resnet18', 'vit_tiny_patch16_224')


@pytest.mark.slow
@pytest.mark.parametrize('name', MODEL_PARAMS)
def test_compiled_fullgraph_equals_eager(name):
    model, x = make(name)
    freeze_batch_stats(model)
    hook = attach_moex(model)
    compiled = torch.compile(model, fullgraph=True, backend='inductor' if name in INDUCTOR else 'aot_eager')
    perm = torch.tensor([2, 3, 0, 1])

    hook.arm(perm)
    eager = model(x)
    hook.arm(perm)
    out = compiled(x)
    assert not hook.armed, 'the compiled forward must disarm the hook too'
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert get_moex_hook(compiled) is hook


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_hook_under_autocast(dtype):
    model, x = make('resnet18')
    freeze_batch_stats(model)
    hook = attach_moex(model)
    perm = torch.tensor([1, 2, 3, 0])
    seen = {}
    model.maxpool.register_forward_hook(lambda m, a, out: seen.__setitem__('dtype', out.dtype))
    hook.arm(perm)
    reference = model(x)
    with torch.autocast('cpu', dtype=dtype):
        hook.arm(perm)
        out = model(x)
    assert seen['dtype'] == dtype, 'the hook must see (and return) the autocast dtype'
    assert torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_deepcopy_gives_the_copy_its_own_idle_hook():
    model, x = make('resnet18')
    hook = attach_moex(model)
    ema = copy.deepcopy(model)
    ema_hook = get_moex_hook(ema)
    assert ema_hook is not hook and ema_hook.attached and not ema_hook.armed
    hook.arm(torch.tensor([1, 0, 3, 2]))
    assert not ema_hook.armed
    ema_hook.remove()
    assert hook.attached and not ema_hook.attached
    assert not ema.maxpool._forward_hooks


def test_layer_by_name_and_nhwc_layout():
    model, x = make('resnet18')
    freeze_batch_stats(model)
    hook = attach_moex(model, layer='layer1', norm='in')
    assert hook.layer == 'layer1'

    swin = timm.create_model('swin_tiny_patch4_window7_224', num_classes=3, img_size=32, window_size=2,
                             embed_dim=24, depths=(1, 1), num_heads=(1, 2))
    freeze_batch_stats(swin)
    seen = {}
    hook = attach_moex(swin)
    assert hook.layer == 'patch_embed'
    swin.patch_embed.register_forward_hook(lambda m, a, out: seen.__setitem__('out', out.detach().clone()))
    swin(x)
    plain = seen['out']
    assert plain.shape[-1] == 24, 'swin patch_embed gives NHWC'
    perm = torch.tensor([1, 0, 3, 2])
    hook.arm(perm)
    swin(x)
    torch.testing.assert_close(seen['out'], moment_exchange(plain, perm, channel_dim=-1))


def test_bad_attach_arguments():
    model, _ = make('resnet18')
    with pytest.raises(ValueError, match=r"'layer9'.*'conv1', 'bn1'"):
        attach_moex(model, layer='layer9')
    with pytest.raises(ValueError, match='shared by every sample'):
        attach_moex(model, norm='bn')
    with pytest.raises(ValueError, match="'nope'"):
        attach_moex(model, norm='nope')
    attach_moex(model)
    with pytest.raises(ValueError, match='already has'):
        attach_moex(model)
    with pytest.raises(ValueError, match='compile'):
        attach_moex(torch.compile(make('resnet18')[0]))


def test_model_without_a_known_stem():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"Pass layer=.*\['0', '1'\]"):
        attach_moex(model)
    assert attach_moex(model, layer='0').layer == '0'
