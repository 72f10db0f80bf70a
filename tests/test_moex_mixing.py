"""MoExMixing: the one place that decides, pairs, arms and weighs MoEx for every task."""
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_moex
from timm_moex import MoExClassificationTask, MoExMixing, SnapMixTask, attach_moex
from timm_moex.task.moex_mixing import coin, draw_pairing, resolve_moex_argument


@pytest.fixture(scope='module')
def hook():
    torch.manual_seed(0)
    return attach_moex(timm.create_model('resnet10t', num_classes=5))


def test_is_exported():
    assert 'MoExMixing' in timm_moex.__all__ and timm_moex.MoExMixing is MoExMixing


def test_defaults_are_the_papers_cifar_recipe(hook):
    moex = MoExMixing(hook)
    assert (moex.hook, moex.prob, moex.lam, moex.pairing) == (hook, 0.25, 0.5, 'random')
    assert repr(moex) == f"MoExMixing({hook}, prob=0.25, lam=0.5, pairing='random')"


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(prob=1.5), ValueError, r'^prob must be a number in \[0, 1\]; got 1.5$'),
    (dict(prob=True), ValueError, r'^prob must be a number in \[0, 1\]; got True$'),
    (dict(lam=-0.1), ValueError, r'^lam must be a number in \[0, 1\]; got -0.1$'),
    (dict(lam='0.5'), ValueError, r"^lam must be a number in \[0, 1\]; got '0.5'$"),
    (dict(pairing='shuffle'), ValueError, r"^pairing must be one of \('random', 'flip'\); got 'shuffle'$"),
])
def test_arguments_are_checked(hook, kwargs, error, match):
    with pytest.raises(error, match=match):
        MoExMixing(hook, **kwargs)


def test_hook_must_be_a_moex_hook():
    with pytest.raises(TypeError, match=r'^hook must be a timm_moex MoExHook \(see get_moex_hook\); got str$'):
        MoExMixing('stem')


@pytest.mark.parametrize('prob, expected', [(0.0, False), (1.0, True)])
def test_prob_zero_and_one_decide_without_drawing(hook, prob, expected):
    moex = MoExMixing(hook, prob=prob)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert all(moex.fires(True) is expected for _ in range(100))
    assert torch.equal(torch.get_rng_state(), state)  # the coin took nothing from the generator
    assert coin(prob) is expected


def test_eval_mode_never_mixes_nor_draws(hook):
    moex = MoExMixing(hook, prob=1.0)
    state = torch.get_rng_state()
    assert moex.fires(False) is False
    assert moex.draw_perm(4, torch.device('cpu'), training=False) is None
    assert torch.equal(torch.get_rng_state(), state)


def test_prob_is_the_fraction_of_batches(hook):
    moex = MoExMixing(hook, prob=0.25)
    torch.manual_seed(0)
    hits = sum(moex.draw_perm(4, torch.device('cpu'), training=True) is not None for _ in range(2000))
    # 2000 draws of Bernoulli(0.25): mean 500, std 19.4; six std either side.
    assert 384 < hits < 616


def test_draw_perm_tosses_then_pairs(hook):
    """The coin first, then the pairing: the draws of the task before MoExMixing."""
    torch.manual_seed(3)  # its coin lands under 0.5
    perm = MoExMixing(hook, prob=0.5).draw_perm(6, torch.device('cpu'), training=True)
    torch.manual_seed(3)
    expected = torch.randperm(6) if torch.rand(()).item() < 0.5 else None
    assert perm is not None and expected is not None and torch.equal(perm, expected)
    flip = MoExMixing(hook, prob=1.0, pairing='flip').draw_perm(5, torch.device('cpu'), training=True)
    assert flip.tolist() == [4, 3, 2, 1, 0] and torch.equal(draw_pairing('flip', 5, torch.device('cpu')), flip)


@pytest.mark.parametrize('pairing', ['random', 'flip'])
def test_the_pairing_lives_on_the_device_asked_for(hook, pairing):
    # the meta device stands in for a GPU: a pairing made on the default device would show up here
    meta = torch.device('meta')
    assert draw_pairing(pairing, 4, meta).device == meta
    assert MoExMixing(hook, prob=1.0, pairing=pairing).draw_perm(4, meta, training=True).device == meta
    task = MoExClassificationTask(hook._model, prob=1.0, pairing=pairing, verbose=False).train()
    assert task.draw_perm(4, meta).device == meta


def test_arm_arms_the_hook_for_one_forward(hook):
    perm = torch.tensor([1, 0])
    MoExMixing(hook).arm(perm)
    assert hook.armed
    hook.disarm()


@pytest.mark.parametrize('lam', [0.3, 0.5, 1.0])
def test_loss_is_the_formula(hook, lam):
    out, target = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    logp = out.log_softmax(-1)
    rows = torch.arange(6)
    by_hand = -(lam * logp[rows, target] + (1 - lam) * logp[rows, target[perm]]).mean()
    torch.testing.assert_close(MoExMixing(hook, lam=lam).loss(F.cross_entropy, out, target, perm), by_hand)


def test_the_classification_task_holds_one(hook):
    task = MoExClassificationTask(hook._model, prob=0.7, lam=0.6, pairing='flip', verbose=False)
    assert isinstance(task.moex, MoExMixing) and task.moex.hook is hook
    assert (task.hook, task.prob, task.lam, task.pairing) == (hook, 0.7, 0.6, 'flip')


# ---- the deprecated arguments of the mixing tasks ----

def test_without_deprecated_arguments_moex_passes_through(hook):
    moex = MoExMixing(hook)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert resolve_moex_argument('Task', moex) is moex
        assert resolve_moex_argument('Task', None) is None


def test_deprecated_arguments_warn_at_the_callers_line(hook):
    with pytest.warns(DeprecationWarning) as record:
        task = SnapMixTask(hook._model, hook=hook, moex_prob=0.3, verbose=False)
    assert (task.moex.prob, task.moex.lam) == (0.3, 0.9)
    assert record[0].filename == __file__  # the line that built the task, not the package's
    assert 'moex=MoExMixing(hook, prob=0.3, lam=0.9) instead' in str(record[0].message)


def test_deprecated_arguments_keep_their_old_defaults(hook):
    with pytest.warns(DeprecationWarning):
        moex = resolve_moex_argument('Task', None, hook)
    assert (moex.hook, moex.prob, moex.lam, moex.pairing) == (hook, 0.25, 0.5, 'random')
    with pytest.warns(DeprecationWarning):
        moex = resolve_moex_argument('Task', None, hook, moex_lam=0.7, legacy_lam=0.9, pairing='flip')
    assert (moex.prob, moex.lam, moex.pairing) == (0.25, 0.7, 'flip')


def test_deprecated_arguments_are_checked_under_their_names(hook):
    with pytest.raises(ValueError, match=r'^moex_prob must be a number in \[0, 1\]; got 2$'):
        resolve_moex_argument('Task', None, hook, moex_prob=2)
    with pytest.raises(ValueError, match=r'^moex_lam must be a number in \[0, 1\]; got -1$'):
        resolve_moex_argument('Task', None, None, moex_lam=-1)


def test_moex_given_both_ways_is_refused_in_full():
    moex = MoExMixing(attach_moex(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), layer='0'))
    with pytest.raises(ValueError, match=r'^SnapMixTask got moex= and moex_prob=, moex_lam=; pass moex= alone '
                                         r'\(hook=, moex_prob= and moex_lam= are its deprecated spelling\)$'):
        resolve_moex_argument('SnapMixTask', moex, None, 0.5, 0.9)
