import os
import re

import pytest
import timm
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.task import ClassificationTask

from timm_moex import MoExClassificationTask, MoExLoss, MoExMixing, attach_moex, get_moex_hook

from helpers import check_timm_task_arguments


def small_model(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model('resnet18', num_classes=5)
    attach_moex(model)
    return model


def moex_task(model, prob=0.25, lam=0.5, pairing='random', **kwargs):
    """MoExClassificationTask with MoExMixing(hook, prob, lam, pairing) at the model's hook."""
    return MoExClassificationTask(model, MoExMixing(get_moex_hook(model), prob=prob, lam=lam, pairing=pairing),
                                  **kwargs)


# ---- MoExLoss ----

@pytest.mark.parametrize('criterion', [torch.nn.CrossEntropyLoss(), LabelSmoothingCrossEntropy(0.1)])
def test_loss_with_lam_one_is_the_criterion(criterion):
    out, target = torch.randn(6, 5), torch.randint(0, 5, (6,))
    perm = torch.randperm(6)
    torch.testing.assert_close(MoExLoss(criterion)(out, target, perm, 1.0), criterion(out, target))


@pytest.mark.parametrize('perm', [torch.tensor([1, 0]), torch.arange(7), torch.arange(6)[None]])
def test_loss_refuses_a_perm_of_another_length_in_one_line(perm):
    """PyTorch's batch-size mismatch from inside the criterion before."""
    out, target = torch.randn(6, 5), torch.randint(0, 5, (6,))
    with pytest.raises(ValueError) as err:
        MoExLoss(torch.nn.CrossEntropyLoss())(out, target, perm, 0.5)
    assert str(err.value) == ('perm must have shape (6,), one donor index per sample of the batch; '
                              f'got shape {tuple(perm.shape)}')



@pytest.mark.parametrize('perm, message', [
    ([0, 1, 2, 9], 'perm[3] = 9 is not a sample of the batch of 4'),
    ([-5, 1, 2, 0], 'perm[0] = -5 is not a sample of the batch of 4'),
])
def test_loss_refuses_a_donor_index_out_of_range_naming_perm(perm, message):
    """An IndexError that did not name perm before."""
    with pytest.raises(ValueError, match='^' + re.escape(message) + r': donor indices must be in 0\.\.3 '
                                         r'\(or -4\.\.-1, from the end\)$'):
        MoExLoss(torch.nn.CrossEntropyLoss())(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.tensor(perm), 0.5)


def test_loss_refuses_a_perm_that_is_no_integer_tensor():
    """A boolean perm selected targets as a mask before, and the criterion failed on their count."""
    loss = MoExLoss(torch.nn.CrossEntropyLoss())
    out, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(TypeError, match=r'^perm must hold integer indices \(torch.int64 or torch.int32\); got '
                                        r'torch.bool$'):
        loss(out, target, torch.tensor([True, False, True, False]), 0.5)
    with pytest.raises(TypeError, match=r'^perm must be a tensor of sample indices; got list$'):
        loss(out, target, [1, 0, 3, 2], 0.5)


@pytest.mark.parametrize('criterion, shown', [('ce', "str 'ce'"), (None, 'NoneType None')])
def test_loss_refuses_a_criterion_that_is_not_callable_when_made(criterion, shown):
    """A string failed only when called before, with "'str' object is not callable"."""
    with pytest.raises(TypeError, match=r'^criterion must be a callable loss\(output, target\), e.g. '
                                        rf'torch.nn.CrossEntropyLoss\(\); got {shown}$'):
        MoExLoss(criterion)


def test_loss_hard_labels_by_hand():
    out, target = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    logp = out.log_softmax(-1)
    rows = torch.arange(6)
    by_hand = -(0.3 * logp[rows, target] + 0.7 * logp[rows, target[perm]]).mean()
    torch.testing.assert_close(MoExLoss(torch.nn.CrossEntropyLoss())(out, target, perm, 0.3), by_hand)


def test_loss_soft_targets_equal_the_mixture():
    out = torch.randn(4, 5)
    target = torch.softmax(torch.randn(4, 5), -1)
    perm = torch.tensor([2, 0, 3, 1])
    mixed = 0.6 * target + 0.4 * target[perm]
    expected = -(mixed * out.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(MoExLoss(SoftTargetCrossEntropy())(out, target, perm, 0.6), expected)


def test_cutmix_soft_targets_give_the_three_term_loss():
    """CutMix along perm, then MoEx along the same perm: the three terms of the official CutMix + MoEx code."""
    out, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    perm = torch.tensor([1, 2, 3, 0])
    cutmix_lam, lam = 0.7, 0.9
    soft = cutmix_lam * F.one_hot(y, 5).float() + (1 - cutmix_lam) * F.one_hot(y[perm], 5).float()
    loss = MoExLoss(SoftTargetCrossEntropy())(out, soft, perm, lam)
    ce = torch.nn.CrossEntropyLoss()
    y_b, y_c = y[perm], y[perm][perm]
    three_terms = (ce(out, y) * cutmix_lam * lam
                   + ce(out, y_b) * ((1 - cutmix_lam) * lam + cutmix_lam * (1 - lam))
                   + ce(out, y_c) * (1 - cutmix_lam) * (1 - lam))
    torch.testing.assert_close(loss, three_terms)


def test_loss_refuses_lam_outside_unit_interval():
    with pytest.raises(ValueError, match='1.5'):
        MoExLoss(torch.nn.CrossEntropyLoss())(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([1, 0]), 1.5)


def test_loss_refuses_a_negative_lam():
    with pytest.raises(ValueError, match=r'lam must be in \[0, 1\]; got -0.25'):
        MoExLoss(torch.nn.CrossEntropyLoss())(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([1, 0]), -0.25)


def test_loss_with_lam_zero_is_the_criterion_of_the_partners_targets():
    out, target = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    criterion = torch.nn.CrossEntropyLoss()
    torch.testing.assert_close(MoExLoss(criterion)(out, target, perm, 0.0), criterion(out, target[perm]))


class CountingCriterion:
    """Cross-entropy that records the targets it was called with."""

    def __init__(self):
        self.targets = []

    def __call__(self, output, target):
        self.targets.append(target)
        return F.cross_entropy(output, target)


def test_loss_with_lam_one_runs_the_criterion_once_on_the_own_targets():
    out, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    criterion = CountingCriterion()
    MoExLoss(criterion)(out, target, torch.tensor([1, 2, 3, 0]), 1.0)
    assert len(criterion.targets) == 1
    assert torch.equal(criterion.targets[0], target)


# ---- MoExClassificationTask ----

def test_task_is_a_timm_classification_task():
    task = moex_task(small_model(), prob=1.0, lam=0.5, verbose=False)
    assert isinstance(task, ClassificationTask)


def test_task_with_prob_one_applies_moex_and_its_loss():
    model = small_model()
    task = moex_task(model, prob=1.0, lam=0.7, verbose=False).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    torch.manual_seed(3)
    result = task(x, y)
    assert result['moex'] is True
    perm = result['perm']
    assert sorted(perm.tolist()) == list(range(8))
    assert not get_moex_hook(model).armed
    expected = 0.7 * F.cross_entropy(result['output'], y) + 0.3 * F.cross_entropy(result['output'], y[perm])
    torch.testing.assert_close(result['loss'], expected)
    result['loss'].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_task_with_prob_zero_is_the_plain_task():
    model = small_model()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.0
    task = moex_task(model, prob=0.0, criterion_kwargs=dict(smoothing=0.1), verbose=False).train()
    plain = ClassificationTask(model, criterion_kwargs=dict(smoothing=0.1), verbose=False).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    result, expected = task(x, y), plain(x, y)
    assert sorted(result) == ['loss', 'moex', 'output'] and result['moex'] is False
    torch.testing.assert_close(result['loss'], expected['loss'])
    torch.testing.assert_close(result['output'], expected['output'])  # what timm's train.py reads for accuracy


def test_task_never_applies_moex_in_eval():
    task = moex_task(small_model(), prob=1.0, verbose=False).eval()
    assert task(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))['moex'] is False


def test_task_prob_is_the_fraction_of_batches():
    task = moex_task(small_model(), prob=0.25, verbose=False).train()
    torch.manual_seed(0)
    hits = sum(task.draw_perm(4, torch.device('cpu')) is not None for _ in range(2000))
    # 2000 draws of Bernoulli(0.25): mean 500, std 19.4; six std either side.
    assert 384 < hits < 616


def test_task_with_mixup_soft_targets():
    model = small_model()
    task = moex_task(model, prob=1.0, lam=0.5, criterion=SoftTargetCrossEntropy(), verbose=False).train()
    mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=5)
    x, y = mixup(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    result = task(x, y)
    perm = result['perm']
    expected = -((0.5 * y + 0.5 * y[perm]) * result['output'].log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(result['loss'], expected)


def test_flip_pairing_with_timm_cutmix_gives_the_three_term_loss():
    """timm's CutMix pairs i with B-1-i; MoEx along the same pairing gets the paper's three terms
    (its target_c = target_b[perm] is target_a, the flip being its own inverse)."""
    model = small_model()
    task = moex_task(model, prob=1.0, lam=0.9, pairing='flip', criterion=SoftTargetCrossEntropy(),
                     verbose=False).train()
    y = torch.tensor([0, 1, 2, 3])
    mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=5, label_smoothing=0.0)
    torch.manual_seed(1)
    x, soft = mixup(torch.randn(4, 3, 32, 32), y)
    cutmix_lam = soft[0, 0].item()
    result = task(x, soft)
    assert result['perm'].tolist() == [3, 2, 1, 0]
    ce = torch.nn.CrossEntropyLoss()
    out, lam, y_b = result['output'], 0.9, y.flip(0)
    three_terms = (ce(out, y) * cutmix_lam * lam
                   + ce(out, y_b) * ((1 - cutmix_lam) * lam + cutmix_lam * (1 - lam))
                   + ce(out, y) * (1 - cutmix_lam) * (1 - lam))
    torch.testing.assert_close(result['loss'], three_terms)


def test_task_needs_a_hook():
    with pytest.raises(ValueError, match=r'^ResNet has no MoEx hook: create a \*_moex model, call '
                                         r'timm_moex.attach_moex\(model\) before building the task, or pass '
                                         r'moex=MoExMixing\(hook\)$'):
        MoExClassificationTask(timm.create_model('resnet18', num_classes=5), verbose=False)


def test_task_passes_criterion_device_and_dtype_to_timms_task(caplog):
    check_timm_task_arguments(lambda **kwargs: MoExClassificationTask(small_model(), **kwargs), caplog)


def test_task_takes_the_hook_it_is_given():
    hooked = small_model()
    hook = get_moex_hook(hooked)
    plain = timm.create_model('resnet18', num_classes=5)
    assert get_moex_hook(plain) is None
    task = MoExClassificationTask(plain, moex=MoExMixing(hook), verbose=False)
    assert task.hook is hook and task.moex.hook is hook


def test_task_logs_its_settings_by_default(caplog):
    with caplog.at_level('INFO', logger='timm_moex.task.moex'):
        moex_task(small_model(), prob=0.25, lam=0.9)
    assert any(r.getMessage().startswith('MoExClassificationTask: MoExMixing(') and 'prob=0.25' in r.getMessage()
               and 'lam=0.9' in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    with caplog.at_level('INFO', logger='timm_moex.task.moex'):
        MoExClassificationTask(small_model(), verbose=False)
    assert not any(r.getMessage().startswith('MoExClassificationTask:') for r in caplog.records)


# ---- DDP: two gloo processes on the CPU ----

def _ddp_worker(rank: int, world_size: int, port: int, results):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world_size)
    try:
        model = small_model(seed=0)
        task = moex_task(model, prob=1.0, lam=0.5, verbose=False).train()
        task.prepare_distributed()
        torch.manual_seed(100 + rank)  # each process permutes its own local batch
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
        result = task(x, y)
        result['loss'].backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[rank] = (result['moex'], result['perm'].tolist(), grad)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_task_under_two_process_ddp():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2, join=True)
    (applied0, perm0, grad0), (applied1, perm1, grad1) = results[0], results[1]
    assert applied0 and applied1
    assert sorted(perm0) == sorted(perm1) == [0, 1, 2, 3]
    assert torch.isfinite(grad0).all()
    torch.testing.assert_close(grad0, grad1)  # DDP averaged the gradients of two different batches
    assert grad0.abs().sum() > 0
