"""What train_moex.py builds for each configuration: the task, its pairing, its criterion, and the losses it
returns, recorded from inside a real one-epoch run and checked against formulas written here.

The other training tests check that runs finish and that the parts are right when built by hand; these check
the wiring between the configuration and the parts, which a run can get wrong while still training.
"""
import csv

import pytest
import torch
import torch.nn.functional as F
from timm.task import ClassificationTask

import train_moex
from timm_moex import AutoMixTask, BiTemperedLogisticLoss, MoExClassificationTask, SnapMixTask

pytestmark = pytest.mark.slow  # every test here runs a training script

TASK_CLASSES = (ClassificationTask, MoExClassificationTask, SnapMixTask, AutoMixTask)


@pytest.fixture
def recorded(monkeypatch):
    """Every training-task call of the run: (task, input, target, result), in order (outermost calls only)."""
    calls, depth = [], [0]
    for cls in TASK_CLASSES:
        forward = vars(cls).get('forward')
        if forward is None:
            continue

        def recording_forward(self, input, target, _forward=forward):
            depth[0] += 1
            try:
                result = _forward(self, input, target)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                calls.append((self, input.detach().clone(), target.detach().clone(), result))
            return result

        monkeypatch.setattr(cls, 'forward', recording_forward)
    return calls


def train_calls(calls):
    """The calls made in training mode (the task is also reachable from evaluation code in principle)."""
    return [c for c in calls if c[0].get_trainable_module().training]


def one_epoch(run_args, tmp_path, *extra):
    out = tmp_path / 'run'
    train_moex.main(run_args(*extra, '--epochs', '1', out=out))
    with open(out / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def flip(batch_size):
    return torch.arange(batch_size - 1, -1, -1)


def soft_ce(output, target):
    return torch.sum(-target * F.log_softmax(output.float(), dim=-1), dim=-1).mean()


def test_plain_run_builds_timms_task_with_cross_entropy(recorded, run_args, tmp_path):
    one_epoch(run_args, tmp_path)
    calls = train_calls(recorded)
    assert calls and all(type(task) is ClassificationTask for task, *_ in calls)
    for task, _, target, result in calls:
        torch.testing.assert_close(result['loss'], F.cross_entropy(result['output'].float(), target))


def test_moex_run_uses_a_random_pairing_and_the_configured_lam(recorded, run_args, tmp_path):
    one_epoch(run_args, tmp_path, '--moex', '--moex-prob', '1.0', '--moex-lam', '0.7')
    calls = train_calls(recorded)
    assert calls and all(type(task) is MoExClassificationTask for task, *_ in calls)
    task = calls[0][0]
    assert (task.moex.pairing, task.moex.lam, task.moex.prob) == ('random', 0.7, 1.0)
    perms = [result['perm'] for *_, result in calls]
    assert any(not torch.equal(p, flip(len(p))) for p in perms)  # 4 random permutations of 8: not all B-1-i
    for _, _, target, result in calls:
        out, perm = result['output'].float(), result['perm']
        by_hand = 0.7 * F.cross_entropy(out, target) + 0.3 * F.cross_entropy(out, target[perm])
        torch.testing.assert_close(result['loss'], by_hand)


@pytest.mark.parametrize('mix', [['--cutmix', '1.0'], ['--mixup', '1.0']], ids=['cutmix', 'mixup'])
def test_moex_with_batch_mixing_shares_mixups_pairing(mix, recorded, run_args, tmp_path):
    """Mixup/CutMix pair sample i with B-1-i; MoEx must use that pairing, or the three-term loss is wrong."""
    one_epoch(run_args, tmp_path, '--moex', '--moex-prob', '1.0', '--moex-lam', '0.6', *mix)
    calls = train_calls(recorded)
    assert calls and all(type(task) is MoExClassificationTask for task, *_ in calls)
    for task, _, target, result in calls:
        assert task.moex.pairing == 'flip'
        perm = result['perm']
        assert torch.equal(perm.cpu(), flip(len(perm)))
        assert target.dim() == 2  # Mixup's soft targets
        out = result['output']
        by_hand = 0.6 * soft_ce(out, target) + 0.4 * soft_ce(out, target[flip(len(target))])
        torch.testing.assert_close(result['loss'], by_hand)


def test_bi_tempered_config_builds_the_bi_tempered_criterion(recorded, run_args, tmp_path):
    one_epoch(run_args, tmp_path, '--loss', 'bi_tempered', '--bitempered-t1', '0.7', '--bitempered-t2', '1.3')
    calls = train_calls(recorded)
    assert calls
    for task, _, target, result in calls:
        assert isinstance(task.criterion, BiTemperedLogisticLoss)
        assert (task.criterion.t1, task.criterion.t2) == (0.7, 1.3)
        expected = BiTemperedLogisticLoss(0.7, 1.3, num_iters=task.criterion.num_iters)(result['output'], target)
        torch.testing.assert_close(result['loss'], expected)
        assert not torch.allclose(result['loss'], F.cross_entropy(result['output'].float(), target))


def test_moex_with_prob_below_one_reports_the_fraction_it_ran(recorded, run_args, tmp_path):
    rows = one_epoch(run_args, tmp_path, '--moex', '--moex-prob', '0.5', '--seed', '3')
    calls = train_calls(recorded)
    ran = [bool(result['moex']) for *_, result in calls]
    assert 0 < sum(ran) < len(ran)  # this seed draws both outcomes, so a wrong count shows
    assert float(rows[0]['train_moex_frac']) == pytest.approx(sum(ran) / len(ran))
    assert calls[0][0].moex.prob == 0.5


@pytest.mark.parametrize('extra, task_class', [
    (['--snapmix', '--moex', '--moex-prob', '1.0'], SnapMixTask),
    (['--mix', 'automix'], AutoMixTask),
], ids=['snapmix', 'automix'])
def test_mixing_methods_build_their_task(extra, task_class, recorded, run_args, tmp_path):
    one_epoch(run_args, tmp_path, *extra)
    calls = train_calls(recorded)
    assert calls and all(type(task) is task_class for task, *_ in calls)
    if '--moex' in extra:
        assert all(getattr(task, 'hook', None) is not None for task, *_ in calls)
        assert all(result['moex'] for *_, result in calls)
