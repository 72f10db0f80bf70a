import copy
import functools
import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.layers import ClassifierHead
from timm.loss import SoftTargetCrossEntropy
from timm.task import ClassificationTask

import timm_moex  # noqa: F401  (registers resnet18_cifar)
from timm_moex import MoExMixing, get_moex_hook
from timm_moex.loss.bitempered import BiTemperedLogisticLoss
from timm_moex.task.snapmix import (
    SnapMixTask, cam_classifier, class_activation_maps, normalize_cams, per_sample_loss, random_box,
    same_label_weights, snapmix_boxes, snapmix_moex_weights, snapmix_paste, snapmix_weights)

import helpers
from helpers import check_timm_task_arguments, cifar_model

H = W = 8
WHOLE = (0, H, 0, W)
EMPTY = (3, 3, 0, W)
batch = functools.partial(helpers.batch, n=4)


def ce(output, target):
    return F.cross_entropy(output, target, reduction='none')


# ---- SnapMix's published formulas, written out independently of the module ----

def reference_cams(model, x, y):
    """SnapMix's CAMs: ReLU'd last feature maps, 1x1-convolved with the classifier (bias included), the
    target class's map upsampled bilinearly (corners not aligned), shifted to min 0, divided by its sum."""
    model = copy.deepcopy(model).train()
    for m in model.modules():  # batch statistics, as the task's CAM pass; the copy's buffers do not matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = False
    with torch.no_grad():
        fms = torch.relu(model.forward_features(x)).double()
    fc = model.get_classifier()
    maps = torch.einsum('bchw,kc->bkhw', fms, fc.weight.double()) + fc.bias.double()[None, :, None, None]
    maps = maps[torch.arange(len(y)), y][:, None]
    maps = F.interpolate(maps, size=x.shape[-2:], mode='bilinear', align_corners=False)[:, 0]
    out = []
    for m in maps:
        m = m - m.min()
        out.append(m / m.sum())
    return torch.stack(out)


def reference_resize_aligned(patch, height, width):
    """Bilinear resize with aligned corners, by its formula: output pixel i samples input row i * (h - 1) / (H - 1)."""
    h, w = patch.shape[-2:]
    rows = torch.arange(height, dtype=torch.float64) * ((h - 1) / (height - 1) if height > 1 else 0.0)
    cols = torch.arange(width, dtype=torch.float64) * ((w - 1) / (width - 1) if width > 1 else 0.0)
    r0, c0 = rows.floor().long().clamp(max=h - 1), cols.floor().long().clamp(max=w - 1)
    r1, c1 = (r0 + 1).clamp(max=h - 1), (c0 + 1).clamp(max=w - 1)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    p = patch.double()
    top = p[..., r0, :][..., c0] * (1 - fc) + p[..., r0, :][..., c1] * fc
    bottom = p[..., r1, :][..., c0] * (1 - fc) + p[..., r1, :][..., c1] * fc
    return (top * (1 - fr) + bottom * fr).to(patch.dtype)


def reference_paste(x, perm, box_a, box_b):
    (ta, ba, la, ra), (tb, bb, lb, rb) = box_a, box_b
    out = x.clone()
    for i in range(len(x)):
        out[i, :, ta:ba, la:ra] = reference_resize_aligned(x[perm[i], :, tb:bb, lb:rb], ba - ta, ra - la)
    return out


def reference_weights(cams, perm, box_a, box_b):
    (ta, ba, la, ra), (tb, bb, lb, rb) = box_a, box_b
    w_a = torch.stack([1 - cams[i, ta:ba, la:ra].sum() for i in range(len(cams))])
    w_b = torch.stack([cams[perm[i], tb:bb, lb:rb].sum() for i in range(len(cams))])
    return w_a, w_b


def silu_model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model('resnet10t', num_classes=5, act_layer='silu')  # features end in a SiLU


# ---- label weights ----

def test_whole_partner_box_gives_partner_weight_one():
    cams = torch.rand(3, H, W)
    w_a, w_b = snapmix_weights(cams, cams.flip(0), WHOLE, WHOLE)
    torch.testing.assert_close(w_b, torch.ones(3))
    torch.testing.assert_close(w_a, torch.zeros(3))


@pytest.mark.parametrize('empty', [EMPTY, (0, H, 3, 3), (5, 2, 0, W), (0, H, 6, 1)], ids=['rows', 'columns',
                                                                                          'upside-down', 'reversed'])
@pytest.mark.parametrize('empty_is', ['a', 'b'])
def test_empty_box_gives_partner_weight_zero_and_pastes_nothing(empty_is, empty):
    cams = torch.rand(3, H, W)
    box_a, box_b = (empty, WHOLE) if empty_is == 'a' else (WHOLE, empty)
    w_a, w_b = snapmix_weights(cams, cams, box_a, box_b)
    assert torch.equal(w_b, torch.zeros(3)) and torch.equal(w_a, torch.ones(3))
    x = torch.randn(3, 2, H, W)
    assert torch.equal(snapmix_paste(x, torch.tensor([2, 0, 1]), box_a, box_b), x)


def test_weights_are_cam_mass():
    cam_a = torch.zeros(1, H, W)
    cam_a[0, :4, :4] = 1.0  # all of a's evidence in its top-left quadrant
    cam_b = torch.zeros(1, H, W)
    cam_b[0, 4:, :] = 3.0  # all of b's evidence in its bottom half
    w_a, w_b = snapmix_weights(cam_a, cam_b, (0, 2, 0, 4), (4, 8, 0, 2))
    torch.testing.assert_close(w_a, torch.tensor([1 - 8 / 16]))  # half of a's mass is covered
    torch.testing.assert_close(w_b, torch.tensor([8 / 32]))  # a quarter of b's mass is pasted
    assert w_a + w_b != 1  # semantic, not area, weights
    normalized = snapmix_weights(normalize_cams(cam_a), normalize_cams(cam_b), (0, 2, 0, 4), (4, 8, 0, 2),
                                 normalize=False)
    torch.testing.assert_close(normalized, (w_a, w_b))


def test_weights_are_finite_for_all_zero_cams():
    """A map without mass counts as uniform: the weights become area fractions."""
    zeros = torch.zeros(2, H, W)
    w_a, w_b = snapmix_weights(zeros, zeros, (0, 4, 0, 4), (0, 2, 0, 8))
    assert torch.isfinite(w_a).all() and torch.isfinite(w_b).all()
    torch.testing.assert_close(w_a, torch.full((2,), 1 - 16 / 64))
    torch.testing.assert_close(w_b, torch.full((2,), 16 / 64))


def test_normalized_cams_are_nonnegative_and_sum_to_one():
    cams = normalize_cams(torch.randn(3, H, W) * 5 - 2)
    assert (cams >= 0).all()
    torch.testing.assert_close(cams.sum((-2, -1)), torch.ones(3))
    torch.testing.assert_close(normalize_cams(cams), cams)


# ---- CAMs, boxes, paste ----

def test_cams_decompose_the_logits():
    """Global average pooling + linear head: a raw CAM's spatial mean is the logit minus the bias."""
    model = cifar_model().eval()
    x, y = batch()
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    fc = cam_classifier(model)
    raw = class_activation_maps(features, fc.weight, y, normalize=False)
    torch.testing.assert_close(raw.mean((-2, -1)) + fc.bias[y], logits.gather(1, y[:, None])[:, 0],
                               rtol=1e-4, atol=1e-4)
    cams = class_activation_maps(features, fc.weight, y, size=(32, 32))
    assert cams.shape == (4, 32, 32)
    torch.testing.assert_close(cams.sum((-2, -1)), torch.ones(4))
    # soft targets weight the classes' maps
    soft = F.one_hot(y, 5).float()
    torch.testing.assert_close(class_activation_maps(features, fc.weight, soft, normalize=False), raw)


def test_cams_apply_a_relu_to_the_features_of_a_silu_model():
    model = silu_model()
    x, y = batch(n=4, size=96)
    task = SnapMixTask(model, verbose=False).train()
    cams = task.class_activation_maps(x, y)
    expected = reference_cams(model, x, y)
    torch.testing.assert_close(cams.double(), expected, rtol=1e-4, atol=1e-7)
    # the ReLU matters here: the SiLU features have negative values, and without it the maps differ
    with torch.no_grad():
        features = copy.deepcopy(model).train().forward_features(x)
    assert features.min() < -0.1
    without = class_activation_maps(features, model.get_classifier().weight, y, size=(96, 96), relu=False)
    assert (without.double() - expected).abs().max() > 0.05 * expected.max()
    no_relu_task = SnapMixTask(model, cam_relu=False, verbose=False).train()
    torch.testing.assert_close(no_relu_task.class_activation_maps(x, y), without, rtol=1e-4, atol=1e-7)


def test_boxes_have_the_reference_even_sides():
    """Before clipping, a box spans the centre -/+ cut // 2 with cut = int(side * sqrt(1 - lam))."""
    torch.manual_seed(0)
    lam = 0.7  # cut = int(32 * 0.5477) = 17: odd, so the side is 16
    assert int(32 * math.sqrt(1 - lam)) == 17
    inner = 0
    for _ in range(300):
        top, bottom, left, right = random_box(32, 32, lam)
        assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
        assert bottom - top <= 16 and right - left <= 16
        if 0 < top and bottom < 32:
            assert bottom - top == 16
            inner += 1
        if 0 < left and right < 32:
            assert right - left == 16
    assert inner > 50
    # a box clipped at one border keeps its other edge at centre + 8: the side shrinks from 16
    clipped = [random_box(32, 32, lam) for _ in range(300)]
    assert any(0 < b - t < 16 for t, b, _, _ in clipped)


def test_boxes_lie_inside_the_image():
    torch.manual_seed(0)
    for _ in range(200):
        for top, bottom, left, right in snapmix_boxes(12, 10, alpha=5.0):
            assert 0 <= top <= bottom <= 12 and 0 <= left <= right <= 10
    top, bottom, left, right = random_box(12, 10, 1.0)
    assert bottom == top and right == left  # lam = 1: nothing cut
    top, bottom, left, right = random_box(100, 100, 0.75)
    assert bottom - top <= 50 and right - left <= 50  # sides sqrt(1 - lam) of the image


def test_paste_copies_the_partner_box():
    x = torch.randn(3, 2, H, W)
    perm = torch.tensor([2, 0, 1])
    out = snapmix_paste(x, perm, (0, 4, 0, 4), (4, 8, 4, 8))  # same size: an exact copy
    torch.testing.assert_close(out[:, :, :4, :4], x[perm][:, :, 4:, 4:])
    outside = torch.ones(H, W, dtype=torch.bool)
    outside[:4, :4] = False
    torch.testing.assert_close(out[:, :, outside], x[:, :, outside])
    resized = snapmix_paste(x, perm, (0, 8, 0, 8), (2, 4, 2, 4))  # 2x2 upsampled to the image
    assert resized.shape == x.shape and not torch.equal(resized, x)
    torch.testing.assert_close(snapmix_paste(x, perm, EMPTY, WHOLE), x)


@pytest.mark.parametrize('box_a, box_b', [
    ((1, 7, 0, 5), (2, 5, 3, 8)), ((0, 3, 2, 8), (0, 8, 0, 8)),
    # sizes that differ in one side only, where a sum of the other box's ends equals this box's side
    ((0, 4, 0, 4), (1, 3, 2, 6)), ((0, 4, 0, 4), (2, 6, 1, 3)), ((1, 3, 0, 4), (0, 4, 0, 4)),
    ((0, 4, 1, 3), (0, 4, 0, 4)),
    ((2, 6, 2, 6), (5, 6, 5, 6)),  # a single partner pixel fills the box
])
def test_paste_resizes_with_aligned_corners(box_a, box_b):
    x = torch.randn(3, 2, H, W)
    perm = torch.tensor([2, 0, 1])
    out = snapmix_paste(x, perm, box_a, box_b)
    torch.testing.assert_close(out, reference_paste(x, perm, box_a, box_b))
    (ta, ba, la, ra), (tb, bb, lb, rb) = box_a, box_b
    # aligned corners: the pasted box's corner pixels are the source box's corner pixels
    torch.testing.assert_close(out[:, :, ta, la], x[perm][:, :, tb, lb])
    torch.testing.assert_close(out[:, :, ba - 1, ra - 1], x[perm][:, :, bb - 1, rb - 1])


def test_same_label_weights_double_the_total():
    w_a, w_b = torch.tensor([0.7, 0.6, 0.2]), torch.tensor([0.1, 0.3, 0.5])
    a, b = same_label_weights(w_a, w_b, torch.tensor([True, False, True]))
    torch.testing.assert_close(a, torch.tensor([0.8, 0.6, 0.7]))
    torch.testing.assert_close(b, torch.tensor([0.8, 0.3, 0.7]))


def test_snapmix_moex_weights_reduce_to_cutmix_moex_and_to_snapmix():
    perm = torch.tensor([1, 2, 3, 0])
    cutmix_lam, lam = 0.7, 0.9
    w_a, w_b = torch.full((4,), cutmix_lam), torch.full((4,), 1 - cutmix_lam)
    c1, c2, c3 = snapmix_moex_weights(w_a, w_b, perm, lam)
    torch.testing.assert_close(c1, torch.full((4,), cutmix_lam * lam))
    torch.testing.assert_close(c2, torch.full((4,), (1 - cutmix_lam) * lam + cutmix_lam * (1 - lam)))
    torch.testing.assert_close(c3, torch.full((4,), (1 - cutmix_lam) * (1 - lam)))
    w_a, w_b = torch.rand(4), torch.rand(4)
    c1, c2, c3 = snapmix_moex_weights(w_a, w_b, perm, 1.0)
    assert torch.equal(c1, w_a) and torch.equal(c2, w_b) and torch.equal(c3, torch.zeros(4))


def test_per_sample_loss_with_and_without_vmap():
    out, y = torch.randn(4, 5), torch.randint(0, 5, (4,))

    def needs_item(o, t):  # data-dependent Python control flow: vmap cannot batch it
        return F.cross_entropy(o, t) * (1.0 if t.max().item() < 100 else 0.0)

    torch.testing.assert_close(per_sample_loss(torch.nn.CrossEntropyLoss(), out, y), ce(out, y))
    torch.testing.assert_close(per_sample_loss(needs_item, out, y), ce(out, y))


# ---- heads ----

@pytest.mark.parametrize('name, kwargs', [
    ('vit_tiny_patch16_224', dict(img_size=32, patch_size=8)),
    ('convnext_atto', {}),
    ('mobilenetv3_small_050', {}),
])
def test_other_heads_are_refused(name, kwargs):
    model = timm.create_model(name, num_classes=5, **kwargs)
    with pytest.raises(ValueError, match=f'{type(model).__name__}.*accepted: a CNN whose head is global average'):
        SnapMixTask(model, verbose=False)


def test_non_linear_classifier_and_max_pool_are_refused():
    with pytest.raises(ValueError, match='ResNet.*Identity, not nn.Linear'):
        SnapMixTask(timm.create_model('resnet10t', num_classes=0), verbose=False)
    with pytest.raises(ValueError, match="global_pool=.*max"):
        SnapMixTask(timm.create_model('resnet10t', num_classes=5, global_pool='max'), verbose=False)


def test_arguments_are_checked():
    model = cifar_model()
    with pytest.raises(ValueError, match=r'^alpha must be a finite number > 0 \(Beta\(alpha, alpha\); '
                                         r'the paper uses 5\); got 0$'):
        SnapMixTask(model, alpha=0, verbose=False)
    with pytest.raises(ValueError, match='prob must be .*1.5'):
        SnapMixTask(model, prob=1.5, verbose=False)
    moex_model = cifar_model(moex=True)
    hook = get_moex_hook(moex_model)
    with pytest.raises(TypeError, match='moex must be a timm_moex MoExMixing or None; got MoExHook'):
        SnapMixTask(moex_model, moex=hook, verbose=False)
    with pytest.raises(ValueError, match="pairs the samples 'random'.*pairing='flip'"):
        SnapMixTask(moex_model, moex=MoExMixing(hook, pairing='flip'), verbose=False)
    with pytest.raises(ValueError, match="same_label must be one of.*'twice'"):
        SnapMixTask(model, same_label='twice', verbose=False)


# ---- the task ----

def test_task_is_a_timm_classification_task():
    assert isinstance(SnapMixTask(cifar_model(), verbose=False), ClassificationTask)


def test_cam_pass_uses_batch_statistics_and_leaves_buffers_alone():
    model = cifar_model()
    task = SnapMixTask(model, verbose=False).train()
    before = copy.deepcopy(model)
    x, y = batch()
    cams = task.class_activation_maps(x, y)
    assert cams.shape == (4, 32, 32) and not cams.requires_grad
    for (k, v), b in zip(model.state_dict().items(), before.state_dict().values()):
        assert torch.equal(v, b), k
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        features = before.train().forward_features(x)  # training mode: batch statistics
    torch.testing.assert_close(cams, class_activation_maps(features, before.fc.weight, y, size=(32, 32)))


@pytest.mark.parametrize('name, size', [('resnet18_cifar', 32), ('resnet10t', 64)])
def test_a_cnn_trains_one_step(name, size):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5)
    task = SnapMixTask(model, prob=1.0, verbose=False).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(size=size)
    torch.manual_seed(1)
    result = task(x, y)
    assert result['snapmix'] and not result['moex']
    w_a, w_b = result['weights']
    perm = result['perm']
    expected = (w_a * ce(result['output'], y) + w_b * ce(result['output'], y[perm])).mean()
    torch.testing.assert_close(result['loss'], expected)
    result['loss'].backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_with_moex_the_same_perm_is_used():
    model = cifar_model(moex=True)
    hook = get_moex_hook(model)
    task = SnapMixTask(model, prob=1.0, moex=MoExMixing(hook, prob=1.0, lam=0.8), verbose=False).train()
    armed_with = []
    arm = hook.arm
    hook.arm = lambda perm: (armed_with.append(perm), arm(perm))
    x, y = batch(n=6)
    torch.manual_seed(2)
    result = task(x, y)
    assert result['snapmix'] and result['moex']
    perm = result['perm']
    assert len(armed_with) == 1 and armed_with[0] is perm
    assert not hook.armed  # consumed by the training forward, not by the CAM pass
    w_a, w_b = result['weights']
    out = result['output']
    c1 = 0.8 * w_a
    c2 = 0.8 * w_b + 0.2 * w_a[perm]
    c3 = 0.2 * w_b[perm]
    expected = (c1 * ce(out, y) + c2 * ce(out, y[perm]) + c3 * ce(out, y[perm][perm])).mean()
    torch.testing.assert_close(result['loss'], expected)
    result['loss'].backward()


def test_moex_alone_is_the_moex_loss():
    model = cifar_model(moex=True)
    task = SnapMixTask(model, prob=0.0, moex=MoExMixing(get_moex_hook(model), prob=1.0, lam=0.7), verbose=False).train()
    x, y = batch()
    result = task(x, y)
    assert result['moex'] and not result['snapmix'] and 'weights' not in result
    perm = result['perm']
    expected = 0.7 * F.cross_entropy(result['output'], y) + 0.3 * F.cross_entropy(result['output'], y[perm])
    torch.testing.assert_close(result['loss'], expected)


def test_without_either_it_is_the_plain_task():
    model = cifar_model()
    task = SnapMixTask(model, prob=0.0, verbose=False).train()
    plain = ClassificationTask(model, verbose=False).train()
    x, y = batch()
    result = task(x, y)
    assert not result['snapmix'] and not result['moex'] and 'perm' not in result
    expected = plain(x, y)
    torch.testing.assert_close(result['loss'], expected['loss'])
    torch.testing.assert_close(result['output'], expected['output'])


def test_never_mixes_in_eval():
    model = cifar_model(moex=True)
    task = SnapMixTask(model, prob=1.0, moex=MoExMixing(get_moex_hook(model), prob=1.0), verbose=False).eval()
    result = task(*batch())
    assert not result['snapmix'] and not result['moex']


def test_with_mixup_soft_targets():
    model = cifar_model(moex=True)
    task = SnapMixTask(model, moex=MoExMixing(get_moex_hook(model), prob=1.0, lam=0.9),
                       criterion=SoftTargetCrossEntropy(), verbose=False).train()
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=5)
    x, y = mixup(*batch())
    result = task(x, y)
    assert result['snapmix'] and result['moex'] and torch.isfinite(result['loss'])
    result['loss'].backward()


def test_with_the_bi_tempered_loss():
    model = cifar_model()
    task = SnapMixTask(model, criterion=BiTemperedLogisticLoss(0.8, 1.2), verbose=False).train()
    x, y = batch()
    result = task(x, y)
    w_a, w_b = result['weights']
    perm = result['perm']
    per = BiTemperedLogisticLoss(0.8, 1.2, reduction='none')
    expected = (w_a * per(result['output'], y) + w_b * per(result['output'], y[perm])).mean()
    torch.testing.assert_close(result['loss'], expected)
    result['loss'].backward()


# ---- the task against SnapMix's formulas, computed independently ----

BOX_A, BOX_B = (3, 9, 1, 11), (0, 8, 4, 8)  # different sizes and places: swapping them changes everything
PERM = torch.tensor([2, 3, 1, 0, 5, 4])  # no fixed point, not an involution


def fixed_draws(monkeypatch):
    monkeypatch.setattr('timm_moex.task.snapmix.snapmix_boxes', lambda h, w, alpha: (BOX_A, BOX_B))
    randperm = torch.randperm
    monkeypatch.setattr(torch, 'randperm', lambda n, **kw: PERM.clone() if n == len(PERM) else randperm(n, **kw))


@pytest.mark.parametrize('model_fn, size', [(cifar_model, 32), (silu_model, 64)])
def test_task_weights_and_pasted_input_match_an_independent_computation(monkeypatch, model_fn, size):
    fixed_draws(monkeypatch)
    model = model_fn()
    task = SnapMixTask(model, verbose=False).train()
    x, y = batch(n=6, size=size, seed=3)
    cams = reference_cams(model, x, y)  # before the task's forward changes the running statistics
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    result = task(x, y)
    assert result['snapmix'] and torch.equal(result['perm'], PERM) and result['boxes'] == (BOX_A, BOX_B)
    w_a, w_b = reference_weights(cams, PERM, BOX_A, BOX_B)
    torch.testing.assert_close(result['weights'][0].double(), w_a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result['weights'][1].double(), w_b, rtol=1e-4, atol=1e-6)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], reference_paste(x, PERM, BOX_A, BOX_B))
    out = result['output'].double()
    expected = (w_a * ce(out, y) + w_b * ce(out, y[PERM])).mean()
    torch.testing.assert_close(result['loss'].double(), expected, rtol=1e-4, atol=1e-6)


def test_same_label_double_matches_the_reference_weights(monkeypatch):
    fixed_draws(monkeypatch)
    model = cifar_model()
    x, _ = batch(n=6, seed=3)
    y = torch.tensor([0, 1, 0, 0, 2, 2])  # equal labels in the pairs (0, 2), (3, 0), (4, 5), (5, 4)
    same = y == y[PERM]
    assert same.tolist() == [True, False, False, True, True, True]
    cams = reference_cams(model, x, y)
    w_a, w_b = reference_weights(cams, PERM, BOX_A, BOX_B)
    result = SnapMixTask(model, same_label='double', verbose=False).train()(x, y)
    got_a, got_b = (w.double() for w in result['weights'])
    torch.testing.assert_close(got_a[same], (w_a + w_b)[same], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_b[same], (w_a + w_b)[same], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_a[~same], w_a[~same], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_b[~same], w_b[~same], rtol=1e-4, atol=1e-6)
    out = result['output'].double()
    # a same-label sample's loss weight is 2 (w_a + w_b) on its one label
    expected = torch.where(same, 2 * (w_a + w_b) * ce(out, y), w_a * ce(out, y) + w_b * ce(out, y[PERM])).mean()
    torch.testing.assert_close(result['loss'].double(), expected, rtol=1e-4, atol=1e-6)
    # soft targets (timm's Mixup) are equal where their whole rows are
    fixed_draws(monkeypatch)
    soft = SnapMixTask(cifar_model(), same_label='double', verbose=False).train()(x, F.one_hot(y, 5).float())
    for got, want in zip(soft['weights'], result['weights']):
        torch.testing.assert_close(got, want)
    # the default adds them: w_a + w_b in total
    fixed_draws(monkeypatch)
    default = SnapMixTask(cifar_model(), verbose=False).train()(x, y)
    torch.testing.assert_close(default['weights'][0].double(), w_a, rtol=1e-4, atol=1e-6)


def test_boxes_are_drawn_for_the_inputs_height_and_width(monkeypatch):
    drawn = []
    monkeypatch.setattr('timm_moex.task.snapmix.snapmix_boxes', lambda h, w, alpha: drawn.append((h, w, alpha)) or (BOX_A, BOX_B))
    task = SnapMixTask(cifar_model(), alpha=3.0, verbose=False).train()
    task(torch.randn(6, 3, 32, 24), torch.randint(0, 5, (6,)))
    assert drawn == [(32, 24, 3.0)]


def test_a_box_of_lam_one_cuts_nothing():
    torch.manual_seed(0)
    for _ in range(100):  # the centre lands on every row and column, the first ones included
        top, bottom, left, right = random_box(4, 4, 1.0)
        assert top == bottom and left == right


def test_weights_refuse_cams_that_do_not_match():
    for cam_b in (torch.rand(2, 4, 5), torch.rand(2, 4)):
        with pytest.raises(ValueError, match=r'^cam_a and cam_b must both be \(B, H, W\); got \(2, 4, 4\) and '
                                             + re.escape(str(tuple(cam_b.shape))) + '$'):
            snapmix_weights(torch.rand(2, 4, 4), cam_b, WHOLE, WHOLE)
    with pytest.raises(ValueError, match=r'^cam_a and cam_b must both be \(B, H, W\); got \(2, 16\) and \(2, 16\)$'):
        snapmix_weights(torch.rand(2, 16), torch.rand(2, 16), WHOLE, WHOLE)


def test_snapmix_moex_weights_defaults_and_bounds():
    w_a, w_b, perm = torch.rand(4), torch.rand(4), torch.tensor([1, 2, 3, 0])
    c1, c2, c3 = snapmix_moex_weights(w_a, w_b, perm)  # no MoEx by default
    assert torch.equal(c1, w_a) and torch.equal(c2, w_b) and torch.equal(c3, torch.zeros(4))
    c1, c2, c3 = snapmix_moex_weights(w_a, w_b, perm, 0.0)  # all MoEx's donor
    assert torch.equal(c1, torch.zeros(4)) and torch.equal(c2, w_a[perm]) and torch.equal(c3, w_b[perm])
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf'^moex_lam must be in \[0, 1\]; got {bad}$'):
            snapmix_moex_weights(w_a, w_b, perm, bad)


def test_the_papers_alpha_is_the_default():
    assert SnapMixTask(cifar_model(), verbose=False).alpha == 5.0


def test_weights_stay_in_the_unit_interval_and_follow_the_cams_dtype_and_device():
    heavy = torch.full((2, H, W), 2.0 / (H * W))  # maps of total mass 2, passed as if normalized
    w_a, w_b = snapmix_weights(heavy, heavy, WHOLE, WHOLE, normalize=False)
    assert torch.equal(w_a, torch.zeros(2)) and torch.equal(w_b, torch.ones(2))
    negative = -heavy
    w_a, w_b = snapmix_weights(negative, negative, WHOLE, WHOLE, normalize=False)
    assert torch.equal(w_a, torch.ones(2)) and torch.equal(w_b, torch.zeros(2))
    for dtype, expected in ((torch.float64, torch.float64), (torch.float16, torch.float32)):
        for box in (WHOLE, EMPTY):
            w_a, w_b = snapmix_weights(torch.rand(2, H, W, dtype=dtype), torch.rand(2, H, W, dtype=dtype), box, WHOLE)
            assert w_a.dtype == w_b.dtype == expected
    w_a, w_b = snapmix_weights(torch.rand(2, H, W, device='meta'), torch.rand(2, H, W, device='meta'), EMPTY, WHOLE)
    assert w_a.device.type == w_b.device.type == 'meta'


def test_class_activation_maps_check_their_inputs_in_full():
    features, target = torch.randn(2, 4, 3, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r'^features must be \(B, C, H, W\) maps; got shape \(2, 4, 9\)$'):
        class_activation_maps(features.flatten(2), torch.randn(5, 4), target)
    for weight in (torch.randn(5, 3), torch.randn(5, 4, 1)):
        with pytest.raises(ValueError, match=r'^weight must be \(num_classes, 4\) for features of shape \(2, 4, 3, 3\); '
                                             + re.escape(f'got {tuple(weight.shape)}') + '$'):
            class_activation_maps(features, weight, target)


@pytest.mark.parametrize('index', [5, 9, -1])
def test_a_class_index_out_of_range_is_refused_in_one_line(index):
    """PyTorch's IndexError (or, for -1, the last class's map, silently) before."""
    message = rf'^target holds class index {index}, outside the 5 classes of the classifier: class indices must be in 0\.\.4$'
    with pytest.raises(ValueError, match=message):
        class_activation_maps(torch.randn(2, 4, 3, 3), torch.randn(5, 4), torch.tensor([0, index]))
    model = timm.create_model('resnet18_cifar', num_classes=5)
    x, y = batch(size=16)
    y[1] = index
    with pytest.raises(ValueError, match=message):
        SnapMixTask(model, prob=1.0, verbose=False).train()(x, y)


def test_class_activation_maps_relu_by_default_in_float32_at_least():
    torch.manual_seed(0)
    features, weight, target = torch.randn(2, 4, 3, 3), torch.randn(5, 4), torch.tensor([0, 3])
    default = class_activation_maps(features, weight, target, normalize=False)
    torch.testing.assert_close(default, class_activation_maps(features.relu(), weight, target, normalize=False,
                                                              relu=False))
    assert not torch.allclose(default, class_activation_maps(features, weight, target, normalize=False, relu=False))
    low = class_activation_maps(features.bfloat16(), weight.bfloat16(), target, normalize=False)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, class_activation_maps(features.bfloat16().float(), weight.bfloat16().float(), target,
                                                          normalize=False))
    soft = torch.softmax(torch.randn(2, 5, dtype=torch.float64), -1)  # float64 targets weight float32 maps
    cams = class_activation_maps(features, weight, soft, normalize=False)
    assert cams.dtype == torch.float32
    torch.testing.assert_close(cams, torch.einsum('bchw,bc->bhw', features.relu(), soft.float() @ weight))
    assert class_activation_maps(features.double(), weight, target).dtype == torch.float64


def test_normalized_cams_are_float32_at_least_and_uniform_when_constant():
    flat = normalize_cams(torch.zeros(2, 3, 5, dtype=torch.float16))
    assert flat.dtype == torch.float32
    torch.testing.assert_close(flat, torch.full((2, 3, 5), 1 / 15))
    assert normalize_cams(torch.rand(2, 3, 5, dtype=torch.float64)).dtype == torch.float64


class TinyCNN(torch.nn.Module):
    """forward_features -> a global pool -> one linear classifier, with the parts SnapMix checks swappable."""

    def __init__(self, pool, get_classifier=True):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.global_pool = pool
        self.fc = torch.nn.Linear(4, 5)
        self.num_features = 4
        if get_classifier:
            self.get_classifier = lambda: self.fc

    def forward_features(self, x):
        return self.conv(x)


def head_error(name: str, reason: str) -> str:
    return '^' + re.escape(f'SnapMix cannot make class activation maps for {name}: {reason}; accepted: a CNN whose '
                           'head is global average pooling followed by one nn.Linear classifier, with forward_features '
                           'giving (B, C, H, W) maps (e.g. ResNet, ResNeXt, DenseNet, EfficientNet, RegNet, '
                           'resnet18_cifar, PyramidNet)') + '$'


def test_the_head_check_in_full():
    for size in (1, (1, 1)):
        pool = torch.nn.AdaptiveAvgPool2d(size)
        assert cam_classifier(TinyCNN(pool)) is not None
    for size in (2, (1, 2), (2, 1)):
        pool = torch.nn.AdaptiveAvgPool2d(size)
        with pytest.raises(ValueError, match=head_error('TinyCNN', f'its head is absent with global_pool={pool!r}, '
                                                                   'not global average pooling')):
            cam_classifier(TinyCNN(pool))
    for model in (torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), TinyCNN(torch.nn.AdaptiveAvgPool2d(1), False)):
        with pytest.raises(ValueError, match=head_error(type(model).__name__,
                                                        'it has no forward_features / get_classifier')):
            cam_classifier(model)


class HeadedCNN(TinyCNN):
    """Pooling inside a timm ClassifierHead, as RegNet and ResNetV2 have it."""

    def __init__(self, pool_type='avg'):
        super().__init__(None)
        del self.global_pool
        self.head = ClassifierHead(4, 5, pool_type=pool_type)
        self.get_classifier = lambda: self.head.fc


def test_the_pooling_of_a_classifier_head_and_the_other_refusals_in_full():
    model = HeadedCNN()
    assert cam_classifier(model) is model.head.fc
    maxed = HeadedCNN('max')
    with pytest.raises(ValueError, match=head_error('HeadedCNN', f'its head is ClassifierHead with global_pool='
                                                                 f'{maxed.head.global_pool!r}, not global average pooling')):
        cam_classifier(maxed)
    with pytest.raises(ValueError, match=head_error('TinyCNN', 'its head is absent with no global_pool module, not '
                                                               'global average pooling')):
        cam_classifier(TinyCNN(None))
    nhwc = TinyCNN(torch.nn.AdaptiveAvgPool2d(1))
    nhwc.output_fmt = 'NHWC'
    with pytest.raises(ValueError, match=head_error('TinyCNN', 'its features are NHWC')):
        cam_classifier(nhwc)
    other = TinyCNN(torch.nn.AdaptiveAvgPool2d(1))
    other.get_classifier = lambda: torch.nn.Identity()
    with pytest.raises(ValueError, match=head_error('TinyCNN', 'its classifier is Identity, not nn.Linear')):
        cam_classifier(other)
    wider = TinyCNN(torch.nn.AdaptiveAvgPool2d(1))
    wider.num_features = 8
    with pytest.raises(ValueError, match=head_error('TinyCNN', 'layers sit between its 8 pooled features and its '
                                                               '4-input classifier')):
        cam_classifier(wider)
    bare = TinyCNN(torch.nn.AdaptiveAvgPool2d(1))
    del bare.num_features  # then the classifier's input count is the only one there is
    assert cam_classifier(bare) is bare.fc


def test_the_task_hands_timms_task_its_arguments(caplog):
    check_timm_task_arguments(lambda **kwargs: SnapMixTask(cifar_model(), **kwargs), caplog)
    with caplog.at_level('INFO'):
        SnapMixTask(cifar_model())  # verbose by default, as timm's tasks are
    messages = [r.getMessage() for r in caplog.records]
    assert 'SnapMixTask: alpha=5.0, prob=1.0' in messages and 'SnapMixTask: criterion=CrossEntropyLoss' in messages


def test_boxes_draw_from_the_papers_beta_by_default(monkeypatch):
    drawn = []
    beta = torch.distributions.Beta

    def recording(a, b, *args, **kwargs):
        drawn.append((float(a), float(b)))
        return beta(a, b, *args, **kwargs)
    monkeypatch.setattr(torch.distributions, 'Beta', recording)
    snapmix_boxes(H, W)
    assert drawn == [(5.0, 5.0)]


def test_the_task_logs_its_moex_too(caplog):
    model = cifar_model(moex=True)
    moex = MoExMixing(get_moex_hook(model), prob=0.5)
    with caplog.at_level('INFO'):
        SnapMixTask(model, moex=moex)
    assert f'SnapMixTask: alpha=5.0, prob=1.0, {moex}' in [r.getMessage() for r in caplog.records]
