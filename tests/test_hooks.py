import copy
import re

import pytest
import timm
import torch

import timm_moex.hooks.moex
from timm_moex import attach_moex, get_moex_hook, moment_exchange, resolve_moex_layer, strip_moex
from timm_moex.hooks import MoExHook, feature_wrapper_layer

import helpers
from helpers import freeze_batch_stats, slow_cases

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
    model, x = helpers.make(name, size, seed, **kwargs)
    if name.startswith('convnext'):
        # The stem ends in a LayerNorm over channels: at init (weight 1, bias 0) every position
        # has PONO moments (0, 1) and there is nothing to exchange. Trained weights differ.
        torch.nn.init.normal_(model.stem[1].weight)
        torch.nn.init.normal_(model.stem[1].bias)
    return model, x


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
    with pytest.raises(ValueError, match=r"^layer='layer9' is not a module of ResNet; use 'stem' or a dotted module "
                                         r"name. Its top-level modules are \['conv1', 'bn1', 'act1', 'maxpool', "
                                         r"'layer1', 'layer2', 'layer3', 'layer4', 'global_pool', 'fc'\]$"):
        attach_moex(model, layer='layer9')
    with pytest.raises(ValueError, match='shared by every sample'):
        attach_moex(model, norm='bn')
    with pytest.raises(ValueError, match="'nope'"):
        attach_moex(model, norm='nope')
    attach_moex(model)
    with pytest.raises(ValueError, match=r"^ResNet already has MoExHook\(layer='maxpool', norm='pono', eps=1e-05, "
                                         r"detach=False, armed=False\); call .remove\(\) on it first$"):
        attach_moex(model)
    with pytest.raises(ValueError, match=r'^attach_moex got a torch.compile\(\)d model: a hook added after compiling '
                                         r'is not traced. Attach MoEx to the plain model first, then compile it.$'):
        attach_moex(torch.compile(make('resnet18')[0]))


RESNET_MODULES = r"\['conv1', 'bn1', 'act1', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4', 'global_pool', 'fc'\]"


@pytest.mark.parametrize('attach', [lambda model, layer: attach_moex(model, layer=layer), MoExHook,
                                    resolve_moex_layer])
def test_an_empty_layer_is_no_module(attach):
    """get_submodule('') is the model itself: attach_moex hooked the whole model's output before."""
    model, _ = make('resnet18')
    with pytest.raises(ValueError, match=r"^layer='' is not a module of ResNet; use 'stem' or a dotted module name. "
                                         r"Its top-level modules are " + RESNET_MODULES + '$'):
        attach(model, '')
    assert not model._forward_hooks


def test_the_hook_class_names_an_unknown_layer_and_finds_the_stem():
    """An AttributeError from get_submodule before; the hook takes 'stem' as attach_moex does."""
    model, _ = make('resnet18')
    with pytest.raises(ValueError, match=r"^layer='layer9' is not a module of ResNet; use 'stem' or a dotted module "
                                         r"name. Its top-level modules are " + RESNET_MODULES + '$'):
        MoExHook(model, 'layer9')
    hook = MoExHook(model, 'stem')
    assert hook.layer == 'maxpool' and hook.attached and model.maxpool._forward_hooks


@pytest.mark.parametrize('call', [attach_moex, get_moex_hook, strip_moex, lambda model: MoExHook(model, 'stem')])
@pytest.mark.parametrize('model, shown', [('resnet18', "str 'resnet18'"), (None, 'NoneType None')])
def test_a_model_that_is_no_module_is_refused_by_type(call, model, shown):
    """attach_moex('resnet18') raised AttributeError, strip_moex(None) returned None."""
    name = model or 'resnet50'
    with pytest.raises(TypeError, match=rf"^model must be a torch.nn.Module; got {shown}: build it first, e.g. "
                                        rf"timm.create_model\('{name}'\)$"):
        call(model)


def test_model_without_a_known_stem():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"Pass layer=.*\['0', '1'\]"):
        attach_moex(model)
    assert attach_moex(model, layer='0').layer == '0'


def test_feature_wrapper_layer_flattens_two_levels_only_and_names_the_wrapper():
    densenet, flat = timm.create_model('densenet121'), timm.create_model('densenet121', features_only=True)
    assert feature_wrapper_layer(flat, densenet, 'features.denseblock1.denselayer2.conv1') == \
        'features_denseblock1.denselayer2.conv1'
    resnet, listed = timm.create_model('resnet18'), timm.create_model('resnet18', features_only=True)
    with pytest.raises(ValueError, match=r"^FeatureListNet does not keep the module 'fc' \(Linear\) of ResNet; pass "
                                         r"layer= one of its modules: \['conv1', 'bn1', 'act1', 'maxpool', 'layer1', 'layer2', "
                                         r"'layer3', 'layer4'\]$"):
        feature_wrapper_layer(listed, resnet, 'fc')


class Staged(torch.nn.Module):
    """A model outside STEM_LAYERS whose group_matcher names its stem (a module with children) by a regex."""

    def __init__(self, stem_patterns):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        self.stem_pool = torch.nn.MaxPool2d(2)
        self.body = torch.nn.Conv2d(4, 4, 3)
        self.stem_patterns = stem_patterns

    def group_matcher(self, coarse=False):
        return dict(stem=self.stem_patterns, blocks=r'^body')


@pytest.mark.parametrize('patterns, stem', [
    (r'^stem', 'stem_pool'),  # the last outermost match in registration order, not one of stem's children
    ([(r'^stem\.', (0,)), (r'^body', (1,))], 'body'),  # timm's (regex, ordinal) pairs: the regex is the first item
    ([r'^stem\.'], 'stem.1'),
    (r'^stem$', 'stem'),
    (r'^stem(?!_)', 'stem'),  # the stem's own children match too, and come last
])
def test_stem_from_the_group_matcher(patterns, stem):
    assert resolve_moex_layer(Staged(patterns)) == stem


def test_a_group_matcher_that_matches_nothing_is_no_stem():
    with pytest.raises(ValueError, match=r"^Cannot find the stem of Staged: it is not in timm_moex.STEM_LAYERS and has no "
                                         r"group_matcher\(\)\['stem'\]. Pass layer= one of its modules, e.g. one of "
                                         r"\['stem', 'stem_pool', 'body'\]$"):
        resolve_moex_layer(Staged(r'^nothing'))


def test_arm_refuses_what_is_not_a_permutation_and_remove_is_idempotent():
    model, _ = make('resnet18')
    hook = attach_moex(model)
    for bad in ([1, 0], torch.tensor([[1, 0]]), torch.tensor(1)):
        with pytest.raises(ValueError, match=r'^perm must be a 1-D tensor of sample indices; got '):
            hook.arm(bad)
    assert not hook.armed
    hook.arm(torch.tensor([1, 0]))
    hook.remove()
    assert not hook.armed and not hook.attached
    hook.remove()  # twice is harmless
    with pytest.raises(RuntimeError, match=r'^This MoExHook was removed; attach a new one with timm_moex.attach_moex$'):
        hook.arm(torch.tensor([1, 0]))
    # a hook made directly (not through attach_moex, so not kept on the model) removes itself too
    direct = MoExHook(model, 'maxpool')
    direct.remove()
    assert not direct.attached and get_moex_hook(model) is None


def test_a_layer_that_returns_no_tensor_is_named():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    model[0].register_forward_hook(lambda module, args, output: (output,))
    hook = attach_moex(model, layer='0')
    hook.arm(torch.tensor([1, 0]))
    with pytest.raises(TypeError, match=r"^MoEx layer '0' returns tuple, not a tensor; choose another layer$"):
        model(torch.randn(2, 3, 8, 8))


def test_strip_moex_removes_the_hook_and_returns_the_plain_model():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    hook = attach_moex(model, layer='0')
    assert strip_moex(torch.nn.DataParallel(model)) is model
    assert get_moex_hook(model) is None and not hook.attached and not model[0]._forward_hooks
    assert strip_moex(model) is model  # nothing to remove is fine


def test_the_hook_hands_its_settings_to_moment_exchange(monkeypatch):
    calls = []

    def exchange(output, perm, norm, spec, eps, channel_dim, detach, impl):
        calls.append(dict(norm=norm, eps=eps, channel_dim=channel_dim, detach=detach, impl=impl))
        assert spec == timm_moex.ops.moex.parse_norm(norm)
        return output

    monkeypatch.setattr(timm_moex.hooks.moex, 'exchange_parsed', exchange)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    x, perm = torch.randn(2, 3, 8, 8), torch.tensor([1, 0])
    hook = attach_moex(model, layer='0')  # the defaults
    assert (hook.norm, hook.eps, hook.detach, hook.channel_dim, hook.impl) == ('pono', 1e-5, False, None, 'auto')
    hook.arm(perm)
    model(x)
    hook.remove()
    hook = MoExHook(model, '0')
    assert (hook.norm, hook.eps, hook.detach, hook.channel_dim, hook.impl) == ('pono', 1e-5, False, None, 'auto')
    hook.remove()
    hook = attach_moex(model, layer='0', norm='gn2', eps=0.0, detach=True, channel_dim=-1, impl='torch')
    hook.arm(perm)
    model(x)
    assert calls == [dict(norm='pono', eps=1e-5, channel_dim=1, detach=False, impl='auto'),
                     dict(norm='gn2', eps=0.0, channel_dim=-1, detach=True, impl='torch')]
    for eps in (-1e-6, float('inf')):
        with pytest.raises(ValueError, match=rf'^eps must be a finite number >= 0 \(it is added to the variance\); '
                                             rf'got {eps!r}$'):
            attach_moex(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), layer='0', eps=eps)


def test_a_getter_wrapper_of_an_nhwc_model_exchanges_over_the_channels_last():
    swin = timm.create_model('swin_tiny_patch4_window7_224', features_only=True, feature_cls='getter', img_size=32,
                             window_size=2, embed_dim=24, depths=(1, 1), num_heads=(1, 2))
    with torch.no_grad():  # LayerNorm at init leaves every position with mean 0 and std 1: nothing to exchange
        swin.model.patch_embed.norm.weight.uniform_(0.5, 2.0)
        swin.model.patch_embed.norm.bias.normal_()
    hook = MoExHook(swin, 'model.patch_embed')
    seen = {}
    swin.model.patch_embed.register_forward_hook(lambda m, a, out: seen.__setitem__('out', out.detach().clone()))
    x, perm = torch.randn(4, 3, 32, 32), torch.tensor([1, 0, 3, 2])
    swin(x)
    plain = seen['out']
    hook.arm(perm)
    swin(x)
    torch.testing.assert_close(seen['out'], moment_exchange(plain, perm, channel_dim=-1))


def test_the_stem_of_a_getter_wrapper_is_inside_its_model():
    getter = timm.create_model('resnet18', features_only=True, feature_cls='getter')
    assert resolve_moex_layer(getter) == 'model.maxpool'
    assert resolve_moex_layer(getter, 'model.layer1') == 'model.layer1'


def test_a_list_wrapper_has_no_stem_to_find():
    listed = timm.create_model('resnet18', features_only=True)
    with pytest.raises(ValueError, match=re.escape(
            "Cannot find the stem of FeatureListNet: timm's features_only wrapper does not keep the model's class. "
            "Create it as timm.create_model('<name>_moex', features_only=True) or with timm_moex.create_model, or pass "
            "layer= one of its modules: ['conv1', 'bn1', 'act1', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4']")):
        resolve_moex_layer(listed)
    assert resolve_moex_layer(listed, 'maxpool') == 'maxpool'


def test_stem_layers_come_before_the_group_matcher():
    ResNet = type('ResNet', (Staged,), {})  # a class of the name STEM_LAYERS knows, whatever its matcher says
    model = ResNet(r'^stem')
    model.maxpool = torch.nn.MaxPool2d(2)
    assert resolve_moex_layer(model) == 'maxpool'
    assert resolve_moex_layer(Staged(r'^stem')) == 'stem_pool'


def test_the_hook_parses_its_norm_once_and_checks_its_impl(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    hook = attach_moex(model, layer='0', norm='gn2', impl='torch')
    x, perm = torch.randn(2, 3, 8, 8), torch.tensor([1, 0])
    model.train()
    with torch.no_grad():
        expected = moment_exchange(model[0](x), perm, norm='gn2')  # the hook is not armed yet
    hook.arm(perm)

    def no_parsing(norm):
        raise AssertionError(f'{norm!r} parsed in a forward')

    monkeypatch.setattr(timm_moex.ops.moments, 'parse_norm', no_parsing)
    monkeypatch.setattr(timm_moex.ops.moex, 'parse_norm', no_parsing)
    with torch.no_grad():
        out = model(x)
    assert not hook.armed and not torch.allclose(out, model[0](x))
    torch.testing.assert_close(out, expected)
    with pytest.raises(AttributeError):
        hook.norm = 'in'  # the parsed form would no longer be the norm's
    with pytest.raises(ValueError, match=r"^impl='cuda' is not an implementation of moment_exchange"):
        hook.impl = 'cuda'
    assert hook.impl == 'torch'
    with pytest.raises(ValueError, match=r"^impl='cuda' is not an implementation of moment_exchange"):
        attach_moex(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), layer='0', impl='cuda')


def test_convert_sync_batchnorm_keeps_the_hook_and_timms_activations():
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv3_small_050', num_classes=3).eval()
    hook = attach_moex(model, layer='bn1', norm='in', eps=1e-3, detach=True, channel_dim=1, impl='torch')
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    converted = timm_moex.convert_sync_batchnorm(model)
    # timm's BatchNormAct layers keep their activation (torch's converter drops it, silently)
    assert type(converted.bn1).__name__ == 'SyncBatchNormAct'
    torch.testing.assert_close(converted(x), expected)
    moved = get_moex_hook(converted)
    assert moved is not hook and not hook.attached and moved.attached and moved._module is converted.bn1
    assert (moved.layer, moved.norm, moved.eps, moved.detach, moved.channel_dim, moved.impl) == \
        ('bn1', 'in', 1e-3, True, 1, 'torch')


def test_reattach_moex_moves_a_hook_only_off_a_replaced_module():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    hook = attach_moex(model, layer='1')
    assert timm_moex.reattach_moex(model) is hook  # its module is still the model's
    model[1] = torch.nn.BatchNorm2d(4)
    moved = timm_moex.reattach_moex(torch.nn.DataParallel(model))
    assert moved is get_moex_hook(model) and moved._module is model[1] and not hook.attached
    assert timm_moex.reattach_moex(torch.nn.Linear(2, 2)) is None


# ---- a hook that nothing arms ----

def _tiny(moex_layer='0'):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return model, attach_moex(model, layer=moex_layer)


UNARMED = ("The MoEx hook at '0' ran 3 training forwards and was never armed, so no moments were exchanged: train "
           "with timm_moex.MoExClassificationTask (timm's train.py: moex-timm-train), or call hook.arm(perm) before "
           "each forward")


def test_a_hook_that_timms_plain_task_never_arms_says_once_how_to_get_moex(monkeypatch, caplog):
    """timm's train.py with a *_moex model trained a whole run without one exchange, silently."""
    monkeypatch.setattr(timm_moex.hooks.moex, 'UNARMED_WARNING_AFTER', 3)
    model, hook = _tiny()
    task = timm.task.ClassificationTask(model, criterion=torch.nn.CrossEntropyLoss(), verbose=False)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    task.eval()
    for _ in range(5):
        task(x, y)  # eval forwards do not count
    task.train()
    for step in range(8):
        task(x, y)
        messages = [r.getMessage() for r in caplog.records if r.name == 'timm_moex.hooks.moex']
        assert messages == ([] if step < 2 else [UNARMED]), step
    assert not hook.warn_unarmed


def test_a_hook_armed_once_or_driven_by_a_task_never_says_it():
    from timm_moex import MoExMixing
    x = torch.randn(2, 3, 8, 8)
    model, hook = _tiny()
    assert hook.warn_unarmed
    hook.arm(torch.tensor([1, 0]))
    assert not hook.warn_unarmed
    model, hook = _tiny()
    MoExMixing(hook, prob=0.0)  # MoEx off on purpose
    assert not hook.warn_unarmed
    model(x)
    assert hook._unarmed_forwards == 0


@pytest.mark.slow  # a compile
def test_counting_unarmed_forwards_keeps_one_compiled_graph():
    model, hook = _tiny()
    counts = []
    compiled = torch.compile(model, fullgraph=True, backend=lambda gm, _: counts.append(gm) or gm.forward)
    for _ in range(4):
        compiled(torch.randn(2, 3, 8, 8))
    assert len(counts) == 1 and hook.warn_unarmed


# ---- TorchScript compiles the hook ----

def test_a_hooked_model_scripts_and_the_script_leaves_moex_out():
    """TorchScript compiles a module's forward hooks: a Python hook made timm's TorchScript tests fail."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    hook = attach_moex(model, layer='2')
    x, perm = torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 0])
    model.eval()
    scripted = torch.jit.script(model)
    traced = torch.jit.script(torch.fx.symbolic_trace(model))
    with torch.no_grad():
        for script in (scripted, traced):
            torch.testing.assert_close(script(x), model(x))
        freeze_batch_stats(model)
        hook.arm(perm)  # the eager model still exchanges moments
        exchanged = model(x)
        assert not hook.armed and not torch.allclose(exchanged, model(x))


def test_each_deep_copy_runs_its_own_hook():
    model, hook = _tiny()
    ema = copy.deepcopy(model)
    ema_hook = get_moex_hook(ema) or ema[0]._moex_layer_hook
    assert ema_hook is not hook
    ema_hook.arm(torch.tensor([1, 0]))
    ema(torch.randn(2, 3, 8, 8))
    assert not ema_hook.armed
    hook.arm(torch.tensor([1, 0]))
    ema(torch.randn(2, 3, 8, 8))
    assert hook.armed
