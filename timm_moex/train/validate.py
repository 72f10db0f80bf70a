"""A configuration checked against the environment before anything runs or is written.

:func:`load_config` is the one call that reads a configuration (:func:`~timm_moex.train.config.parse_config`),
checks its values (:func:`~timm_moex.train.config.check_values`) and then what they refer to: timm's model
and optimizer names, a build of the model on the ``meta`` device (model_kwargs, the MoEx layer, SnapMix's
and AutoMix's needs), installed packages, the data, checkpoint and output folders, a Hub token.
"""
import difflib
import importlib.util
import os
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence

import huggingface_hub
import timm
import torch
import torch.nn as nn
from timm.models import is_model_pretrained
from timm.optim import create_optimizer_v2, list_optimizers

from ..hooks.layers import resolve_moex_layer
from ..hooks.moex import get_moex_hook
from ..hooks.style import attach_dsu, attach_mixstyle
from ..models import is_moex_variant
from ..ops.moex import parse_norm
from ..task.automix import parse_feature_layer, resolve_feature_layer
from ..task.snapmix import cam_classifier
from .builders import MOEX_VARIANT_KEYS, model_kwargs
from .config import TrainConfig, check_values, parse_config, resolve_output_dir
from .corruptions import parse_corruptions
from .data import check_auto_augment, check_data_dir, device_loader_unsupported, resolve_data_defaults
from .errors import ConfigError, first_line

__all__ = ['load_config', 'validate_config']


def load_config(argv: Optional[Sequence[str]] = None, check_paths: bool = True) -> TrainConfig:
    """Read YAML + command line into a checked TrainConfig (the command line wins).

    Args:
        argv: The command line without the program name (default ``sys.argv[1:]``).
        check_paths: Also check the data, checkpoint and output paths and the Hub token.

    Returns:
        The configuration.

    Raises:
        ConfigError: The first value that cannot be used, naming the key.
        DataError: The dataset is not under ``data_dir``.
    """
    return validate_config(parse_config(argv), check_paths=check_paths)


def validate_config(cfg: TrainConfig, check_paths: bool = True) -> TrainConfig:
    """Check the values of ``cfg`` and what they refer to.

    Args:
        cfg: The configuration (also one built by hand).
        check_paths: Also check the data, checkpoint and output paths and the Hub token.

    Returns:
        ``cfg``.

    Raises:
        ConfigError: The first value that cannot be used, naming the key.
        DataError: The dataset is not under ``data_dir`` (with ``check_paths``).
    """
    check_values(cfg)
    if not timm.is_model(cfg.model):
        close = difflib.get_close_matches(cfg.model, timm.list_models(), n=3, cutoff=0.7)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
            " (timm.list_models() lists the known names)"
        raise ConfigError(f'model: timm does not know {cfg.model!r}{hint}')
    if cfg.pretrained and not is_model_pretrained(cfg.model) and \
            not {'pretrained_cfg', 'pretrained_cfg_overlay'} & set(cfg.model_kwargs):
        raise ConfigError(f'pretrained: timm has no pretrained weights for {cfg.model!r} (timm.list_pretrained() '
                          'lists the models that have them); use --pretrained false, or --initial-checkpoint PATH '
                          'to start from your own weights')
    if cfg.opt.lower().split('_')[-1] not in list_optimizers():
        close = difflib.get_close_matches(cfg.opt, list_optimizers(), n=3)
        raise ConfigError(f'opt: {cfg.opt!r} is not a timm optimizer; close names: {close} '
                          '(timm.optim.list_optimizers())')
    if cfg.opt_kwargs:
        _check_opt_kwargs(cfg)
    if cfg.moex:
        try:
            parse_norm(cfg.moex_norm)
        except ValueError as e:
            raise ConfigError(f'moex_norm: {e}') from None
    if cfg.compile and cfg.compile_mode != 'default' and cfg.compile_backend != 'inductor':
        raise ConfigError(f"compile_mode: {cfg.compile_mode!r} is a mode of the inductor backend, not of "
                          f"compile_backend {cfg.compile_backend!r}; drop --compile-mode or use --compile-backend "
                          f"inductor")
    if cfg.moex_impl == 'triton' and cfg.compile:
        raise ConfigError("moex_impl: 'triton' cannot run under compile: true (torch.compile traces the PyTorch ops "
                          "and fuses them itself); use 'auto'")
    _check_model_build(cfg)
    if cfg.auto_augment:
        check_auto_augment(cfg.auto_augment)
    img_size = resolve_data_defaults(cfg)[0]
    if parse_corruptions(cfg.eval_corruptions) and img_size > 64:
        raise ConfigError(f'eval_corruptions: the CIFAR-10-C corruptions are set for 32 px images, not '
                          f'img_size={img_size}; give --img-size 64 or less, or eval_corruptions: none')
    if cfg.loader == 'device':
        reason = device_loader_unsupported(cfg)
        if reason:
            raise ConfigError(f"loader: 'device' {reason}; use loader: workers (or auto)")
    if cfg.log_with == 'tensorboard':
        if not (importlib.util.find_spec('tensorboard') or importlib.util.find_spec('tensorboardX')):
            raise ConfigError("log_with: 'tensorboard' needs the tensorboard package (pip install tensorboard)")
    if cfg.dataset == 'digits':
        if not importlib.util.find_spec('sklearn'):
            raise ConfigError("dataset: 'digits' needs scikit-learn (pip install 'timm-moex[quickstart]')")

    if not check_paths:
        return cfg
    if cfg.eval_only:
        if not cfg.checkpoint:
            raise ConfigError('checkpoint: eval_only needs --checkpoint, a checkpoint-<epoch> folder or a '
                              '.safetensors file')
        if not os.path.exists(cfg.checkpoint):
            raise ConfigError(f'checkpoint: {cfg.checkpoint!r} does not exist')
    if cfg.initial_checkpoint and not os.path.exists(cfg.initial_checkpoint):
        raise ConfigError(f'initial_checkpoint: {cfg.initial_checkpoint!r} does not exist')
    if cfg.push_to_hub:
        _check_push_to_hub(cfg.push_to_hub)
    if cfg.resume not in ('', 'auto') and not os.path.isdir(cfg.resume):
        raise ConfigError(f"resume: {cfg.resume!r} is not a checkpoint folder; use '', 'auto' or a checkpoint-<epoch> "
                          'folder')
    check_data_dir(cfg)
    out = Path(resolve_output_dir(cfg))
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f'output_dir: {str(parent)!r} is a file, not a folder, so {str(out)!r} cannot be '
                                  'created; pass another --output-dir')
            if not os.access(parent, os.W_OK | os.X_OK):  # read-only: refused now, not as an OS error mid-run
                made = 'written' if parent == out else 'created'
                raise ConfigError(f'output_dir: {str(parent)!r} is not writable (permissions or a read-only file '
                                  f'system), so {str(out)!r} cannot be {made}; pass an --output-dir you can write to')
            break
    if not cfg.eval_only and not cfg.resume and out.is_dir() and (
            any(out.glob('checkpoint-*')) or (out / 'results.json').exists()):
        raise ConfigError(f'output_dir: {str(out)!r} already holds a run; use --resume auto to continue it or '
                          'another --output-dir')
    return cfg


_HUB_REPO_ID = re.compile(r'^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$')


def _check_push_to_hub(repo_id: str) -> None:
    """A Hub repository id and a token, checked before training rather than after it."""
    if not _HUB_REPO_ID.match(repo_id) or '--' in repo_id or '..' in repo_id or repo_id.endswith(('.', '-')):
        raise ConfigError(f"push_to_hub: {repo_id!r} is not a Hugging Face Hub repository id; use 'owner/name' "
                          '(letters, digits, -, _, .)')
    if not huggingface_hub.get_token():
        raise ConfigError(f'push_to_hub: no Hugging Face token to publish {repo_id!r} with; log in first '
                          '(hf auth login) or set HF_TOKEN')


def _check_opt_kwargs(cfg: TrainConfig) -> None:
    """Build the optimizer for a one-parameter module: an argument the optimizer lacks is refused now, not after the
    data and the model are set up."""
    lr = cfg.lr if cfg.lr is not None else cfg.lr_base
    try:
        with warnings.catch_warnings():  # an optimizer's advice (e.g. kron's about opt_einsum) comes with the run
            warnings.simplefilter('ignore')
            create_optimizer_v2(nn.Linear(2, 2, bias=False), opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                momentum=cfg.momentum, **cfg.opt_kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f'opt_kwargs: {cfg.opt_kwargs!r} are not accepted by {cfg.opt!r}: '
                          f'{first_line(e)}') from None
    except Exception:  # noqa: BLE001  an optimizer that needs a GPU or a package: reported when the run builds it
        return


def _check_model_build(cfg: TrainConfig) -> None:
    """Build the model on the meta device (no memory, no weights) to check model_kwargs and moex_layer."""
    given_twice = sorted(set(MOEX_VARIANT_KEYS) & set(cfg.model_kwargs))
    if given_twice:
        flag = '--' + given_twice[0].replace('_', '-')
        raise ConfigError(f'model_kwargs: {given_twice} are keys of their own; give them as {flag} (or '
                          f'{given_twice[0]}: in the YAML), not inside model_kwargs')
    try:
        with torch.device('meta'):
            model = timm.create_model(cfg.model, num_classes=cfg.num_classes or 10, **model_kwargs(cfg))
    except TypeError as e:
        raise ConfigError(f'model_kwargs: {cfg.model_kwargs!r} are not accepted by {cfg.model!r}: {e}') from None
    except ValueError as e:  # a *_moex model's MoEx arguments, checked when its hook is made
        if not is_moex_variant(cfg.model):
            return
        raise ConfigError(f'{cfg.model}: {first_line(e)} (the moex_layer / moex_norm / '
                          f'moex_eps keys are its MoEx arguments)') from None
    except Exception:  # noqa: BLE001  a model that cannot be built on 'meta': checked when it is built
        return
    if cfg.snapmix:
        try:
            cam_classifier(model)
        except ValueError as e:
            raise ConfigError(f'snapmix: {e}') from None
    if cfg.mix == 'automix':
        try:
            resolve_feature_layer(model, parse_feature_layer(cfg.automix_feature_layer))
        except ValueError as e:
            raise ConfigError(f'automix_feature_layer: {e}') from None
    for key, attach, layers in (('mixstyle', attach_mixstyle, cfg.mixstyle_layers), ('dsu', attach_dsu, cfg.dsu_layers)):
        if getattr(cfg, key):
            try:
                attach(model, layers=layers)
            except ValueError as e:
                raise ConfigError(f'{key}_layers: {e}') from None
    if cfg.moex and get_moex_hook(model) is None:
        try:
            resolve_moex_layer(model, cfg.moex_layer)
        except ValueError as e:
            raise ConfigError(f'moex_layer: {e}') from None
