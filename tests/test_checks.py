"""The shared argument checks of timm_moex.utils.checks: what they accept, return and refuse, and their messages."""
import math

import pytest
import torch

import timm_moex.hooks.moex
import timm_moex.loss.moex
import timm_moex.ops.moex
import timm_moex.ops.moments
from timm_moex.utils.checks import (check_beta_alpha, check_choice, check_eps, check_model, check_perm,
                                    check_unit_interval)


@pytest.mark.parametrize('value', [0, 0.0, 0.25, 1, 1.0])
def test_unit_interval_accepts_numbers_in_0_1_as_floats(value):
    result = check_unit_interval('prob', value)
    assert result == value and type(result) is float


@pytest.mark.parametrize('value', [-0.01, 1.01, math.nan, math.inf, True, False, '0.5', None])
def test_unit_interval_refuses_the_rest(value):
    with pytest.raises(ValueError, match=rf'^prob must be a number in \[0, 1\]; got {value!r}$'):
        check_unit_interval('prob', value)


@pytest.mark.parametrize('value', [1e-3, 0.2, 1, 100.0])
def test_beta_alpha_accepts_finite_positive_numbers_as_floats(value):
    result = check_beta_alpha(value, 0.2)
    assert result == value and type(result) is float


@pytest.mark.parametrize('value', [0, -1.0, math.inf, math.nan, True, '1', None])
def test_beta_alpha_refuses_the_rest_and_quotes_the_papers_value(value):
    with pytest.raises(ValueError, match=rf'^alpha must be a finite number > 0 \(Beta\(alpha, alpha\); the paper uses '
                                         rf'0.2\); got {value!r}$'):
        check_beta_alpha(value, 0.2)


def test_choice_returns_the_value_or_names_the_choices():
    assert check_choice('mix', 'random', ('random', 'crossdomain')) == 'random'
    with pytest.raises(ValueError, match=r"^mix must be one of \('random', 'crossdomain'\); got 'crossdomian'$"):
        check_choice('mix', 'crossdomian', ('random', 'crossdomain'))


def test_model_returns_a_module_and_suggests_building_one():
    model = torch.nn.Linear(2, 2)
    assert check_model(model) is model
    for value, shown in [(3, 'int 3'), ('', "str ''")]:
        with pytest.raises(TypeError, match=rf"^model must be a torch.nn.Module; got {shown}: build it first, e.g. "
                                            r"timm.create_model\('resnet50'\)$"):
            check_model(value)


def test_the_operations_the_loss_and_the_hook_share_one_perm_check_and_one_eps_check():
    assert timm_moex.ops.moments.check_perm is timm_moex.ops.moex.check_perm is timm_moex.loss.moex.check_perm \
        is check_perm
    assert timm_moex.ops.moments.check_eps is timm_moex.ops.moex.check_eps is timm_moex.hooks.moex.check_eps \
        is check_eps
