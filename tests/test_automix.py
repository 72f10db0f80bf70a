"""AutoMix: the Mix Block, the momentum encoder, the task's losses and its state."""
import copy
import functools
import math
import re

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

import timm_moex  # noqa: F401  (registers resnet18_cifar)
from timm_moex import MoExMixing, get_moex_hook
from timm_moex.task.automix import (
    AutoMix, AutoMixTask, MixBlock, cosine_ramp, mask_area_loss, mix_images, parse_feature_layer,
    resolve_feature_layer)
from timm_moex.train import load_config

import helpers
from helpers import ROOT, check_timm_task_arguments

NUM_CLASSES = 5


# ResNet-18 for CIFAR at a quarter of its width and one block per stage: its stages and layer names,
# a sixteenth of its compute
SLIM = dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128))
cifar_model = functools.partial(helpers.cifar_model, num_classes=NUM_CLASSES, **SLIM)
batch = functools.partial(helpers.batch, num_classes=NUM_CLASSES)


def fixed_lams(monkeypatch, lam_mb, lam):
    """Make the task's Beta draw return (lam_mb, lam)."""
    monkeypatch.setattr(torch.distributions.Beta, 'sample', lambda self, shape=(): torch.tensor([lam_mb, lam]))


def reference_mix_block_mask(block, z, perm, lam, scale):
    """The released Mix Block (OpenMixup's PixelMixBlock, mask_mode 'none_v_'), written out pair by pair in
    float64 from its formula: the attention of image i's positions over its partner's (softmax over the
    partner's), applied to the partner's values; the upsampled sigmoid is the partner's weight, 1 minus it
    image i's."""
    wq, bq = block.query.weight.double()[:, :, 0, 0], block.query.bias.double()
    wv, bv = block.value.weight.double()[:, :, 0, 0], block.value.bias.double()

    def embed(features, weight):  # (C, H, W) -> (C', N)
        flat = features.double().flatten(1)
        if block.lam_embed == 'concat':
            return torch.cat([flat, torch.full_like(flat[:1], weight)])
        return flat * weight if block.lam_embed == 'mul' else flat

    masks = []
    for i in range(z.shape[0]):
        own, partner = embed(z[i], lam), embed(z[int(perm[i])], 1.0 - lam)
        query, key, value = wq @ own + bq[:, None], wq @ partner + bq[:, None], wv @ partner + bv[:, None]
        attention = torch.softmax(query.T @ key / math.sqrt(query.shape[0]), dim=1)  # rows: image i's positions
        assert torch.allclose(attention.sum(1), torch.ones(attention.shape[0], dtype=torch.float64))
        logits = (attention @ value.T).view(1, 1, *z.shape[-2:])
        logits = logits.repeat_interleave(scale, 2).repeat_interleave(scale, 3)  # nearest upsampling
        masks.append(1.0 - torch.sigmoid(logits[0]))
    return torch.stack(masks)


def record_arms(monkeypatch, hook) -> list:
    """The permutations ``hook`` is armed with from now on (it still arms)."""
    armed = []
    arm = hook.arm
    monkeypatch.setattr(hook, 'arm', lambda perm: (armed.append(perm.clone()), arm(perm)))
    return armed


def non_involutive_pairings(monkeypatch, *perms):
    """Make the task's pairing draws return ``perms`` in turn (the Mix Block's, then the online encoder's)."""
    queue = [torch.as_tensor(p) for p in perms]
    monkeypatch.setattr('timm_moex.task.automix.draw_pairing', lambda kind, n, device: queue.pop(0).to(device))


# ---- Mix Block ----

@pytest.mark.parametrize('lam_embed', ['none', 'concat', 'mul'])
def test_mask_equals_the_reference_attention(lam_embed):
    torch.manual_seed(0)
    block = MixBlock(6, reduction=2, lam_embed=lam_embed, init_std=0.7)  # large weights: a peaked attention
    z = torch.randn(4, 6, 3, 3) * 2
    perm = torch.tensor([1, 2, 3, 0])
    mask = block(z, perm, 0.3, (12, 12))
    expected = reference_mix_block_mask(block, z, perm, 0.3, 4)
    torch.testing.assert_close(mask.double(), expected, rtol=1e-5, atol=1e-6)
    assert (expected - 0.5).abs().max() > 0.1  # the masks are far from uniform: the test tells axes apart
    # the released mixing: image i weighted 1 - sigma, its partner sigma
    x = torch.randn(4, 3, 12, 12)
    torch.testing.assert_close(mix_images(x, perm, mask), x * mask + x[perm] * (1 - mask))


def test_mask_follows_the_partner_values():
    """The partner's weight is a softmax-weighted average of the partner's values: with a constant value map
    (only the bias) it is sigmoid(bias) everywhere, whatever the attention."""
    torch.manual_seed(0)
    block = MixBlock(4, init_std=1.0)
    with torch.no_grad():
        block.value.weight.zero_()
        block.value.bias.fill_(1.5)
    mask = block(torch.randn(3, 4, 2, 2) * 3, torch.tensor([2, 0, 1]), 0.5, (2, 2))
    torch.testing.assert_close(mask, torch.full_like(mask, 1 - torch.sigmoid(torch.tensor(1.5)).item()))


@pytest.mark.parametrize('lam_embed', ['none', 'concat', 'mul'])
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


@pytest.mark.parametrize('kwargs, message', [
    (dict(in_chs=0), 'in_chs must be a positive integer; got 0'),
    (dict(in_chs='4'), "in_chs must be a positive integer; got '4'"),
    (dict(in_chs=True), 'in_chs must be a positive integer; got True'),
    (dict(in_chs=8, reduction=0), 'reduction must be an integer in [1, in_chs=8]; got 0'),
    (dict(in_chs=8, reduction=9), 'reduction must be an integer in [1, in_chs=8]; got 9'),
    (dict(in_chs=8, lam_embed='add'), "lam_embed must be one of ('none', 'concat', 'mul'); got 'add'"),
    (dict(in_chs=8, upsample='cubic'), "upsample must be one of ('nearest', 'bilinear'); got 'cubic'")])
def test_mix_block_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match='^' + re.escape(message) + '$'):
        MixBlock(**kwargs)


def test_mix_block_needs_maps():
    with pytest.raises(ValueError, match=r'\(B, C, H, W\).*\(2, 8\)'):
        MixBlock(8)(torch.randn(2, 8), torch.tensor([1, 0]), 0.5, (4, 4))


# ---- mask-area loss and mixing ----

def test_area_loss_by_hand():
    """The released loss clamps the batch-mean area: max(|mean over the batch of area - lam| - margin, 0)."""
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :2] = 1.0  # area 0.5
    mask[1, :, :1] = 1.0  # area 0.25; batch mean 0.375
    assert mask_area_loss(mask, 0.5, margin=0.1).item() == pytest.approx(0.025)
    assert mask_area_loss(mask, 0.3, margin=0.0).item() == pytest.approx(0.075)
    assert mask_area_loss(mask, 0.4, margin=0.2).item() == 0.0
    # each mask is 0.125 from lam, beyond the margin, but their mean is lam: no loss (per sample it would be 0.075)
    assert mask_area_loss(mask, 0.375, margin=0.05).item() == 0.0


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
    end = block(z, perm, lam, (32, 32)).mean().item()  # the loss clamps the batch mean, not each mask
    assert abs(start - lam) > 0.25
    assert abs(end - lam) < 0.02


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
    for layer in (5, -6):
        with pytest.raises(ValueError, match=rf'^feature layer {layer} is out of range for CifarResNet, which has 5 '
                                             r'feature_info entries \(indices -5 to 4\)$'):
            resolve_feature_layer(model, layer)
    assert resolve_feature_layer(model, -5) == 'act1' and resolve_feature_layer(model, 4) == 'layer4'
    assert resolve_feature_layer(model, 'layer1.0') == 'layer1.0'
    with pytest.raises(ValueError, match=r"^CifarResNet has no module 'layer9'; its top-level modules are \['conv1', "
                                         r"'bn1', 'act1', 'layer1', 'layer2', 'layer3', 'layer4', 'global_pool', 'fc'\]$"):
        resolve_feature_layer(model, 'layer9')
    for info in (None, [], {'module': 'x'}):
        plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
        if info is not None:
            plain.feature_info = info
        with pytest.raises(ValueError, match=r'^AutoMix needs intermediate feature maps, but Sequential exposes no '
                                             r'feature_info; accepted: a timm CNN'):
            resolve_feature_layer(plain, -2)
    assert parse_feature_layer(' -2') == -2 and parse_feature_layer('layer3') == 'layer3'


@pytest.mark.slow  # builds and trains a step of several timm families
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
    assert all(p.requires_grad for p in automix.mix_head.parameters())
    assert automix.mix_block.query.in_channels == 64 + 1  # layer3 of the slim resnet18_cifar, plus the lam channel


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
    sources = dict(model.named_parameters())
    sources.update({f'fc.{n}': p for n, p in automix.mix_head.named_parameters()})  # the mixed-image head
    for old, (name, new) in zip(before, automix.encoder.named_parameters()):
        torch.testing.assert_close(new, m * old + (1 - m) * sources[name])
    assert torch.equal(automix.encoder.layer1[0].bn1.running_mean, model.layer1[0].bn1.running_mean)
    assert int(automix.num_updates) == 2
    for _ in range(2):
        automix.update_momentum(model)
    assert automix.momentum == 1.0 and automix.ramp == pytest.approx(0.0, abs=1e-12)


def test_checkpoint_round_trip_restores_mix_block_and_momentum_encoder(tmp_path):
    model = cifar_model()
    automix = AutoMix(model, total_steps=10)
    task = AutoMixTask(model, automix, verbose=False)
    opt = torch.optim.SGD([dict(params=list(model.parameters()))] + automix.param_groups(), lr=0.1)
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


PERM_MB = [1, 2, 3, 4, 5, 0]  # no fixed point, not an involution, and unlike PERM
PERM = [2, 0, 1, 5, 3, 4]


def test_losses_match_an_independent_computation(monkeypatch):
    """Every term recomputed from what the encoders saw and gave: the momentum encoder's logits with perm_mb
    and lam_mb, the Mix Block's mask (same weights, same features) with lam_mb, the online logits with perm
    and lam, the clean half."""
    lam_mb, lam = 0.35, 0.6
    fixed_lams(monkeypatch, lam_mb, lam)
    non_involutive_pairings(monkeypatch, PERM_MB, PERM)
    model = cifar_model()
    automix = AutoMix(model, total_steps=8)
    task = AutoMixTask(model, automix, clean_weight=0.5, area_weight=0.2, area_margin=0.02, area_decay=False,
                       verbose=False)
    online, momentum = [], []
    model.register_forward_hook(lambda m, args, out: online.append((args[0].detach().clone(), out)))
    automix.encoder.register_forward_hook(lambda m, args, out: momentum.append((args[0].detach().clone(), out)))
    x, y = batch()
    result = task(x, y)
    assert not result['plain_mixup'] and not result['moex']
    perm_mb, perm = torch.tensor(PERM_MB), torch.tensor(PERM)

    # the Mix Block's mask for (perm_mb, lam_mb), from the momentum encoder's features (its weights: the model's)
    with torch.no_grad():
        z = automix.features(x)
        mask_mb = automix.mix_block(z, perm_mb, lam_mb, (32, 32))
        mask = automix.mix_block(z, perm, lam, (32, 32))
    (seen_mb, logits_mb), = momentum
    torch.testing.assert_close(seen_mb, mask_mb * x + (1 - mask_mb) * x[perm_mb])
    mix_block_loss = lam_mb * F.cross_entropy(logits_mb, y) + (1 - lam_mb) * F.cross_entropy(logits_mb, y[perm_mb])
    area_loss = F.relu((mask_mb.mean() - lam_mb).abs() - 0.02)
    torch.testing.assert_close(result['mix_block_loss'], mix_block_loss.detach())
    torch.testing.assert_close(result['area_loss'], area_loss)
    assert set(result) == {'loss', 'output', 'output_clean', 'automix', 'moex', 'lam', 'perm', 'lam_mb', 'perm_mb',
                           'plain_mixup', 'mask_area', 'mix_loss', 'clean_loss', 'mix_block_loss', 'area_loss'}
    assert result['automix'] is True and (result['lam'], result['lam_mb']) == pytest.approx((lam, lam_mb))
    assert torch.equal(result['perm'], perm) and torch.equal(result['perm_mb'], perm_mb)
    torch.testing.assert_close(result['mask_area'], mask_mb.mean())

    (seen, logits), = online
    torch.testing.assert_close(seen[:6], mask * x + (1 - mask) * x[perm])  # the mixed half, detached mask
    torch.testing.assert_close(seen[6:], x)  # the clean half
    mix_loss = lam * F.cross_entropy(logits[:6], y) + (1 - lam) * F.cross_entropy(logits[:6], y[perm])
    clean_loss = F.cross_entropy(logits[6:], y)
    torch.testing.assert_close(result['mix_loss'], mix_loss.detach())
    torch.testing.assert_close(result['clean_loss'], clean_loss.detach())
    total = mix_loss + 0.5 * clean_loss + mix_block_loss + 0.2 * area_loss
    torch.testing.assert_close(result['loss'], total, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('decay', [True, False])
def test_area_weight_decays_when_asked(monkeypatch, decay):
    fixed_lams(monkeypatch, 0.35, 0.6)
    model = cifar_model()
    automix = AutoMix(model, total_steps=4)
    task = AutoMixTask(model, automix, area_weight=0.2, area_margin=0.0, area_decay=decay, verbose=False)
    x, y = batch()
    task(x, y)  # step 0: the full weight
    result = task(x, y)  # step 1: cosine_ramp(1, 4) with the decay, the full weight without
    terms = result['mix_loss'] + result['clean_loss'] + result['mix_block_loss']
    weight = 0.2 * cosine_ramp(1, 4) if decay else 0.2
    torch.testing.assert_close(result['loss'].detach(), terms + weight * result['area_loss'], rtol=1e-5, atol=1e-6)
    assert result['area_loss'] > 0


# ---- two heads: the model's classifier for clean images, AutoMix.mix_head for mixed ones ----

def test_mixed_and_clean_images_have_their_own_heads(monkeypatch):
    fixed_lams(monkeypatch, 0.4, 0.3)
    model = cifar_model()
    automix = AutoMix(model)
    assert isinstance(automix.mix_head, nn.Linear) and automix.mix_head is not model.fc
    assert torch.equal(automix.mix_head.weight, model.fc.weight)  # starts as a copy
    with torch.no_grad():
        automix.mix_head.weight.mul_(-2.0)  # now they differ
    task = AutoMixTask(model, automix, verbose=False)
    pooled = []
    model.fc.register_forward_hook(lambda m, args, out: pooled.append(args[0].detach()))
    x, y = batch()
    result = task(x, y)
    features = pooled[-1]  # (2B, C): the pooled features of the mixed, then the clean images
    torch.testing.assert_close(result['output'], automix.mix_head(features[:6]))
    torch.testing.assert_close(result['output_clean'], model.fc(features[6:]))
    # the mixed-image loss trains the mixed-image head only; the clean loss the model's classifier only
    mix_loss = 0.3 * F.cross_entropy(result['output'], y) + 0.7 * F.cross_entropy(result['output'], y[result['perm']])
    mix_grads = torch.autograd.grad(mix_loss, [automix.mix_head.weight, model.fc.weight], retain_graph=True,
                                    allow_unused=True)
    assert mix_grads[0].abs().sum() > 0 and (mix_grads[1] is None or mix_grads[1].abs().sum() == 0)
    result['loss'].backward()
    assert automix.mix_head.weight.grad.abs().sum() > 0 and model.fc.weight.grad.abs().sum() > 0
    # outside the task the model is the plain model with its own (clean-image) head
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.fc(model.forward_head(model.forward_features(x), pre_logits=True)))


def test_without_clean_images_the_model_classifier_gets_no_gradient():
    model = cifar_model()
    task = AutoMixTask(model, clean_weight=0.0, verbose=False)
    task(*batch())['loss'].backward()
    grad = model.fc.weight.grad
    assert grad is None or grad.abs().sum() == 0
    assert task.automix.mix_head.weight.grad.abs().sum() > 0


def test_momentum_head_follows_the_mixed_head():
    model = cifar_model()
    automix = AutoMix(model, momentum=0.9)
    with torch.no_grad():
        automix.mix_head.weight.fill_(2.0)
        model.fc.weight.fill_(-1.0)
    automix.update_momentum(model)  # the first update copies
    assert torch.equal(automix.encoder.fc.weight, automix.mix_head.weight)
    assert torch.equal(automix.encoder.conv1.weight, model.conv1.weight)
    with torch.no_grad():
        automix.mix_head.weight.fill_(4.0)
    automix.update_momentum(model)
    expected = torch.full_like(model.fc.weight, 0.9 * 2.0 + 0.1 * 4.0)
    torch.testing.assert_close(automix.encoder.fc.weight, expected)
    # the momentum encoder's logits (those of the Mix Block's loss) come from it
    x = batch()[0]
    with torch.no_grad():
        encoder = automix.encoder.eval()
        pooled = encoder.forward_head(encoder.forward_features(x), pre_logits=True)
        torch.testing.assert_close(encoder(x), F.linear(pooled, expected, automix.mix_head.bias))


def test_one_shared_head_when_asked():
    model = cifar_model()
    automix = AutoMix(model, mix_head=False)
    assert automix.mix_head is None and len(automix.param_groups()) == 1
    with torch.no_grad():
        model.fc.weight.fill_(1.0)
    automix.update_momentum(model)  # the first update copies: the momentum head follows the model's classifier
    assert torch.equal(automix.encoder.fc.weight, model.fc.weight)
    task = AutoMixTask(model, automix, verbose=False)
    pooled = []
    model.fc.register_forward_hook(lambda m, args, out: pooled.append(args[0].detach()))
    result = task(*batch())
    torch.testing.assert_close(result['output'], model.fc(pooled[-1][:6]))


def test_param_groups():
    automix = AutoMix(cifar_model())
    head_decay, head_no_decay, block = automix.param_groups(5e-4, mix_block_lr=0.05)
    assert block == dict(params=list(automix.mix_block.parameters()), weight_decay=5e-4, lr=0.05)
    assert head_decay['params'] == [automix.mix_head.weight] and head_decay['weight_decay'] == 5e-4
    assert head_no_decay['params'] == [automix.mix_head.bias] and head_no_decay['weight_decay'] == 0.0
    assert 'lr' not in head_decay and 'lr' not in head_no_decay  # the optimizer's (the model's) learning rate


def test_a_deep_copy_of_the_model_carries_no_automix():
    """An EMA copy deep-copies the model and its hooks: the head router holds the mixed-image head weakly."""
    model = cifar_model()
    automix = AutoMix(model)
    clone = copy.deepcopy(model)
    assert not any(isinstance(m, AutoMix) for m in clone.modules())
    x = batch()[0]
    with automix.route_mixed(6), torch.no_grad():
        routed = model.eval()(x)
        plain = clone.eval()(x)  # the copy's router is never armed
    torch.testing.assert_close(routed, automix.mix_head(model.forward_head(model.forward_features(x), pre_logits=True)))
    torch.testing.assert_close(plain, clone.fc(clone.forward_head(clone.forward_features(x), pre_logits=True)))


class _Pair(nn.Module):
    def forward(self, x):
        return x, x


class HeadlessNet(nn.Module):
    """A CNN with feature_info and no get_classifier; its forward skips ``unused``, and ``pair`` gives a tuple."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stage = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.unused = nn.Conv2d(8, 8, 1)
        self.pair = _Pair()
        self.feature_info = [dict(module='stem'), dict(module='stage')]

    def forward(self, x):
        x, _ = self.pair(self.stage(self.stem(x)))
        return x.mean((2, 3))


@pytest.mark.parametrize('model, name, classifier', [
    (lambda: timm.create_model('resnet18_cifar', num_classes=0), 'CifarResNet', 'Identity'),
    (HeadlessNet, 'HeadlessNet', 'NoneType'),
])
def test_model_without_classifier_is_refused(model, name, classifier):
    with pytest.raises(ValueError, match=rf'^AutoMix trains a separate head on the mixed images, but {name} has no '
                                         rf'classifier with parameters among its modules \(get_classifier\(\) gave '
                                         rf'{classifier}\); build it with num_classes > 0, or pass mix_head=False$'):
        AutoMix(model())


def test_feature_layer_that_never_runs_or_gives_no_maps_is_refused():
    size = (3, 8, 8)
    automix = AutoMix(HeadlessNet(), feature_layer='stage', mix_head=False, input_size=size)
    assert automix.mix_head is None and automix.mix_block.query.in_channels == 8 + 1
    with pytest.raises(RuntimeError, match=r"^the forward pass of HeadlessNet never ran 'unused'$"):
        AutoMix(HeadlessNet(), feature_layer='unused', mix_head=False, input_size=size)
    with pytest.raises(ValueError, match=r"^AutoMix needs \(B, C, H, W\) feature maps, but 'pair' of HeadlessNet gives "
                                         r"tuple; accepted: a timm CNN"):
        AutoMix(HeadlessNet(), feature_layer='pair', mix_head=False, input_size=size)
    with pytest.raises(ValueError, match=r"^AutoMix needs \(B, C, H, W\) feature maps, but 'blocks.10' of "
                                         r"VisionTransformer gives \(1, 197, 192\); accepted: a timm CNN"):
        AutoMix(timm.create_model('vit_tiny_patch16_224', num_classes=NUM_CLASSES))


def test_mix_block_takes_the_model_dtype():
    automix = AutoMix(cifar_model().double())
    assert {p.dtype for p in automix.mix_block.parameters()} == {torch.float64}
    assert automix.features(batch()[0].double()).dtype == torch.float64


def test_two_forwards_match_the_single_forward_without_batch_norm_coupling(monkeypatch):
    """With the clean and mixed images in separate forwards the mixed logits are those of the mixed batch
    alone (its own batch statistics)."""
    fixed_lams(monkeypatch, 0.4, 0.3)
    model = cifar_model()
    task = AutoMixTask(model, two_forwards=True, verbose=False)
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append((args[0].detach().clone(), out)))
    x, y = batch()
    result = task(x, y)
    assert [s[0].shape[0] for s in seen] == [6, 6]
    torch.testing.assert_close(seen[1][0], x)
    torch.testing.assert_close(result['output'], seen[0][1])
    torch.testing.assert_close(result['output_clean'], seen[1][1])
    torch.testing.assert_close(result['clean_loss'], F.cross_entropy(seen[1][1], y).detach())
    with pytest.raises(ValueError, match='two_forwards.*DDP'):
        task.prepare_distributed()


# ---- the CIFAR recipes: the released CIFAR configs' Mix Block and losses ----

@pytest.mark.parametrize('name', ['cifar10_resnet18_cifar_automix.yaml', 'cifar10_resnet18_cifar_automix_moex.yaml'])
def test_cifar_recipes_follow_the_released_cifar_configs(name):
    path = ROOT / 'hparams' / name
    data = yaml.safe_load(path.read_text())
    assert data['automix_lam_embed'] == 'none'  # no lam channel for small-scale datasets
    assert data['automix_area_decay'] is False and data['automix_area_weight'] == 0.1
    assert data['automix_area_margin'] == 0.1 and data['automix_lam_margin'] == 0.08
    assert data['automix_alpha'] == 2.0 and data['automix_upsample'] == 'nearest'
    assert data['automix_reduction'] == 2 and data['automix_momentum'] == 0.999
    cfg = load_config(['--config', str(path)], check_paths=False)
    assert (cfg.automix_lam_embed, cfg.automix_area_decay) == ('none', False)
    model = timm.create_model(cfg.model, num_classes=10)
    automix = AutoMix(model, feature_layer=parse_feature_layer(cfg.automix_feature_layer),
                      lam_embed=cfg.automix_lam_embed, reduction=cfg.automix_reduction)
    assert automix.feature_layer == 'layer3' and automix.mix_block.query.in_channels == 256  # no extra channel


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
    armed = record_arms(monkeypatch, hook)
    task = AutoMixTask(model, moex=MoExMixing(hook, prob=1.0, lam=0.8), verbose=False)
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
    task = AutoMixTask(model, moex=MoExMixing(get_moex_hook(model), prob=0.0), verbose=False)
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
    torch.testing.assert_close(result['output'], model(x))
    assert set(result) == {'loss', 'output', 'automix', 'moex'} and result['moex'] is False


@pytest.mark.slow
def test_both_encoders_learn_a_toy_problem():
    """End to end on a separable toy problem: the online and the momentum encoder (used, as in
    training, with batch statistics) both learn it, and the Mix Block's weights move."""
    torch.manual_seed(0)
    model = timm.create_model('resnet10t', num_classes=2)
    automix = AutoMix(model, momentum=0.9, total_steps=40, input_size=(3, 32, 32))
    task = AutoMixTask(model, automix, verbose=False)
    opt = torch.optim.SGD([dict(params=list(model.parameters()))] + automix.param_groups(), lr=0.05, momentum=0.9)
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


@pytest.mark.parametrize('kwargs, error, message', [
    (dict(alpha=0), ValueError, 'alpha must be a finite number > 0 (Beta(alpha, alpha); the paper uses 2); got 0'),
    (dict(alpha=math.inf), ValueError,
     'alpha must be a finite number > 0 (Beta(alpha, alpha); the paper uses 2); got inf'),
    (dict(lam_margin=0.5), ValueError, 'lam_margin must be below 0.5 (else every batch is plain Mixup); got 0.5'),
    (dict(lam_margin=-0.1), ValueError, 'lam_margin must be a number in [0, 1]; got -0.1'),
    (dict(clean_weight=-1), ValueError, 'clean_weight must be a finite number >= 0; got -1'),
    (dict(clean_weight=True), ValueError, 'clean_weight must be a finite number >= 0; got True'),
    (dict(clean_weight=math.inf), ValueError, 'clean_weight must be a finite number >= 0; got inf'),
    (dict(area_weight=math.nan), ValueError, 'area_weight must be a finite number >= 0; got nan'),
    (dict(area_weight='1'), ValueError, "area_weight must be a finite number >= 0; got '1'"),
    (dict(area_margin=2), ValueError, 'area_margin must be a number in [0, 1]; got 2'),
    (dict(pairing='shift'), ValueError, "pairing must be one of ('random', 'flip'); got 'shift'"),
    (dict(automix=nn.Linear(2, 2)), TypeError, 'automix must be a timm_moex AutoMix (possibly DDP-wrapped); got Linear'),
    (dict(moex='stem'), TypeError, 'moex must be a timm_moex MoExMixing or None; got str')])
def test_task_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match='^' + re.escape(message) + '$'):
        AutoMixTask(cifar_model(), verbose=False, **kwargs)


def test_moex_must_share_the_pairing():
    model = cifar_model(moex=True)
    with pytest.raises(ValueError, match="AutoMixTask pairs the samples 'flip'.*pairing='random'"):
        AutoMixTask(model, pairing='flip', moex=MoExMixing(get_moex_hook(model)), verbose=False)
    task = AutoMixTask(model, pairing='flip', moex=MoExMixing(get_moex_hook(model), prob=1.0, pairing='flip'),
                       verbose=False)
    result = task(*batch())
    assert result['moex'] and torch.equal(result['perm'], torch.arange(5, -1, -1))


@pytest.mark.parametrize('kwargs, match', [
    (dict(momentum=1.5), 'momentum'), (dict(total_steps=0), 'total_steps'), (dict(feature_layer=2.5), 'feature layer')])
def test_automix_rejects_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AutoMix(cifar_model(), **kwargs)


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one process, so that DDP wraps for real without launching anything."""
    torch.distributed.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_prepare_distributed_wraps_the_model_and_the_mix_block(one_process_group):
    model = cifar_model()
    task = AutoMixTask(model, verbose=False)
    automix = task.automix
    assert task.prepare_distributed(broadcast_buffers=False) is task
    for wrapped, inner in ((task.trainable_module, model), (task.automix, automix)):
        assert isinstance(wrapped, DDP) and wrapped.module is inner and not wrapped.broadcast_buffers
        assert wrapped.device_ids is None  # a CPU module: DDP takes no device ids
    result = task(*batch())
    result['loss'].backward()
    assert automix.mix_block.query.weight.grad is not None


def test_prepare_distributed_searches_unused_parameters_of_the_model_only(one_process_group):
    """find_unused_parameters=True (a model with branches a step may skip) reaches the model's DDP. AutoMix's
    parameters all take a gradient every step, the mixed-image head's through the model's forward: a search from
    AutoMix's own outputs would mark that head unused, then see its gradient arrive."""
    model = cifar_model()
    task = AutoMixTask(model, verbose=False).prepare_distributed(find_unused_parameters=True)
    assert task.trainable_module.find_unused_parameters and not task.automix.find_unused_parameters
    for seed in range(2):
        task(*batch(seed=seed))['loss'].backward()
    assert task.automix.module.mix_head.bias.grad is not None


def test_two_forwards_refuse_ddp_in_full():
    task = AutoMixTask(cifar_model(), two_forwards=True, verbose=False)
    with pytest.raises(ValueError, match=r'^two_forwards runs the model twice per backward, which DDP does not support; '
                                         r'use the single forward \(two_forwards=False\) for distributed training$'):
        task.prepare_distributed()


def test_task_state_is_left_alone_for_the_ema_and_for_an_empty_state():
    task = AutoMixTask(cifar_model(), verbose=False)
    assert task.get_task_state(ema=True) == {}
    before = {k: v.clone() for k, v in task.automix.state_dict().items()}
    other = AutoMixTask(cifar_model(seed=1), verbose=False).get_task_state()
    task.load_task_state(other, ema=True)
    task.load_task_state({})
    task.load_task_state(None)
    task.load_task_state({'projection': {}}, strict=False)
    for k, v in task.automix.state_dict().items():
        assert torch.equal(v, before[k]), k
    partial = {'automix': {k: v for k, v in other['automix'].items() if k.startswith('mix_block.')}}
    with pytest.raises(RuntimeError, match='Missing key'):
        task.load_task_state(partial)
    task.load_task_state(partial, strict=False)
    assert torch.equal(task.automix.mix_block.query.weight, other['automix']['mix_block.query.weight'])


def test_param_groups_default_to_no_weight_decay():
    automix = AutoMix(cifar_model())
    assert [g['weight_decay'] for g in automix.param_groups()] == [0.0, 0.0, 0.0]
    assert all('lr' not in g for g in automix.param_groups())


def test_lam_at_the_margin_is_plain_mixup(monkeypatch):
    fixed_lams(monkeypatch, 0.5, 0.0625)  # exact in float32, as the draw is
    result = AutoMixTask(cifar_model(), lam_margin=0.0625, clean_weight=0.0, verbose=False)(*batch())
    assert result['plain_mixup'] and result['output_clean'] is None and result['clean_loss'] is None


@pytest.mark.parametrize('two_forwards, clean_weight', [(True, 1.0), (False, 0.0)])
def test_moex_arms_the_mixed_pairing_alone_without_a_shared_clean_half(monkeypatch, two_forwards, clean_weight):
    fixed_lams(monkeypatch, 0.5, 0.7)
    model = cifar_model(moex=True)
    hook = get_moex_hook(model)
    armed = record_arms(monkeypatch, hook)
    task = AutoMixTask(model, moex=MoExMixing(hook, prob=1.0, lam=0.8), two_forwards=two_forwards,
                       clean_weight=clean_weight, verbose=False)
    result = task(*batch())
    assert result['moex'] and len(armed) == 1 and torch.equal(armed[0], result['perm'])


def test_the_task_hands_timms_task_its_arguments_and_logs_its_settings(caplog):
    check_timm_task_arguments(lambda **kwargs: AutoMixTask(cifar_model(), **kwargs), caplog)
    model = cifar_model(moex=True)
    moex = MoExMixing(get_moex_hook(model), prob=0.5)
    for kwargs, tail in ((dict(), ''), (dict(moex=moex), f', {moex}')):
        caplog.clear()
        with caplog.at_level('INFO'):
            AutoMixTask(model, **kwargs)  # verbose by default, as timm's tasks are
        assert f"AutoMixTask: alpha=2.0, feature layer 'layer3', pairing=random{tail}" in \
            [r.getMessage() for r in caplog.records]


def test_the_released_cifar_defaults():
    task = AutoMixTask(cifar_model(), verbose=False)
    assert (task.alpha, task.area_weight, task.area_margin, task.area_decay, task.lam_margin) == (2.0, 0.1, 0.1, True,
                                                                                                  0.08)
    assert MixBlock(8).inner_chs == 4 and task.automix.mix_block.inner_chs == 64 // 2  # reduction 2
    assert MixBlock(8).upsample == 'nearest' and task.automix.mix_block.upsample == 'nearest'
    assert AutoMix(cifar_model(), upsample='bilinear').mix_block.upsample == 'bilinear'
    torch.testing.assert_close(mask_area_loss(torch.full((2, 1, 4, 4), 0.75), 0.5), torch.tensor(0.15))  # margin 0.1


@pytest.mark.parametrize('upsample', ['nearest', 'bilinear'])
def test_the_mask_is_upsampled_before_the_sigmoid_without_aligned_corners(upsample):
    torch.manual_seed(0)
    block = MixBlock(8, upsample=upsample, init_std=0.5)
    z, perm = torch.randn(3, 8, 4, 4), torch.tensor([1, 2, 0])
    with torch.no_grad():
        low = block(z, perm, 0.3, (4, 4))
        high = block(z, perm, 0.3, (16, 16))
    logits = torch.logit(1.0 - low.double())
    kwargs = dict(align_corners=False) if upsample == 'bilinear' else {}
    expected = 1.0 - torch.sigmoid(F.interpolate(logits, size=(16, 16), mode=upsample, **kwargs))
    torch.testing.assert_close(high.double(), expected, rtol=1e-5, atol=1e-6)


def test_nhwc_feature_maps_reach_the_mix_block_channels_first():
    torch.manual_seed(0)
    swin = timm.create_model('swin_tiny_patch4_window7_224', num_classes=NUM_CLASSES, img_size=32, window_size=2,
                             embed_dim=24, depths=(1, 1), num_heads=(1, 2))
    automix = AutoMix(swin, input_size=(3, 32, 32))
    assert automix.feature_layer == 'layers.0' and automix.mix_block.query.in_channels == 24 + 1  # + the lam plane
    seen = []
    automix.encoder.get_submodule('layers.0').register_forward_hook(lambda m, a, out: seen.append(out))
    x = torch.randn(2, 3, 32, 32)
    z = automix.features(x)
    torch.testing.assert_close(z, seen[-1].permute(0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)


def test_the_dry_run_takes_the_models_input_size_and_dtype():
    model = cifar_model()
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 24, 20))
    model.double()
    sizes = []
    model.register_forward_pre_hook(lambda m, args: sizes.append((tuple(args[0].shape), args[0].dtype)))
    AutoMix(model)
    assert sizes[0] == ((1, 3, 24, 20), torch.float64)
    sizes.clear()
    AutoMix(model, input_size=(3, 16, 12))
    assert sizes[0] == ((1, 3, 16, 12), torch.float64)
    del model.pretrained_cfg
    sizes.clear()
    AutoMix(model)
    assert sizes[0] == ((1, 3, 224, 224), torch.float64)


def test_the_bounds_of_the_mix_block_and_the_momentum_are_inclusive():
    assert MixBlock(1, reduction=1).inner_chs == 1
    assert MixBlock(8, reduction=8).inner_chs == 1
    with pytest.raises(ValueError, match=r"^reduction must be an integer in \[1, in_chs=8\]; got '2'$"):
        MixBlock(8, reduction='2')
    assert AutoMix(cifar_model(), momentum=0.0).momentum == 0.0
    assert AutoMix(cifar_model(), momentum=1.0).momentum == 1.0
    automix = AutoMix(cifar_model(), total_steps=1, reduction=4)
    assert automix.total_steps == 1 and automix.mix_block.inner_chs == 64 // 4  # layer3 of the slim model
    assert automix.num_updates.dtype == torch.long and int(automix.num_updates) == 0
    with pytest.raises(ValueError, match=r"^total_steps must be"):
        AutoMix(cifar_model(), total_steps='10')
    headless = AutoMix(timm.create_model('resnet18_cifar', num_classes=0, **SLIM), mix_head=False)
    assert headless.mix_head is None and headless.classifier_name is None
    for bad in ('0.5', True, -0.1):
        with pytest.raises(ValueError, match=rf'^momentum must be a number in \[0, 1\]; got {re.escape(repr(bad))}$'):
            AutoMix(cifar_model(), momentum=bad)
