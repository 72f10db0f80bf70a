"""The training configuration: one typed dataclass, loaded from YAML plus command-line overrides.

``load_config(argv)`` reads ``--config FILE.yaml`` (optional), applies every ``--key value``
override on top (the command line wins), checks every value once, and returns a
:class:`TrainConfig`. Anything wrong raises :class:`ConfigError` naming the key, the value and
what is accepted, before any output is written::

    python train_moex.py --config hparams/quickstart.yaml --lr 0.05 --moex false

Values on the command line are read as YAML scalars (``--decay-milestones [150,225]``,
``--model-kwargs '{drop_rate: 0.1}'``); a bare ``--flag`` sets a boolean key to true. Keys may
be written with dashes or underscores.
"""
import dataclasses
import difflib
import math
import os
import re
import sys
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .moex import MOEX_IMPLS

__all__ = ['TrainConfig', 'UserError', 'ConfigError', 'RunError', 'RunFolderBusy', 'ResumeMismatch',
           'CheckpointError', 'DataError', 'Diverged', 'Interrupted', 'load_config', 'validate_config',
           'save_config', 'config_help', 'device_loader_unsupported', 'RESUME_MAY_CHANGE', 'read_run_config',
           'resume_differences']


class UserError(Exception):
    """An error the user can cause and fix: train_moex.py prints it as one line and exits with ``exit_code``.

    Subclasses carry distinct exit codes so that a script driving runs can tell them apart.
    """

    exit_code = 1


class ConfigError(UserError, ValueError):
    """A configuration value that cannot be used; the message names the key and what is accepted."""

    exit_code = 2


class RunError(UserError):
    """A run that cannot go on: ``<what> (<the bad value>): <what to do>``.

    Args:
        what: what is wrong, e.g. ``'checkpoint is truncated or not a safetensors file'``.
        value: the offending value (a path, a number, a key); shown in parentheses.
        todo: what the user can do about it.
        exit_code: overrides the class's exit code.
    """

    exit_code = 3

    def __init__(self, what: str, value: Any, todo: str, exit_code: Optional[int] = None):
        self.what, self.value, self.todo = what, value, todo
        if exit_code is not None:
            self.exit_code = exit_code
        super().__init__(f'{what} ({value}): {todo}')


class RunFolderBusy(RunError):
    """Another live process holds the run folder's lock."""

    exit_code = 4


class ResumeMismatch(RunError):
    """``--resume`` with settings that contradict the run folder's config.yaml."""

    exit_code = 5


class CheckpointError(RunError):
    """A checkpoint or weights file that is empty, truncated, foreign or of another model."""

    exit_code = 6


class DataError(RunError):
    """A dataset that cannot be trained on as configured (classes, sizes, empty folders)."""

    exit_code = 7


class Diverged(RunError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 8


class Interrupted(RunError):
    """Ctrl-C (SIGINT) during a run; the last checkpoint is kept and ``--resume auto`` continues."""

    exit_code = 130  # 128 + SIGINT, the shell's convention


DATASETS = ('digits', 'cifar10', 'cifar100', 'imagefolder', 'imagenet')
AUG_RECIPES = ('auto', 'cifar', 'imagenet', 'none')
SCHEDULERS = ('cosine', 'step', 'multistep', 'tanh', 'poly', 'constant', 'none')
MIXED_PRECISION = ('no', 'fp16', 'bf16')
MIXUP_MODES = ('batch', 'pair', 'elem')
TRACKERS = ('tensorboard',)
LOADERS = ('auto', 'workers', 'device')
LOSSES = ('ce', 'bi_tempered')
MIX_METHODS = ('none', 'automix')
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')


def _f(default, doc: str, choices: Optional[Sequence] = None):
    """A dataclass field with its help text (and accepted values) as metadata."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=dict(doc=doc, choices=choices))
    return field(default=default, metadata=dict(doc=doc, choices=choices))


@dataclass
class TrainConfig:
    """Every setting of train_moex.py. The defaults are a small CIFAR-style run."""

    # --- data ---
    dataset: str = _f('digits', 'digits (scikit-learn, offline), cifar10, cifar100 (torchvision), imagefolder '
                                '(train/ and test/ or val/), imagenet (timm create_dataset layout)', DATASETS)
    data_dir: str = _f('data', 'folder holding the dataset (unused for digits)')
    download: bool = _f(False, 'let torchvision download CIFAR into data_dir (needs internet)')
    num_classes: Optional[int] = _f(None, 'number of classes; default: from the dataset')
    img_size: Optional[int] = _f(None, 'input size; default 32 for digits/CIFAR, else 224')
    label_noise: float = _f(0.0, 'symmetric label noise: this fraction of the training labels (a fixed draw, seed 1) '
                                 'is replaced by a uniformly drawn other class; 0 = clean labels')
    train_limit: int = _f(0, 'train on this many images only, a fixed random subset (seed 0); 0 = all')
    eval_limit: int = _f(0, 'evaluate on this many images only, a fixed random subset (seed 0); 0 = all')
    workers: int = _f(2, 'data loader worker processes per training process')
    pin_memory: bool = _f(False, 'pin host memory in the data loaders (GPU training)')
    loader: str = _f('auto', "'workers' (DataLoader worker processes, PIL transforms), 'device' (the whole "
                             "dataset on the training device, the CIFAR recipe done there in batches: "
                             "digits/CIFAR/small imagefolder; crop, flip, Cutout only) or 'auto' (device on a GPU "
                             "when the recipe allows it, else workers)", LOADERS)

    # --- augmentation ---
    aug_recipe: str = _f('auto', "train transforms: 'cifar' (RandomCrop pad 4 + flip), 'imagenet' (timm "
                                 "create_transform), 'none'; 'auto' = cifar when img_size <= 64", AUG_RECIPES)
    mean: Optional[List[float]] = _f(None, 'normalization mean; default: the dataset\'s')
    std: Optional[List[float]] = _f(None, 'normalization std; default: the dataset\'s')
    hflip: float = _f(0.5, 'horizontal flip probability')
    crop_padding: int = _f(4, 'zero padding of the CIFAR recipe\'s RandomCrop')
    auto_augment: str = _f('', "'' (off), 'cifar10' (torchvision AutoAugment CIFAR-10 policy) or a timm "
                               "policy string such as 'rand-m9-mstd0.5-inc1' or 'original'")
    cutout: int = _f(0, 'side of the one Cutout square in pixels (DeVries & Taylor: 16 on CIFAR); 0 = off')
    reprob: float = _f(0.0, 'RandomErasing probability (timm)')
    remode: str = _f('pixel', 'RandomErasing mode (timm): const, rand or pixel')
    color_jitter: Optional[float] = _f(None, 'color jitter strength (imagenet recipe)')
    crop_pct: Optional[float] = _f(None, 'eval center-crop fraction (imagenet recipe); default timm\'s')
    interpolation: str = _f('bilinear', 'resize interpolation (imagenet recipe)')

    # --- batch mixing (timm.data.Mixup; pairs sample i with sample B-1-i) ---
    mixup: float = _f(0.0, 'Mixup alpha; 0 = off')
    cutmix: float = _f(0.0, 'CutMix beta (alpha of the Beta distribution); 0 = off')
    mixup_prob: float = _f(1.0, 'probability that a batch is mixed (CutMix paper: cutmix_prob)')
    mixup_switch_prob: float = _f(0.5, 'probability of CutMix rather than Mixup when both are on')
    mixup_mode: str = _f('batch', 'Mixup mode of timm: batch, pair or elem', MIXUP_MODES)
    smoothing: float = _f(0.0, 'label smoothing')
    loss: str = _f('ce', "'ce' (timm's cross-entropy, smoothed / soft as needed) or 'bi_tempered' (Bi-Tempered "
                         "Logistic Loss, Amid et al. 2019)", LOSSES)
    bitempered_t1: float = _f(0.8, 'bi_tempered: temperature of the log (t1 < 1 bounds the loss)')
    bitempered_t2: float = _f(1.2, 'bi_tempered: temperature of the exp (t2 > 1 gives heavier tails)')
    bitempered_iters: int = _f(5, 'bi_tempered: iterations of the normalization')
    snapmix: bool = _f(False, 'SnapMix (Huang et al. 2021) through SnapMixTask; with moex, one shared pairing')
    snapmix_alpha: float = _f(5.0, 'SnapMix: Beta(alpha, alpha) of the box sizes')
    snapmix_prob: float = _f(1.0, 'SnapMix: probability that a batch is mixed')
    mix: str = _f('none', "learned mixing: 'none' or 'automix' (AutoMix, Liu et al. 2022, through AutoMixTask: a Mix "
                          "Block trained through a momentum encoder; with moex, one shared pairing)", MIX_METHODS)
    automix_alpha: float = _f(2.0, 'AutoMix: Beta(alpha, alpha) of lam')
    automix_feature_layer: str = _f('-2', "AutoMix: module whose output feeds the Mix Block, a dotted module name or "
                                          "an index into the model's feature_info written as a string ('-2': the "
                                          "stage before the last, e.g. a ResNet's layer3)")
    automix_reduction: int = _f(2, 'AutoMix: the Mix Block projects the features to channels / reduction')
    automix_lam_embed: str = _f('concat', "AutoMix: lam enters the Mix Block as an extra channel ('concat', the "
                                          "released ImageNet configs), as a scale of the features ('mul') or not "
                                          "at all ('none', the released CIFAR configs)", ('none', 'concat', 'mul'))
    automix_upsample: str = _f('nearest', 'AutoMix: upsampling of the mask to the image size', ('nearest', 'bilinear'))
    automix_momentum: float = _f(0.999, 'AutoMix: momentum of the momentum encoder at the start (rises to 1 on a '
                                        'cosine over the run)')
    automix_lam_margin: float = _f(0.08, 'AutoMix: plain Mixup for the model when lam or 1 - lam is at most this')
    automix_clean_weight: float = _f(1.0, 'AutoMix: weight of the loss on the clean images (0 = none)')
    automix_area_weight: float = _f(0.1, 'AutoMix: weight of the mask-area loss |mean(mask) - lam|')
    automix_area_margin: float = _f(0.1, 'AutoMix: margin of the mask-area loss')
    automix_area_decay: bool = _f(True, 'AutoMix: the mask-area weight decays to 0 on a cosine over the run')
    automix_lr: Optional[float] = _f(None, "AutoMix: learning rate of the Mix Block's parameter group; default the "
                                           "model's (both follow the schedule)")

    # --- MoEx ---
    moex: bool = _f(False, 'Moment Exchange on (MoExClassificationTask)')
    moex_lam: float = _f(0.5, 'weight of the sample\'s own label (paper: 0.5 CIFAR, 0.9 ImageNet)')
    moex_prob: float = _f(0.25, 'probability that a batch is moment-exchanged (paper: 0.25 CIFAR, 1.0 ImageNet)')
    moex_layer: str = _f('stem', "module whose output is exchanged: 'stem' or a dotted module name")
    moex_norm: str = _f('pono', 'normalization of the moments: pono, in, ln, gnG, gn-dD, gponoG')
    moex_eps: float = _f(1e-5, 'epsilon added to the variance')
    moex_impl: str = _f('auto', "implementation of the exchange, same results: 'auto' (fused Triton kernels for "
                                "pono and gponoG on CUDA without compile, PyTorch ops otherwise), 'triton' (the "
                                "kernels or an error) or 'torch'", MOEX_IMPLS)

    # --- model ---
    model: str = _f('resnet18', 'any timm model name (timm_moex models included)')
    pretrained: bool = _f(False, 'start from timm\'s pretrained weights')
    initial_checkpoint: str = _f('', 'start weights for fine-tuning: .safetensors, .pth / .pth.tar / .bin (state_dict, '
                                     'model or state_dict_ema inside, module. prefixes) or a run folder; a classifier '
                                     'of another class count is dropped and re-initialized')
    model_kwargs: Dict[str, Any] = _f({}, 'extra keyword arguments of timm.create_model')
    channels_last: bool = _f(False, 'channels-last memory format')
    compile: bool = _f(False, 'torch.compile the model (after the MoEx hook is attached)')
    compile_mode: str = _f('default', "torch.compile mode: 'reduce-overhead' adds CUDA graphs, for models that are "
                                      "bound by kernel launches (small batches, deep thin nets such as PyramidNet)",
                           COMPILE_MODES)
    sync_bn: bool = _f(False, 'convert BatchNorm to SyncBatchNorm (multi-process runs)')

    # --- optimization ---
    epochs: int = _f(2, 'number of epochs')
    batch_size: int = _f(64, 'batch size per process')
    eval_batch_size: Optional[int] = _f(None, 'eval batch size per process; default 2 x batch_size')
    grad_accum_steps: int = _f(1, 'gradient accumulation steps')
    opt: str = _f('sgd', "timm optimizer name ('sgd' is SGD with Nesterov momentum, 'momentum' without)")
    lr: Optional[float] = _f(None, 'learning rate; default lr_base * global batch / lr_base_size')
    lr_base: float = _f(0.1, 'base learning rate for lr_base_size images per update')
    lr_base_size: int = _f(256, 'global batch size for which lr_base holds')
    momentum: float = _f(0.9, 'optimizer momentum')
    weight_decay: float = _f(1e-4, 'weight decay')
    opt_kwargs: Dict[str, Any] = _f({}, 'extra keyword arguments of timm create_optimizer_v2')
    clip_grad: Optional[float] = _f(None, 'clip the gradient norm to this value')
    sched: str = _f('cosine', 'timm scheduler, stepped every update', SCHEDULERS)
    decay_milestones: List[int] = _f([150, 225], 'epochs at which multistep multiplies the lr by decay_rate')
    decay_epochs: float = _f(90, 'epochs between decays (step)')
    decay_rate: float = _f(0.1, 'lr decay factor (step, multistep)')
    warmup_epochs: int = _f(0, 'epochs of linear warm-up')
    warmup_lr: float = _f(1e-5, 'lr at the start of warm-up')
    min_lr: float = _f(0.0, 'lr floor (cosine, tanh, poly)')

    # --- EMA ---
    model_ema: bool = _f(False, 'keep a ModelEmaV3 copy of the weights, evaluated each epoch')
    model_ema_decay: float = _f(0.9998, 'EMA decay')
    model_ema_warmup: bool = _f(False, 'EMA decay warm-up')

    # --- run ---
    mixed_precision: Optional[str] = _f(None, "'no', 'fp16' or 'bf16'; default: accelerate launch's setting",
                                        MIXED_PRECISION)
    seed: int = _f(42, 'random seed (made process-specific by set_seed(device_specific=True))')
    output_dir: str = _f('', "run folder; default output/<config file name or model>")
    checkpoint_keep: int = _f(2, 'number of most recent checkpoint-<epoch> folders kept')
    resume: str = _f('', "'' (new run), 'auto' (latest checkpoint in output_dir) or a checkpoint folder")
    eval_only: bool = _f(False, 'only evaluate --checkpoint (a run or checkpoint folder, a .safetensors, .pth, '
                                '.pth.tar or .bin file)')
    checkpoint: str = _f('', 'weights to evaluate with eval_only')
    log_with: Optional[str] = _f(None, "experiment tracker through Accelerate: 'tensorboard' or none", TRACKERS)
    progress: bool = _f(True, 'tqdm progress bar on the main process')
    push_to_hub: str = _f('', 'at the end, publish the run folder (config.json, model.safetensors, a model card) '
                              'to this Hugging Face Hub repository, owner/name; needs a token (hf auth login)')
    debug: bool = _f(False, 'show the Python traceback of an error instead of its one-line message '
                            '(also TIMM_MOEX_DEBUG=1)')

    # Set by load_config: the YAML file the run came from (not a setting).
    config_file: Optional[str] = field(default=None, repr=False, metadata=dict(doc='the YAML file read', internal=True))

    # ------------------------------------------------------------------------------------------
    @property
    def mixing(self) -> bool:
        """Whether timm's Mixup/CutMix is on."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get('internal')}


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if not f.metadata.get('internal')}
_HINTS = typing.get_type_hints(TrainConfig)


# ---------------------------------------------------------------------------------------------
# Types
def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return f'{_type_name(inner[0])} or null'
    if origin in (list, List):
        return f'a list of {_type_name(args[0])}s'
    if origin in (dict, Dict):
        return 'a mapping'
    return {bool: 'true/false', int: 'an integer', float: 'a number', str: 'a string'}.get(tp, str(tp))


_NUMBER = re.compile(r'^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$')


def _check_type(key: str, value: Any, tp) -> Any:
    """``value`` converted to ``tp`` (ints accepted as floats), or ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        try:
            return _check_type(key, value, inner)
        except ConfigError:
            raise ConfigError(f'{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})') from None
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif origin in (list, List):
        if isinstance(value, (list, tuple)):
            return [_check_type(key, v, args[0]) for v in value]
    elif origin in (dict, Dict):
        ok = isinstance(value, dict)
    if not ok:
        raise ConfigError(f'{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})')
    return value


def _unknown_key(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(_FIELDS), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
        '; run train_moex.py --help for the list of keys'
    return ConfigError(f'unknown config key {key!r} ({source}){hint}')


# ---------------------------------------------------------------------------------------------
# Loading
def _parse_argv(argv: Sequence[str]) -> (Optional[str], Dict[str, Any]):
    """(config file, overrides) from ``--config F --key value --flag --key=value ...``."""
    config_file, overrides = None, {}
    i, argv = 0, list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith('--') or arg == '--':
            raise ConfigError(f'unexpected command-line argument {arg!r}: use --key value (see --help)')
        key, eq, raw = arg[2:].partition('=')
        key = key.replace('-', '_')
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith('--'):
                raw, i = argv[i + 1], i + 1
            elif key in _FIELDS and _HINTS[key] is bool:
                raw = 'true'
            elif key == 'config':
                raise ConfigError('--config needs a YAML file')
            else:
                raise ConfigError(f'--{key.replace("_", "-")} needs a value')
        i += 1
        if key == 'config':
            config_file = raw
            continue
        if key not in _FIELDS:
            raise _unknown_key(key, 'command line')
        try:
            value = yaml.safe_load(raw) if raw != '' else ''
        except yaml.YAMLError:
            value = raw
        if _HINTS[key] in (str, Optional[str]) and value is not None and not isinstance(value, str):
            value = raw  # '--output-dir 123' means the string '123'
        overrides[key] = value
    return config_file, overrides


def _read_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f'config: no such file {path!r}')
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f'config: {path!r} is not valid YAML: {e}') from None
    if not isinstance(data, dict):
        raise ConfigError(f'config: {path!r} must hold a mapping of keys to values, got {type(data).__name__}')
    for key in data:
        if key not in _FIELDS:
            raise _unknown_key(str(key), path)
    return data


def config_help() -> str:
    lines = ['usage: train_moex.py [--config FILE.yaml] [--key value ...]', '', 'keys (default):']
    for name, f in _FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get('choices')
        extra = f' [{", ".join(choices)}]' if choices else ''
        lines.append(f'  --{name.replace("_", "-"):<22} {f.metadata["doc"]}{extra} ({default!r})')
    return '\n'.join(lines)


def load_config(argv: Optional[Sequence[str]] = None, check_paths: bool = True) -> TrainConfig:
    """Read YAML + command line into a validated TrainConfig (the command line wins)."""
    argv = sys.argv[1:] if argv is None else argv
    config_file, overrides = _parse_argv(argv)
    values = _read_yaml(config_file) if config_file else {}
    values.update(overrides)
    cfg = TrainConfig(**{k: _check_type(k, v, _HINTS[k]) for k, v in values.items()})
    cfg.config_file = config_file
    validate_config(cfg, check_paths=check_paths)
    return cfg


# ---------------------------------------------------------------------------------------------
# Values
def _unit(cfg: TrainConfig, *keys: str) -> None:
    for key in keys:
        v = getattr(cfg, key)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f'{key}: must be in [0, 1], got {v!r}')


def _positive(cfg: TrainConfig, *keys: str, zero_ok: bool = False) -> None:
    for key in keys:
        v = getattr(cfg, key)
        if v is not None and (v < 0 or (v == 0 and not zero_ok)):
            raise ConfigError(f'{key}: must be {"non-negative" if zero_ok else "positive"}, got {v!r}')


def validate_config(cfg: TrainConfig, check_paths: bool = True) -> TrainConfig:
    """Check every value (types too, for a TrainConfig built by hand); raises ConfigError."""
    for key in _FIELDS:
        setattr(cfg, key, _check_type(key, getattr(cfg, key), _HINTS[key]))
        choices = _FIELDS[key].metadata.get('choices')
        value = getattr(cfg, key)
        if choices and value is not None and value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f' (did you mean {close[0]!r}?)' if close else ''
            raise ConfigError(f'{key}: {value!r} is not one of {", ".join(choices)}{hint}')

    _unit(cfg, 'label_noise', 'snapmix_prob', 'moex_lam', 'moex_prob', 'mixup_prob', 'mixup_switch_prob', 'smoothing', 'reprob', 'hflip')
    _positive(cfg, 'epochs', 'batch_size', 'eval_batch_size', 'grad_accum_steps', 'lr_base_size', 'checkpoint_keep',
              'num_classes', 'img_size')
    _positive(cfg, 'lr', 'lr_base', 'weight_decay', 'momentum', 'mixup', 'cutmix', 'cutout', 'workers',
              'crop_padding', 'train_limit', 'eval_limit', 'warmup_epochs', 'warmup_lr', 'min_lr', 'model_ema_decay', 'moex_eps', zero_ok=True)
    if cfg.loss == 'bi_tempered':
        from .bitempered import BiTemperedLogisticLoss
        try:
            BiTemperedLogisticLoss(cfg.bitempered_t1, cfg.bitempered_t2, num_iters=cfg.bitempered_iters)
        except ValueError as e:
            raise ConfigError(f'bitempered_t1/t2/iters: {e}') from None
    if cfg.snapmix and not cfg.snapmix_alpha > 0:
        raise ConfigError(f'snapmix_alpha: must be positive, got {cfg.snapmix_alpha!r}')
    if cfg.snapmix and cfg.mixing:
        raise ConfigError(f'snapmix: SnapMix does its own mixing; turn mixup/cutmix off (mixup={cfg.mixup}, '
                          f'cutmix={cfg.cutmix})')
    if cfg.mix == 'automix':
        if cfg.mixing or cfg.snapmix:
            raise ConfigError(f'mix: AutoMix does its own mixing; turn mixup/cutmix/snapmix off (mixup={cfg.mixup}, '
                              f'cutmix={cfg.cutmix}, snapmix={cfg.snapmix})')
        if not cfg.automix_alpha > 0:
            raise ConfigError(f'automix_alpha: must be positive, got {cfg.automix_alpha!r}')
        if not 0 <= cfg.automix_lam_margin < 0.5:
            raise ConfigError(f'automix_lam_margin: must be in [0, 0.5), got {cfg.automix_lam_margin!r}')
        if cfg.automix_reduction < 1:
            raise ConfigError(f'automix_reduction: must be a positive integer, got {cfg.automix_reduction!r}')
        _unit(cfg, 'automix_momentum', 'automix_area_margin')
        _positive(cfg, 'automix_clean_weight', 'automix_area_weight', 'automix_lr', zero_ok=True)
    if cfg.mixing and cfg.batch_size % 2:
        raise ConfigError(f'batch_size: {cfg.batch_size} is odd, but Mixup/CutMix (mixup={cfg.mixup}, '
                          f'cutmix={cfg.cutmix}) pairs sample i with sample B-1-i and needs an even batch size')
    if cfg.mean is not None and len(cfg.mean) != 3 or cfg.std is not None and len(cfg.std) != 3:
        raise ConfigError(f'mean/std: need 3 values (RGB), got mean={cfg.mean!r} std={cfg.std!r}')
    if cfg.std is not None and min(cfg.std) <= 0:
        raise ConfigError(f'std: every value must be positive, got {cfg.std!r}')
    if cfg.remode not in ('const', 'rand', 'pixel'):
        raise ConfigError(f"remode: {cfg.remode!r} is not one of const, rand, pixel")
    if cfg.model_ema and not cfg.model_ema_decay < 1:
        raise ConfigError(f'model_ema_decay: must be in [0, 1), got {cfg.model_ema_decay!r}')

    import timm
    import timm_moex  # noqa: F401  (registers this package's models)
    from timm.optim import list_optimizers
    if not timm.is_model(cfg.model):
        close = difflib.get_close_matches(cfg.model, timm.list_models(), n=3, cutoff=0.7)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
            " (timm.list_models() lists the known names)"
        raise ConfigError(f'model: timm does not know {cfg.model!r}{hint}')
    if cfg.opt.lower().split('_')[-1] not in list_optimizers():
        close = difflib.get_close_matches(cfg.opt, list_optimizers(), n=3)
        raise ConfigError(f'opt: {cfg.opt!r} is not a timm optimizer; close names: {close} '
                          '(timm.optim.list_optimizers())')
    if cfg.moex:
        try:
            timm_moex.moex.parse_norm(cfg.moex_norm)
        except ValueError as e:
            raise ConfigError(f'moex_norm: {e}') from None
    if cfg.moex_impl == 'triton' and cfg.compile:
        raise ConfigError("moex_impl: 'triton' cannot run under compile: true (torch.compile traces the PyTorch ops "
                          "and fuses them itself); use 'auto'")
    _check_model_build(cfg)
    if cfg.auto_augment and cfg.auto_augment != 'cifar10':
        from timm.data.auto_augment import auto_augment_transform, augment_and_mix_transform, \
            rand_augment_transform
        factories = dict(rand=rand_augment_transform, augmix=augment_and_mix_transform)
        factory = factories.get(cfg.auto_augment.split('-')[0], auto_augment_transform)
        try:
            factory(cfg.auto_augment, {})
        except Exception as e:  # noqa: BLE001  timm raises assorted errors for a bad policy string
            raise ConfigError(f"auto_augment: {cfg.auto_augment!r} is not a timm policy string "
                              f"('rand-m9-mstd0.5', 'original', 'v0', 'augmix-m5') nor 'cifar10': {e}") from None
    if cfg.loader == 'device':
        reason = device_loader_unsupported(cfg)
        if reason:
            raise ConfigError(f"loader: 'device' {reason}; use loader: workers (or auto)")
    if cfg.log_with == 'tensorboard':
        import importlib.util
        if not (importlib.util.find_spec('tensorboard') or importlib.util.find_spec('tensorboardX')):
            raise ConfigError("log_with: 'tensorboard' needs the tensorboard package (pip install tensorboard)")
    if cfg.dataset == 'digits':
        import importlib.util
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
    from .data import check_data_dir
    check_data_dir(cfg)
    out = Path(resolve_output_dir(cfg))
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f'output_dir: {str(parent)!r} is a file, not a folder, so {str(out)!r} cannot be '
                                  'created; pass another --output-dir')
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
    try:
        import huggingface_hub
    except ImportError:
        raise ConfigError('push_to_hub: needs the huggingface_hub package (pip install huggingface_hub)') from None
    if not huggingface_hub.get_token():
        raise ConfigError(f'push_to_hub: no Hugging Face token to publish {repo_id!r} with; log in first '
                          '(hf auth login) or set HF_TOKEN')


def _check_model_build(cfg: TrainConfig) -> None:
    """Build the model on the meta device (no memory, no weights) to check model_kwargs and moex_layer."""
    import timm
    import torch
    from timm_moex import get_moex_hook, resolve_moex_layer
    try:
        with torch.device('meta'):
            model = timm.create_model(cfg.model, num_classes=cfg.num_classes or 10, **cfg.model_kwargs)
    except TypeError as e:
        raise ConfigError(f'model_kwargs: {cfg.model_kwargs!r} are not accepted by {cfg.model!r}: {e}') from None
    except Exception:  # noqa: BLE001  a model that cannot be built on 'meta': checked when it is built
        return
    if cfg.snapmix:
        from .snapmix import cam_classifier
        try:
            cam_classifier(model)
        except ValueError as e:
            raise ConfigError(f'snapmix: {e}') from None
    if cfg.mix == 'automix':
        from .automix import parse_feature_layer, resolve_feature_layer
        try:
            resolve_feature_layer(model, parse_feature_layer(cfg.automix_feature_layer))
        except ValueError as e:
            raise ConfigError(f'automix_feature_layer: {e}') from None
    if cfg.moex and get_moex_hook(model) is None:
        try:
            resolve_moex_layer(model, cfg.moex_layer)
        except ValueError as e:
            raise ConfigError(f'moex_layer: {e}') from None


def device_loader_unsupported(cfg: TrainConfig) -> str:
    """Why the settings need the worker loader ('' when the device loader can do them)."""
    if cfg.dataset == 'imagenet':
        return "does not hold ImageNet-size datasets (dataset: imagenet)"
    from .data import resolve_data_defaults
    img_size, _, _, recipe = resolve_data_defaults(cfg)
    if img_size > 64:
        return f'is for images of at most 64 px, not img_size={img_size}'
    if recipe not in ('cifar', 'none'):
        return f'does the cifar recipe only, not aug_recipe={recipe!r}'
    if cfg.auto_augment:
        return f'has no AutoAugment / RandAugment (auto_augment={cfg.auto_augment!r})'
    if cfg.reprob > 0:
        return f'has no RandomErasing (reprob={cfg.reprob})'
    return ''


def resolve_output_dir(cfg: TrainConfig) -> str:
    if cfg.output_dir:
        return cfg.output_dir
    name = Path(cfg.config_file).stem if cfg.config_file else cfg.model
    return os.path.join('output', name)


# ---------------------------------------------------------------------------------------------
# Resuming: the run folder's config.yaml is the run's identity
RESUME_MAY_CHANGE = frozenset({
    # length, lr and schedule: the scheduler is rebuilt for them from the restored update count
    'epochs', 'lr', 'lr_base', 'lr_base_size', 'sched', 'decay_milestones', 'decay_epochs', 'decay_rate',
    'warmup_epochs', 'warmup_lr', 'min_lr', 'clip_grad',
    # how the same computation is run, evaluated, logged and kept
    'workers', 'pin_memory', 'loader', 'data_dir', 'download', 'eval_batch_size', 'eval_limit', 'channels_last',
    'compile', 'compile_mode', 'moex_impl', 'checkpoint_keep', 'log_with', 'progress', 'push_to_hub',
})
"""Keys that ``--resume`` may change; they take effect from the resumed epoch on. Every other key shapes
the model, the data or the optimizer state and must equal the run folder's config.yaml."""
_NOT_COMPARED = frozenset({'output_dir', 'resume', 'eval_only', 'checkpoint', 'debug'})


def read_run_config(path: os.PathLike) -> Dict[str, Any]:
    """A run folder's config.yaml as {key: value}, values type-checked, keys it lacks (an older run)
    at their defaults; keys this version does not know are dropped.

    Raises:
        ConfigError: the file is not a YAML mapping.
    """
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f'resume: {str(path)!r} is not valid YAML: {e}') from None
    if not isinstance(data, dict):
        raise ConfigError(f'resume: {str(path)!r} must hold a mapping of keys to values')
    values = {}
    for key, f in _FIELDS.items():
        value = data[key] if key in data else (f.default if f.default is not dataclasses.MISSING
                                               else f.default_factory())
        try:
            values[key] = _check_type(key, value, _HINTS[key])
        except ConfigError:
            values[key] = value
    return values


def resume_differences(saved: Dict[str, Any], cfg: TrainConfig) -> (Dict[str, tuple], Dict[str, tuple]):
    """(allowed changes, conflicts) of ``cfg`` against a run's saved configuration, each {key: (saved, now)}.

    Allowed changes are the keys of :data:`RESUME_MAY_CHANGE`; conflicts are every other differing key.
    """
    changes, conflicts = {}, {}
    now = cfg.to_dict()
    for key in _FIELDS:
        if key in _NOT_COMPARED or saved.get(key) == now[key]:
            continue
        (changes if key in RESUME_MAY_CHANGE else conflicts)[key] = (saved.get(key), now[key])
    return changes, conflicts


# ---------------------------------------------------------------------------------------------
# Writing
def atomic_write_text(path: os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_config(cfg: TrainConfig, path: os.PathLike) -> None:
    """The effective configuration as YAML (loadable with --config)."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
