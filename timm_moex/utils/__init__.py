"""Helpers that every layer of the library shares: argument checks, unwrapping a model, a coin toss."""
from .amp import autocast_off
from .checks import check_beta_alpha, check_choice, check_class_indices, check_unit_interval
from .model import unwrap_model
from .random import coin
