"""The training configuration: one typed dataclass, read from YAML plus command-line overrides.

:func:`parse_config` reads ``--config FILE.yaml`` (a path, or the name of a recipe shipped in
``hparams/``), applies every ``--key value`` override on top (the command line wins) and
type-checks each value; :func:`check_values` checks the values and their combinations. Both
raise :class:`~timm_moex.train.errors.ConfigError` naming the key, the value and what is
accepted. ``timm_moex.train.validate.load_config`` adds the checks against the environment::

    python train_moex.py --config hparams/quickstart.yaml --lr 0.05 --moex false
    moex-train --config cifar100_pyramidnet200_moex

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
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..hooks.style import MIXSTYLE_MIXES
from ..loss.bitempered import BiTemperedLogisticLoss
from ..ops.moex import MOEX_IMPLS
from ..task.moex_mixing import MOEX_RECIPES
from .corruptions import SEVERITIES, parse_corruptions
from .errors import ConfigError, first_line
from .files import atomic_write_text

__all__ = ['TrainConfig', 'parse_config', 'check_values', 'save_config', 'config_help', 'recipe_names',
           'resolve_config_file', 'RECIPE_FOLDERS', 'resolve_output_dir', 'RESUME_MAY_CHANGE', 'read_run_config', 'resume_differences']

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
COMPILE_BACKENDS = ('inductor', 'cudagraphs', 'eager')


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
    # The paper's CIFAR recipe (timm_moex.MOEX_RECIPES), as the defaults here are a CIFAR-size run.
    moex_lam: float = _f(MOEX_RECIPES['cifar']['lam'], 'weight of the sample\'s own label (paper: 0.5 CIFAR, 0.9 '
                                                       'ImageNet)')
    moex_prob: float = _f(MOEX_RECIPES['cifar']['prob'], 'probability that a batch is moment-exchanged (paper: 0.25 '
                                                         'CIFAR, 1.0 ImageNet)')
    moex_layer: str = _f('stem', "module whose output is exchanged: 'stem' or a dotted module name")
    moex_norm: str = _f('pono', 'normalization of the moments: pono, in, ln, gnG, gn-dD, gponoG')
    moex_eps: float = _f(1e-5, 'epsilon added to the variance')
    moex_impl: str = _f('auto', "implementation of the exchange, same results: 'auto' (fused Triton kernels for "
                                "pono and gponoG on CUDA without compile, PyTorch ops otherwise), 'triton' (the "
                                "kernels or an error) or 'torch'", MOEX_IMPLS)

    # --- MixStyle / DSU: feature moments of other samples or noisy ones, the label kept (composable with MoEx) ---
    mixstyle: bool = _f(False, 'MixStyle (Zhou et al. 2021): mix the instance-norm moments of random pairs')
    mixstyle_layers: Optional[List[str]] = _f(None, 'modules whose outputs MixStyle changes; default: the first two '
                                                    'stages')
    mixstyle_p: float = _f(0.5, 'MixStyle: probability per batch and layer')
    mixstyle_alpha: float = _f(0.1, 'MixStyle: Beta(alpha, alpha) of the mixing weight')
    mixstyle_mix: str = _f('random', "MixStyle pairing: 'random', or 'crossdomain' (without domain labels, the two "
                                     "halves of each batch)", MIXSTYLE_MIXES)
    dsu: bool = _f(False, 'DSU (Li et al. 2022): perturb the instance-norm moments by their spread over the batch')
    dsu_layers: Optional[List[str]] = _f(None, 'modules whose outputs DSU changes; default: the first convolution, '
                                               'the stem and every stage')
    dsu_p: float = _f(0.5, 'DSU: probability per batch and layer')

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
    compile_backend: str = _f('inductor', "torch.compile backend: 'inductor' generates fused kernels (minutes to "
                                          "compile a deep net whose blocks all differ, such as PyramidNet-200); "
                                          "'cudagraphs' replays dynamo's graph as CUDA graphs without generating "
                                          "code (seconds to compile; removes the launch overhead; CUDA only); "
                                          "'eager' runs the traced graph as it is (debugging)", COMPILE_BACKENDS)
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

    # --- corruption robustness (after training, and with eval_only) ---
    eval_corruptions: str = _f('none', "top-1 error on CIFAR-10-C-style corrupted copies of the eval set "
                                       "(Hendrycks & Dietterich 2019): 'none', 'all' (the 14 benchmark corruptions "
                                       "computed here, frost left out) or names separated by commas, e.g. "
                                       "'gaussian_noise,fog' (timm_moex.train.corruptions); written to results.json, "
                                       "corruptions.csv and corruptions.png")
    eval_corruptions_severities: List[int] = _f([1, 2, 3, 4, 5], 'eval_corruptions: the severities (1-5) evaluated')
    eval_corruptions_limit: int = _f(0, 'eval_corruptions: use a fixed random subset (seed 0) of this many eval '
                                        'images; 0 = all (the 14 corruptions take about 10 ms of one CPU core per '
                                        'image and severity)')

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
                            '(also TIMM_MOEX_DEBUG=1, which shows it for an error in the YAML or the command line '
                            'too)')

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
        return 'a list of ' + {bool: 'true/false values', int: 'integers', float: 'numbers', str: 'strings'}.get(
            args[0], str(args[0]))
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
            raise ConfigError(f'{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})'
                              f'{_list_hint(inner, value)}') from None
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
        raise ConfigError(f'{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})'
                          f'{_list_hint(tp, value)}')
    return value


def _list_hint(tp, value: Any) -> str:
    """How to write the list that a list key got as one value ('1,5' from ``--eval-corruptions-severities 1,5``)."""
    if typing.get_origin(tp) not in (list, List) or isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return ''
    items = str(value).strip().strip('[]()').replace(' ', '')
    return f'; write a list in brackets: [{items}]'


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


# The recipes: hparams/ of a checkout, or its copy inside the package when installed from a wheel.
RECIPE_FOLDERS = (Path(__file__).resolve().parents[1] / 'hparams', Path(__file__).resolve().parents[2] / 'hparams')


def recipe_names() -> List[str]:
    """The names of the shipped recipes (``hparams/*.yaml`` without the suffix), sorted."""
    return sorted({p.stem for folder in RECIPE_FOLDERS if folder.is_dir() for p in folder.glob('*.yaml')})


def resolve_config_file(config: str) -> str:
    """The YAML file that ``--config`` names: a path, or the name of a shipped recipe.

    Args:
        config: A path (``hparams/quickstart.yaml``) or a recipe name (``quickstart``, ``quickstart.yaml``).

    Returns:
        The path of the file to read.

    Raises:
        ConfigError: Neither a file nor a recipe name.
    """
    if os.path.isfile(config):
        return config
    if os.path.isdir(config):
        inside = os.path.join(config, 'config.yaml')  # a run folder's effective configuration
        hint = f' (such as {inside!r})' if os.path.isfile(inside) else ''
        raise ConfigError(f'config: {config!r} is a folder, not a YAML file; give a YAML file{hint} or a recipe name: '
                          f'{", ".join(recipe_names())}')
    if os.sep not in config and '/' not in config:
        name = config if config.endswith(('.yaml', '.yml')) else f'{config}.yaml'
        for folder in RECIPE_FOLDERS:
            if (folder / name).is_file():
                return str(folder / name)
    close = difflib.get_close_matches(Path(config).stem, recipe_names(), n=1)
    hint = f' (did you mean the recipe {close[0]!r}?)' if close else ''
    raise ConfigError(f'config: no such file {config!r}{hint}; give a YAML path or a recipe name: '
                      f'{", ".join(recipe_names())}')


def _load_yaml(path: os.PathLike, key: str) -> Any:
    """The YAML document in ``path``, or a one-line ConfigError of ``key`` naming the file and where it is wrong."""
    try:
        raw = Path(path).read_bytes()  # bytes: PyYAML detects the encoding and reports a binary file itself
    except OSError as e:
        raise ConfigError(f'{key}: {str(path)!r} cannot be read ({e.strerror or e})') from None
    try:
        return yaml.safe_load(raw)
    except yaml.reader.ReaderError as e:
        raise ConfigError(f'{key}: {str(path)!r} is not a text file ({first_line(e)}, position {e.position})') from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f'line {mark.line + 1}, column {mark.column + 1}: ' if mark is not None else ''
        raise ConfigError(f'{key}: {str(path)!r} is not valid YAML ({where}{e.problem or e.context})') from None
    except yaml.YAMLError as e:
        raise ConfigError(f'{key}: {str(path)!r} is not valid YAML ({first_line(e)})') from None


def _read_yaml(path: str) -> Dict[str, Any]:
    data = _load_yaml(path, 'config') or {}
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


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Read YAML + command line into a type-checked TrainConfig (the command line wins).

    Args:
        argv: The command line without the program name (default ``sys.argv[1:]``).

    Returns:
        The configuration; :func:`check_values` has not run on it yet.
    """
    argv = sys.argv[1:] if argv is None else argv
    config_file, overrides = _parse_argv(argv)
    config_file = resolve_config_file(config_file) if config_file else None
    values = _read_yaml(config_file) if config_file else {}
    values.update(overrides)
    cfg = TrainConfig(**{k: _check_type(k, v, _HINTS[k]) for k, v in values.items()})
    cfg.config_file = config_file
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


def check_values(cfg: TrainConfig) -> TrainConfig:
    """Check every value and combination of values (types too, for a TrainConfig built by hand).

    Args:
        cfg: The configuration.

    Returns:
        ``cfg``, its values converted where a type allows it (``'1e-3'`` to 0.001).

    Raises:
        ConfigError: The first value that cannot be used.
    """
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
    _unit(cfg, 'mixstyle_p', 'dsu_p')
    if cfg.mixstyle and not 0 < cfg.mixstyle_alpha < math.inf:
        raise ConfigError(f'mixstyle_alpha: must be a positive number, got {cfg.mixstyle_alpha!r}')
    if cfg.mixstyle and cfg.mixstyle_mix == 'crossdomain' and cfg.batch_size % 2:
        raise ConfigError(f"batch_size: {cfg.batch_size} is odd, but mixstyle_mix: crossdomain pairs the two halves of "
                          'each batch and needs an even batch size')
    for key in ('mixstyle_layers', 'dsu_layers'):
        if getattr(cfg, key) is not None and not getattr(cfg, key):
            raise ConfigError(f'{key}: give at least one module name, or leave it out for the default layers')
    _check_corruptions(cfg)
    return cfg


def _check_corruptions(cfg: TrainConfig) -> None:
    """The eval_corruptions* keys: known names, severities 1-5 (the image size: validate.py)."""
    try:
        parse_corruptions(cfg.eval_corruptions)
    except ValueError as e:
        raise ConfigError(f'eval_corruptions: {e}') from None
    severities = cfg.eval_corruptions_severities
    if not severities or any(s not in SEVERITIES for s in severities) or len(set(severities)) < len(severities):
        raise ConfigError(f'eval_corruptions_severities: must list distinct severities of 1-5, got {severities!r}')
    _positive(cfg, 'eval_corruptions_limit', zero_ok=True)


def resolve_output_dir(cfg: TrainConfig) -> str:
    """The run folder: ``cfg.output_dir``, or ``output/<config file name without .yaml, else model name>``.

    Args:
        cfg: The run's configuration.

    Returns:
        The folder's path; it is not created.
    """
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
    'compile', 'compile_mode', 'compile_backend', 'moex_impl', 'checkpoint_keep', 'log_with', 'progress', 'push_to_hub',
    'eval_corruptions', 'eval_corruptions_severities', 'eval_corruptions_limit',
})
"""Keys that ``--resume`` may change; they take effect from the resumed epoch on. Every other key shapes
the model, the data or the optimizer state and must equal the run folder's config.yaml."""
_NOT_COMPARED = frozenset({'output_dir', 'resume', 'eval_only', 'checkpoint', 'debug'})


def read_run_config(path: os.PathLike) -> Dict[str, Any]:
    """A run folder's config.yaml as {key: value}, values type-checked.

    The file holds every key of :class:`TrainConfig` (:func:`save_config` writes them all). A value
    that fails its key's type check is kept as written (the resume reports it as a difference).

    Args:
        path: The config.yaml.

    Returns:
        {key: value} for every key of :class:`TrainConfig`.

    Raises:
        ConfigError: the file is empty, not valid YAML, not a mapping (a damaged run folder), or its keys are
            not this version's.
    """
    todo = ('the run folder is damaged: restore the file (the YAML the run was started with, plus its command-line '
            'options) or start a new run in another --output-dir')
    try:
        data = _load_yaml(path, 'resume')
    except ConfigError as e:
        raise ConfigError(f'{e}; {todo}') from None
    if not isinstance(data, dict) or not data:  # read as defaults, it would resume another run's settings
        found = 'is empty' if data is None or data == {} else f'holds a {type(data).__name__}, not the run\'s settings'
        raise ConfigError(f'resume: {str(path)!r} {found}; {todo}')
    missing, unknown = [k for k in _FIELDS if k not in data], [str(k) for k in data if k not in _FIELDS]
    if missing or unknown:
        found = '; '.join(f'{what} {", ".join(keys)}'
                          for what, keys in (('lacks', missing), ('has unknown keys', unknown)) if keys)
        raise ConfigError(f'resume: {str(path)!r} {found}: another version of train_moex.py wrote it; resume it with '
                          'that version, or start a new run in another --output-dir')
    values = {}
    for key in _FIELDS:
        try:
            values[key] = _check_type(key, data[key], _HINTS[key])
        except ConfigError:
            values[key] = data[key]
    return values


def resume_differences(saved: Dict[str, Any], cfg: TrainConfig) -> (Dict[str, tuple], Dict[str, tuple]):
    """(allowed changes, conflicts) of ``cfg`` against a run's saved configuration, each {key: (saved, now)}.

    Allowed changes are the keys of :data:`RESUME_MAY_CHANGE`; conflicts are every other differing key.
    Keys that name this invocation only (output_dir, resume, eval_only, checkpoint, debug) are not compared.

    Args:
        saved: The run's configuration, from :func:`read_run_config`.
        cfg: The configuration of this invocation.

    Returns:
        (allowed changes, conflicts); both empty when nothing differs.
    """
    changes, conflicts = {}, {}
    now = cfg.to_dict()
    for key in _FIELDS:
        if key in _NOT_COMPARED or saved.get(key) == now[key]:
            continue
        (changes if key in RESUME_MAY_CHANGE else conflicts)[key] = (saved.get(key), now[key])
    return changes, conflicts


def save_config(cfg: TrainConfig, path: os.PathLike) -> None:
    """Write the effective configuration as YAML (loadable with --config), atomically.

    Args:
        cfg: The configuration.
        path: The file to write or replace.
    """
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
