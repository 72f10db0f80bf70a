"""The training application behind ``train_moex.py`` / ``moex-train``: what the library does not need.

Its modules build on the library (``timm_moex``) and never the reverse, in this order:
``errors``, ``files`` and ``corruptions`` (no imports of the package), ``config`` (the typed
configuration), ``images`` < ``device_data`` < ``data`` (datasets and loaders), ``validate`` (a
configuration checked against the environment: :func:`load_config`), then ``checkpoint``,
``metrics``, ``robustness`` (errors on corrupted copies of the eval set), ``model_folder``, ``builders`` (the
model and task a run trains), ``run_folder`` (lock, resume, divergence advice, Hub push) and ``timm_train``
(timm's own ``train.py`` with MoEx).
"""
from .config import RESUME_MAY_CHANGE, TrainConfig, check_values, config_help, parse_config, read_run_config, \
    recipe_names, resolve_config_file, resolve_output_dir, resume_differences, save_config
from .errors import CheckpointError, ConfigError, DataError, Diverged, Interrupted, ResumeMismatch, RunError, \
    RunFolderBusy, Terminated, UnreadableImage, UserError
from .files import atomic_write_text
from .validate import load_config, validate_config

__all__ = [
    'TrainConfig', 'load_config', 'validate_config', 'parse_config', 'check_values', 'save_config', 'config_help',
    'recipe_names', 'resolve_config_file', 'resolve_output_dir', 'RESUME_MAY_CHANGE', 'read_run_config',
    'resume_differences', 'atomic_write_text',
    'UserError', 'ConfigError', 'RunError', 'RunFolderBusy', 'ResumeMismatch', 'CheckpointError', 'DataError',
    'UnreadableImage', 'Diverged', 'Interrupted', 'Terminated',
]
