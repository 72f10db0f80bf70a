import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.task import ClassificationTask

import timm_moex  # noqa: F401  (registers resnet18_cifar)
from timm_moex import attach_moex, get_moex_hook
from timm_moex.bitempered import BiTemperedLogisticLoss
from timm_moex.snapmix import (
    SnapMixTask, cam_classifier, class_activation_maps, normalize_cams, per_sample_loss, random_box, snapmix_boxes,
    snapmix_moex_weights, snapmix_paste, snapmix_weights)

H = W = 8
WHOLE = (0, H, 0, W)
EMPTY = (3, 3, 0, W)


def cifar_model(moex=False, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model('resnet18_cifar', num_classes=5)
    if moex:
        attach_moex(model)
    return model


def batch(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 5, (n,), generator=g)


def ce(output, target):
    return F.cross_entropy(output, target, reduction='none')


# ---- label weights ----

def test_whole_partner_box_gives_partner_weight_one():
    cams = torch.rand(3, H, W)
    w_a, w_b = snapmix_weights(cams, cams.flip(0), WHOLE, WHOLE)
    torch.testing.assert_close(w_b, torch.ones(3))
    torch.testing.assert_close(w_a, torch.zeros(3))


@pytest.mark.parametrize('empty_is', ['a', 'b'])
def test_empty_box_gives_partner_weight_zero(empty_is):
    cams = torch.rand(3, H, W)
    box_a, box_b = (EMPTY, WHOLE) if empty_is == 'a' else (WHOLE, EMPTY)
    w_a, w_b = snapmix_weights(cams, cams, box_a, box_b)
    assert torch.equal(w_b, torch.zeros(3)) and torch.equal(w_a, torch.ones(3))


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
    with pytest.raises(ValueError, match='alpha must be .*0'):
        SnapMixTask(model, alpha=0, verbose=False)
    with pytest.raises(ValueError, match='prob must be .*1.5'):
        SnapMixTask(model, prob=1.5, verbose=False)
    with pytest.raises(ValueError, match='moex_lam must be .*-0.1'):
        SnapMixTask(model, moex_lam=-0.1, verbose=False)
    with pytest.raises(TypeError, match='MoExHook'):
        SnapMixTask(model, hook='stem', verbose=False)


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
    task = SnapMixTask(model, prob=1.0, hook=hook, moex_prob=1.0, moex_lam=0.8, verbose=False).train()
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
    task = SnapMixTask(model, prob=0.0, hook=get_moex_hook(model), moex_prob=1.0, moex_lam=0.7, verbose=False).train()
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
    torch.testing.assert_close(result['loss'], plain(x, y)['loss'])


def test_never_mixes_in_eval():
    model = cifar_model(moex=True)
    task = SnapMixTask(model, prob=1.0, hook=get_moex_hook(model), moex_prob=1.0, verbose=False).eval()
    result = task(*batch())
    assert not result['snapmix'] and not result['moex']


def test_with_mixup_soft_targets():
    model = cifar_model(moex=True)
    task = SnapMixTask(model, hook=get_moex_hook(model), moex_prob=1.0, criterion=SoftTargetCrossEntropy(),
                       verbose=False).train()
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
