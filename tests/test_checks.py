"""The shared argument checks of timm_moex.utils.checks: what they accept, return and refuse, and their messages."""
import math

import pytest

from timm_moex.utils.checks import check_beta_alpha, check_choice, check_unit_interval


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
