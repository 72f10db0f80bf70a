"""AutoMix: the Mix Block, the momentum encoder, the task's losses and its state."""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import timm_moex  # noqa: F401  (registers resnet18_cifar)
from timm_moex import attach_moex, get_moex_hook
from timm_moex.automix import (
    AutoMix, AutoMixTask, MixBlock, cosine_ramp, mask_area_loss, mix_images, parse_feature_layer,
    resolve_feature_layer)

NUM_CLASSES = 5


def cifar_model(moex=False, seed=0, name='resnet18_cifar'):
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=NUM_CLASSES)
    if moex:
        attach_moex(model)
    return model


def batch(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def fixed_lams(monkeypatch, lam_mb, lam):
    """Make the task's Beta draw return (lam_mb, lam)."""
    monkeypatch.setattr(torch.distributions.Beta, 'sample', lambda self, shape=(): torch.tensor([lam_mb, lam]))


# ---- Mix Block ----

@pytest.mark.parametrize('lam_embed', ['concat', 'mul'])
@pytest.mark.parametrize('upsample', ['nearest', 'bilinear'])
def test_mask_has_the_input_size_and_lies_in_0_1(lam_embed, upsample):
    block = MixBlock(16, lam_embed=lam_embed, upsample=upsample, init_std=1.0)  # large weights: a varied mask
    z = torch.randn(4, 16, 4, 5) * 3
    mask = block(z, torch.tensor([1, 0, 3, 2]), 0.3, (32, 40))
    assert mask.shape == (4, 1, 32, 40) and mask.dtype == torch.float32
    assert mask.min() >= 0 and mask.max() <= 1 and mask.std() > 0.01
    if upsample == 'nearest':  # 8x8 blocks of one value
        assert torch.equal(mask[:, :, :8, :8], mask[:, :, :1, :1].expand(-1, -1, 8, 8))


def test_first_masks_are_near_one_half():
    mask = MixBlock(64)(torch.randn(8, 64, 8, 8), torch.randperm(8), 0.7, (32, 32))
    assert (mask - 0.5).abs().max() < 0.05


def test_mask_depends_on_lam_and_on_the_partner():
    torch.manual_seed(0)
    block = MixBlock(8, init_std=0.5)
    z, perm = torch.randn(3, 8, 4, 4), torch.tensor([1, 2, 0])
    base = block(z, perm, 0.3, (4, 4))
    assert not torch.allclose(base, block(z, perm, 0.8, (4, 4)))
    assert not torch.allclose(base, block(z, torch.tensor([2, 0, 1]), 0.3, (4, 4)))


def test_mask_under_bf16_autocast_is_finite_float32():
    block = MixBlock(32, init_std=0.5)
    z = torch.randn(4, 32, 8, 8) * 100  # large features: the attention logits are computed in float32
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mask = block(z, torch.randperm(4), 0.5, (32, 32))
    assert mask.dtype == torch.float32 and torch.isfinite(mask).all()


@pytest.mark.parametrize('kwargs, match', [
    (dict(in_chs=0), 'in_chs'), (dict(in_chs=8, reduction=0), 'reduction'), (dict(in_chs=8, reduction=9), 'reduction'),
    (dict(in_chs=8, lam_embed='add'), "lam_embed.*'add'"), (dict(in_chs=8, upsample='cubic'), "upsample.*'cubic'")])
def test_mix_block_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixBlock(**kwargs)


def test_mix_block_needs_maps():
    with pytest.raises(ValueError, match=r'\(B, C, H, W\).*\(2, 8\)'):
        MixBlock(8)(torch.randn(2, 8), torch.tensor([1, 0]), 0.5, (4, 4))


# ---- mask-area loss and mixing ----

def test_area_loss_by_hand():
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :2] = 1.0  # area 0.5
    mask[1, :, :1] = 1.0  # area 0.25
    assert mask_area_loss(mask, 0.5, margin=0.1).item() == pytest.approx((0.0 + 0.15) / 2)
    assert mask_area_loss(mask, 0.3, margin=0.0).item() == pytest.approx((0.2 + 0.05) / 2)
    assert mask_area_loss(mask, 0.4, margin=0.2).item() == 0.0  # both within the margin


@pytest.mark.parametrize('lam', [0.2, 0.8])
def test_area_loss_moves_the_mask_area_towards_lam(lam):
    torch.manual_seed(0)
    block = MixBlock(16)
    z, perm = torch.randn(8, 16, 8, 8), torch.randperm(8)
    opt = torch.optim.Adam(block.parameters(), lr=0.05)
    start = block(z, perm, lam, (32, 32)).mean().item()
    for _ in range(60):
        loss = mask_area_loss(block(z, perm, lam, (32, 32)), lam, margin=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = block(z, perm, lam, (32, 32)).flatten(1).mean(1)
    assert abs(start - lam) > 0.25
    assert (end - lam).abs().max() < 0.05


def test_mix_images():
    x, perm = torch.randn(4, 3, 8, 8), torch.tensor([3, 2, 1, 0])
    torch.testing.assert_close(mix_images(x, perm, torch.ones(4, 1, 8, 8)), x)
    torch.testing.assert_close(mix_images(x, perm, torch.zeros(4, 1, 8, 8)), x[perm])
    torch.testing.assert_close(mix_images(x, perm, 0.3), 0.3 * x + 0.7 * x[perm])
    mask = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(mix_images(x, perm, mask), mask * x + (1 - mask) * x[perm])
    half = mix_images(x.bfloat16(), perm, mask)
    assert half.dtype == torch.bfloat16


def test_cosine_ramp():
    assert cosine_ramp(0, 100) == 1.0 and cosine_ramp(100, 100) == pytest.approx(0.0, abs=1e-12)
    assert cosine_ramp(50, 100) == pytest.approx(0.5) and cosine_ramp(500, 100) == pytest.approx(0.0, abs=1e-12)
    assert cosine_ramp(7, None) == 1.0


# ---- feature layer ----

@pytest.mark.parametrize('name, layer', [('resnet18', 'layer3'), ('resnet18_cifar', 'layer3'),
                                         ('convnext_atto', 'stages.2'), ('efficientnet_b0', 'blocks.4')])
def test_default_feature_layer_is_the_stage_before_the_last(name, layer):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert resolve_feature_layer(model) == layer


def test_feature_layer_errors():
    model = cifar_model()
    with pytest.raises(ValueError, match=r'out of range.*5 feature_info'):
        resolve_feature_layer(model, 7)
    with pytest.raises(ValueError, match=r"no module 'layer9'.*'layer1'"):
        resolve_feature_layer(model, 'layer9')
    with pytest.raises(ValueError, match='exposes no feature_info'):
        resolve_feature_layer(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), -2)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) feature maps.*'blocks.10'.*\(1, 197, 192\)"):
        AutoMix(timm.create_model('vit_tiny_patch16_224', num_classes=NUM_CLASSES))
    assert parse_feature_layer(' -2') == -2 and parse_feature_layer('layer3') == 'layer3'


def test_automix_on_timm_families():
    for name in ('resnet18', 'convnext_atto', 'efficientnet_b0', 'densenet121'):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=NUM_CLASSES)
        task = AutoMixTask(model, verbose=False)
        x, y = batch(4, 64)
        result = task(x, y)
        result['loss'].backward()
        assert torch.isfinite(result['loss'])
        assert model.get_classifier().weight.grad is not None, name


# ---- momentum encoder ----

def test_momentum_encoder_is_a_frozen_copy_without_moex():
    model = cifar_model(moex=True)
    automix = AutoMix(model)
    assert get_moex_hook(automix.encoder) is None and get_moex_hook(model) is not None
    assert not any(p.requires_grad for p in automix.encoder.parameters())
    assert all(p.requires_grad for p in automix.mix_block.parameters())
    assert automix.mix_block.query.in_channels == 256 + 1  # layer3 of resnet18_cifar, plus the lam channel


def test_momentum_update_copies_then_follows_the_schedule():
    model = cifar_model()
    automix = AutoMix(model, momentum=0.9, total_steps=4)
    with torch.no_grad():  # the first update copies, whatever the encoder held
        for p in automix.encoder.parameters():
            p.fill_(3.0)
    automix.update_momentum(model)
    for a, b in zip(automix.encoder.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert automix.momentum == pytest.approx(1 - 0.1 * cosine_ramp(1, 4))
    m = automix.momentum
    before = [p.clone() for p in automix.encoder.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.layer1[0].bn1.running_mean.fill_(7.0)
    automix.update_momentum(model)
    for old, new, online in zip(before, automix.encoder.parameters(), model.parameters()):
        torch.testing.assert_close(new, m * old + (1 - m) * online)
    assert torch.equal(automix.encoder.layer1[0].bn1.running_mean, model.layer1[0].bn1.running_mean)
    assert int(automix.num_updates) == 2
    for _ in range(2):
        automix.update_momentum(model)
    assert automix.momentum == 1.0 and automix.ramp == pytest.approx(0.0, abs=1e-12)


def test_checkpoint_round_trip_restores_mix_block_and_momentum_encoder(tmp_path):
    model = cifar_model()
    automix = AutoMix(model, total_steps=10)
    task = AutoMixTask(model, automix, verbose=False)
    opt = torch.optim.SGD(list(model.parameters()) + list(automix.mix_block.parameters()), lr=0.1)
    for seed in range(3):
        opt.zero_grad()
        task(*batch(seed=seed))['loss'].backward()
        opt.step()
    path = tmp_path / 'automix.safetensors'
    save_file(automix.state_dict(), str(path))  # as accelerator.save_state does: no shared tensors

    fresh = AutoMix(cifar_model(seed=1), total_steps=10)
    assert not torch.equal(fresh.mix_block.query.weight, automix.mix_block.query.weight)
    fresh.load_state_dict(load_file(str(path)))
    for (k, a), b in zip(automix.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert fresh.momentum == automix.momentum and int(fresh.num_updates) == 3
    # the timm task-state route too
    other = AutoMixTask(cifar_model(seed=2), verbose=False)
    other.load_task_state(task.get_task_state())
    assert torch.equal(other.automix.encoder.fc.weight, automix.encoder.fc.weight)
    with pytest.raises(KeyError, match="no 'automix'"):
        other.load_task_state({'projection': {}})


# ---- the task ----

def test_gradients_reach_the_right_parameters():
    model = cifar_model()
    task = AutoMixTask(model, verbose=False)
    task(*batch())['loss'].backward()
    assert all(p.grad is None for p in task.automix.encoder.parameters())  # the momentum encoder: none
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in task.automix.mix_block.parameters())
    assert model.conv1.weight.grad.abs().sum() > 0


def test_online_logits_do_not_reach_the_mix_block():
    """The online encoder trains on images mixed with the detached mask."""
    task = AutoMixTask(cifar_model(), verbose=False)
    result = task(*batch())
    params = list(task.automix.mix_block.parameters())
    assert all(g is None for g in torch.autograd.grad(result['output'].sum(), params, allow_unused=True,
                                                      retain_graph=True))
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(result['loss'], params))


def test_loss_is_the_sum_of_its_terms_and_the_mixed_images_use_the_mask(monkeypatch):
    fixed_lams(monkeypatch, 0.35, 0.6)
    model = cifar_model()
    automix = AutoMix(model, total_steps=8)
    task = AutoMixTask(model, automix, clean_weight=0.5, area_weight=0.2, verbose=False)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    x, y = batch()
    result = task(x, y)
    assert result['lam'] == pytest.approx(0.6) and not result['plain_mixup'] and not result['moex']
    online_input = seen[-1]
    assert online_input.shape[0] == 2 * x.shape[0]
    torch.testing.assert_close(online_input[x.shape[0]:], x)  # the clean half
    mask = automix(x, torch.arange(6), 0.5, result['perm'], 0.6)['mask']  # same momentum weights: same mask
    torch.testing.assert_close(online_input[:x.shape[0]], mix_images(x, result['perm'], mask))
    out, perm = result['output'], result['perm']
    mix = 0.6 * F.cross_entropy(out, y) + 0.4 * F.cross_entropy(out, y[perm])
    torch.testing.assert_close(result['mix_loss'], mix.detach())
    area_w = 0.2 * cosine_ramp(0, 8)  # the first step: the full weight
    total = result['mix_loss'] + 0.5 * result['clean_loss'] + result['mix_block_loss'] + area_w * result['area_loss']
    torch.testing.assert_close(result['loss'].detach(), total, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('lam', [0.05, 0.95])
def test_lam_near_0_or_1_gives_plain_mixup(monkeypatch, lam):
    fixed_lams(monkeypatch, 0.5, lam)
    model = cifar_model()
    task = AutoMixTask(model, clean_weight=0.0, verbose=False)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    x, y = batch()
    result = task(x, y)
    assert result['plain_mixup'] and seen[-1].shape[0] == x.shape[0]
    torch.testing.assert_close(seen[-1], lam * x + (1 - lam) * x[result['perm']])
    assert result['clean_loss'] is None


def test_moex_shares_the_pairing_and_leaves_the_clean_half(monkeypatch):
    fixed_lams(monkeypatch, 0.5, 0.7)
    model = cifar_model(moex=True)
    hook = get_moex_hook(model)
    armed = []
    original_arm = hook.arm
    monkeypatch.setattr(hook, 'arm', lambda perm: (armed.append(perm.clone()), original_arm(perm)))
    task = AutoMixTask(model, hook=hook, moex_prob=1.0, moex_lam=0.8, verbose=False)
    x, y = batch()
    result = task(x, y)
    assert result['moex']
    perm = result['perm']
    assert torch.equal(armed[-1], torch.cat([perm, torch.arange(6, 12)]))
    out = result['output']

    def mixup(t):
        return 0.7 * F.cross_entropy(out, t) + 0.3 * F.cross_entropy(out, t[perm])
    torch.testing.assert_close(result['mix_loss'], (0.8 * mixup(y) + 0.2 * mixup(y[perm])).detach())
    assert not hook.armed  # consumed by the one forward


def test_moex_prob_zero_never_arms(monkeypatch):
    model = cifar_model(moex=True)
    task = AutoMixTask(model, hook=get_moex_hook(model), moex_prob=0.0, verbose=False)
    assert not any(task(*batch(seed=s))['moex'] for s in range(3))


def test_flip_pairing():
    task = AutoMixTask(cifar_model(), pairing='flip', verbose=False)
    assert torch.equal(task(*batch())['perm'], torch.arange(5, -1, -1))


def test_eval_mode_is_the_plain_loss():
    model = cifar_model()
    task = AutoMixTask(model, verbose=False)
    model.eval()
    x, y = batch()
    result = task(x, y)
    assert not result['automix'] and int(task.automix.num_updates) == 0
    torch.testing.assert_close(result['loss'], F.cross_entropy(model(x), y))


def test_both_encoders_learn_a_toy_problem():
    """End to end on a separable toy problem: the online and the momentum encoder (used, as in
    training, with batch statistics) both learn it, and the Mix Block's weights move."""
    torch.manual_seed(0)
    model = timm.create_model('resnet10t', num_classes=2)
    automix = AutoMix(model, momentum=0.9, total_steps=40, input_size=(3, 32, 32))
    task = AutoMixTask(model, automix, verbose=False)
    opt = torch.optim.SGD(list(model.parameters()) + list(automix.mix_block.parameters()), lr=0.05, momentum=0.9)
    x = torch.randn(16, 3, 32, 32)
    y = torch.arange(16) % 2
    x[y == 1, 0] += 1.5  # class 1: a brighter first channel
    start = automix.mix_block.value.weight.clone()
    with torch.no_grad():
        assert (automix.encoder(x).argmax(1) == y).float().mean() < 0.9
    for _ in range(40):
        result = task(x, y)
        opt.zero_grad()
        result['loss'].backward()
        opt.step()
    assert not torch.allclose(automix.mix_block.value.weight, start)
    with torch.no_grad():
        assert (automix.encoder(x).argmax(1) == y).float().mean() > 0.9
        assert (model.eval()(x).argmax(1) == y).float().mean() > 0.9


@pytest.mark.parametrize('kwargs, match', [
    (dict(alpha=0), 'alpha'), (dict(alpha=math.inf), 'alpha'), (dict(lam_margin=0.5), 'lam_margin.*0.5'),
    (dict(lam_margin=-0.1), 'lam_margin'), (dict(clean_weight=-1), 'clean_weight'),
    (dict(area_weight=math.nan), 'area_weight'), (dict(area_margin=2), 'area_margin'),
    (dict(moex_prob=1.5), 'moex_prob'), (dict(moex_lam=-0.5), 'moex_lam'), (dict(pairing='shift'), 'pairing'),
    (dict(hook='stem'), 'hook'), (dict(automix=nn.Linear(2, 2)), 'automix')])
def test_task_rejects_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AutoMixTask(cifar_model(), verbose=False, **kwargs)


@pytest.mark.parametrize('kwargs, match', [
    (dict(momentum=1.5), 'momentum'), (dict(total_steps=0), 'total_steps'), (dict(feature_layer=2.5), 'feature layer')])
def test_automix_rejects_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AutoMix(cifar_model(), **kwargs)
