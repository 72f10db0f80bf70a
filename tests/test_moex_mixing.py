"""MoExMixing: the one place that decides, pairs, arms and weighs MoEx for every task."""
import pytest
import timm
import torch
import torch.nn.functional as F

import timm_moex
from timm_moex import MOEX_RECIPES, AutoMixTask, MoExClassificationTask, MoExMixing, SnapMixTask, attach_moex
from timm_moex.task.moex_mixing import check_moex_argument, coin, draw_pairing


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


def test_the_recipes_are_the_papers_and_read_only(hook):
    """The official values (the paper's CIFAR and ImageNet code), spread into MoExMixing as they are."""
    assert {name: dict(recipe) for name, recipe in MOEX_RECIPES.items()} == {
        'cifar': dict(prob=0.25, lam=0.5), 'imagenet': dict(prob=1.0, lam=0.9),
        'imagenet_cutmix': dict(prob=0.25, lam=0.9)}
    moex = MoExMixing(hook, **MOEX_RECIPES['imagenet'])
    assert (moex.prob, moex.lam) == (1.0, 0.9)
    with pytest.raises(TypeError):
        MOEX_RECIPES['cifar']['lam'] = 0.9
    with pytest.raises(TypeError):
        MOEX_RECIPES['mine'] = dict(prob=1.0, lam=1.0)


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
    task = MoExClassificationTask(hook._model, MoExMixing(hook, prob=1.0, pairing=pairing), verbose=False).train()
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
    moex = MoExMixing(hook, prob=0.7, lam=0.6, pairing='flip')
    task = MoExClassificationTask(hook._model, moex, verbose=False)
    assert task.moex is moex and task.hook is hook
    default = MoExClassificationTask(hook._model, verbose=False).moex  # the model's hook, the CIFAR recipe
    assert (default.hook, default.prob, default.lam, default.pairing) == (hook, 0.25, 0.5, 'random')


def test_the_tasks_take_a_moex_mixing_or_none(hook):
    moex = MoExMixing(hook)
    assert check_moex_argument('Task', moex, 'random') is moex and check_moex_argument('Task', None, 'flip') is None
    with pytest.raises(TypeError, match=r'^moex must be a timm_moex MoExMixing or None; got float$'):
        check_moex_argument('Task', 0.25, 'random')
    with pytest.raises(TypeError, match=r'^moex must be a timm_moex MoExMixing; got MoExHook$'):
        MoExClassificationTask(hook._model, hook, verbose=False)


@pytest.mark.parametrize('task', [SnapMixTask, AutoMixTask])
@pytest.mark.parametrize('old', [dict(hook=None), dict(moex_prob=0.5), dict(moex_lam=0.9)])
def test_the_mixing_tasks_have_no_second_spelling_of_moex(hook, task, old):
    with pytest.raises(TypeError, match='unexpected keyword argument'):
        task(hook._model, verbose=False, **old)
