"""Run timm's own ``train.py`` with Moment Exchange.

timm's training script (``train.py`` of a timm checkout) builds its training task in one place,
``task = ClassificationTask(model=..., criterion=..., device=..., dtype=..., verbose=...)``.
This entry point loads that file, unmodified, as a module and, in that module's namespace only,
puts a factory of :class:`~timm_moex.task.moex.MoExClassificationTask` in place of
``ClassificationTask``; then it calls the script's ``main()``. Every timm flag keeps working; the
MoEx settings are options of their own, taken out of the command line before timm's parser sees
it::

    moex-timm-train --timm-train pytorch-image-models/train.py --moex-prob 1.0 --moex-lam 0.9 \\
        --data-dir /data/imagenet --model resnet50 --sched cosine --epochs 300 --amp

- The defaults are the paper's ImageNet recipe (``timm_moex.MOEX_RECIPES['imagenet']``: every
  batch, lam 0.9, PONO at the stem), since timm's train.py is an ImageNet training script; the
  library's and ``moex-train``'s defaults are its CIFAR recipe.
- The hook is attached to the model train.py created when the task is built, which is after the
  model is moved to its device (and converted to SyncBatchNorm / split BN when asked) and before
  ``torch.compile`` and the DDP wrap: the module that runs carries it. A ``*_moex`` model's own
  hook is attached again there with the ``--moex-*`` settings when they differ from its own.
- Before train.py builds anything, what can be checked is: unknown ``--moex-*`` options and
  ``moex_*`` YAML keys (with the closest names), the model name (timm's registry), the MoEx layer
  (in the model built on the meta device) and a folder dataset's ``--data-dir``. Each error is one
  line and an exit code (2 configuration, 7 data), as for ``moex-train``.
- ``--help`` lists the ``--moex-*`` options, then train.py's own when train.py is found
  (``--timm-train PATH``, else ``$TIMM_TRAIN_PY``).
- With ``--mixup`` / ``--cutmix`` (``Mixup`` or the prefetcher's ``FastCollateMixup``, both of
  which pair sample i with sample B-1-i), MoEx uses that same pairing ('flip'), as train_moex.py
  does, and the loss is the paper's CutMix + MoEx loss; otherwise a random permutation.
- The MoEx settings can also be keys of timm's ``--config`` YAML (``moex_prob: 1.0``); the
  command line wins. They are added to the run's ``args.yaml`` and checkpoint ``args``.
- The number of training batches that were moment-exchanged is logged at the end and written,
  with the settings read back from the hook that ran, to ``moex.json`` in timm's output folder.
"""
import argparse
import contextlib
import difflib
import importlib
import json
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import yaml
from timm.models import parse_model_name

from ..hooks.layers import resolve_moex_layer
from ..hooks.moex import MoExHook, attach_moex, reattach_moex
from ..ops.moex import MOEX_IMPLS, parse_norm
from ..task.moex import MoExClassificationTask
from ..task.moex_mixing import MOEX_RECIPES, MoExMixing
from .errors import ConfigError, DataError, UserError, describe
from .files import atomic_write_text

__all__ = ['main', 'cli', 'load_timm_train', 'hook_running_model', 'MOEX_DEFAULTS', 'TIMM_TRAIN_ENV']

TIMM_TRAIN_ENV = 'TIMM_TRAIN_PY'  # the path of timm's train.py when --timm-train is not given

# The MoEx settings and their defaults: the paper's ImageNet recipe (PONO at the stem, every batch, lam 0.9).
MOEX_DEFAULTS: Dict[str, Any] = dict(
    moex_prob=MOEX_RECIPES['imagenet']['prob'], moex_lam=MOEX_RECIPES['imagenet']['lam'], moex_norm='pono',
    moex_layer='stem', moex_eps=1e-5, moex_impl='auto')

_logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='moex-timm-train', add_help=False, allow_abbrev=False,
        description="timm's train.py with Moment Exchange: the options below are this command's (also keys of "
                    "train.py's --config YAML, the command line wins); every other option goes to train.py. -h, "
                    "--help shows these, then train.py's own options.")
    p.add_argument('--timm-train', metavar='PATH',
                   help=f"timm's train.py, i.e. pytorch-image-models/train.py (default: the environment variable "
                        f"{TIMM_TRAIN_ENV})")
    d = MOEX_DEFAULTS
    p.add_argument('--moex-prob', type=float,
                   help=f"probability that a batch is moment-exchanged (default {d['moex_prob']:g})")
    p.add_argument('--moex-lam', type=float, help=f"weight of the sample's own label (default {d['moex_lam']:g})")
    p.add_argument('--moex-norm', help=f"normalization of the moments: pono, in, ln, gnG, gn-dD, gponoG (default "
                                       f"{d['moex_norm']})")
    p.add_argument('--moex-layer', help=f"module whose output is exchanged: 'stem' or a dotted name (default "
                                        f"{d['moex_layer']})")
    p.add_argument('--moex-eps', type=float, help=f"epsilon added to the variance (default {d['moex_eps']:g})")
    p.add_argument('--moex-impl', help=f"implementation of the exchange, same results: {', '.join(MOEX_IMPLS)} "
                                       f"(default {d['moex_impl']})")
    p.add_argument('--moex-help', action='store_true', help='show these options and exit')
    return p


def split_argv(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    """Take this command's options out of a command line.

    Args:
        argv: The whole command line, without the program name.

    Returns:
        (this command's options, the arguments left for timm's train.py, in their order).

    Raises:
        ConfigError: One of this command's options has a bad value (argparse printed its usage line), or a
            ``--moex-*`` option does not exist.
    """
    parser = _parser()
    try:
        ours, rest = parser.parse_known_args(list(argv))
    except SystemExit:  # argparse printed its usage line already
        raise ConfigError('moex options: see moex-timm-train --moex-help') from None
    for arg in rest:  # train.py would refuse them with its whole usage text; '--moex_prob' and typos land here
        if arg.startswith('--moex'):
            raise _unknown_moex_key(arg.partition('=')[0], 'command line')
    return ours, rest


def _unknown_moex_key(key: str, source: str) -> ConfigError:
    """One line for a MoEx option or YAML key that does not exist, with the closest ones."""
    option = key.startswith('-')
    known = [*MOEX_DEFAULTS, 'moex_help'] if option else list(MOEX_DEFAULTS)
    spell = (lambda k: '--' + k.replace('_', '-')) if option else (lambda k: k)
    close = difflib.get_close_matches(key.lstrip('-').replace('-', '_'), known, n=2, cutoff=0.8)
    hint = f"did you mean {' or '.join(repr(spell(c)) for c in close)}?" if close else \
        f"the MoEx settings are {', '.join(spell(k) for k in known)}"
    return ConfigError(f'unknown MoEx {"option" if option else "key"} {key!r} ({source}); {hint}')


def load_timm_train(path: os.PathLike) -> types.ModuleType:
    """timm's train.py as a module (not ``__main__``, so its ``main()`` does not run), written nowhere.

    The source is compiled in memory: no ``__pycache__`` is written beside it, which may be read-only.

    Args:
        path: timm's train.py.

    Returns:
        The executed module, with its ``main``, ``_parse_args`` and ``ClassificationTask``.

    Raises:
        ConfigError: The file is missing, is not Python, or is not timm's train.py.
    """
    path = Path(path)
    if path.is_dir():
        inside = ' (it holds a train.py: pass that file)' if (path / 'train.py').is_file() else ''
        raise ConfigError(f"timm_train: {str(path)!r} is a folder{inside}; pass --timm-train PATH/TO/"
                          f"pytorch-image-models/train.py (or set {TIMM_TRAIN_ENV})")
    if not path.is_file():
        raise ConfigError(f"timm_train: no such file {str(path)!r}; pass --timm-train PATH/TO/pytorch-image-models/"
                          f"train.py (or set {TIMM_TRAIN_ENV})")
    module = types.ModuleType('timm_train_script')
    module.__file__ = str(path.resolve())
    try:
        code = compile(path.read_bytes(), module.__file__, 'exec', dont_inherit=True)
        exec(code, module.__dict__)
    except (Exception, SystemExit) as e:  # noqa: BLE001  anything a foreign file raises on import, sys.exit too
        raise ConfigError(f"timm_train: cannot load {str(path)!r} ({describe(e)}); it must be timm's train.py") \
            from None
    missing = [name for name in ('ClassificationTask', 'main', '_parse_args') if not hasattr(module, name)]
    if missing:
        raise ConfigError(f"timm_train: {str(path)!r} is not timm's train.py (it defines no {', '.join(missing)}); "
                          'pass the train.py of a timm checkout')
    return module


def _moex_settings(ours: argparse.Namespace, args: argparse.Namespace) -> Dict[str, Any]:
    """The command line, else timm's --config YAML (already in ``args``), else the defaults; checked."""
    # a YAML key train.py has no option for lands in args as it is: a misspelt MoEx key would be ignored
    for key in vars(args):
        if key.replace('-', '_').startswith('moex') and key not in MOEX_DEFAULTS:
            raise _unknown_moex_key(key, '--config YAML')
    settings = {}
    for key, default in MOEX_DEFAULTS.items():
        value = getattr(ours, key)
        settings[key] = value if value is not None else getattr(args, key, default)
    for key in ('moex_prob', 'moex_lam'):
        v = settings[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ConfigError(f'{key}: must be a number in [0, 1], got {v!r}')
    eps = settings['moex_eps']
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ConfigError(f'moex_eps: must be a number >= 0, got {eps!r}')
    for key in ('moex_norm', 'moex_layer', 'moex_impl'):
        if not isinstance(settings[key], str):
            raise ConfigError(f'{key}: must be a string, got {settings[key]!r}')
    try:
        parse_norm(settings['moex_norm'])
    except ValueError as e:
        raise ConfigError(f'moex_norm: {e}') from None
    if settings['moex_impl'] not in MOEX_IMPLS:
        raise ConfigError(f"moex_impl: must be one of {', '.join(MOEX_IMPLS)}, got {settings['moex_impl']!r}")
    return settings


def _refuse_unsupported(args: argparse.Namespace) -> None:
    if getattr(args, 'kd_model_name', None) is not None:
        raise ConfigError(f'kd_model_name: MoEx runs with the classification task only, not with distillation '
                          f'(--kd-model-name {args.kd_model_name}); drop one of them')
    if getattr(args, 'jsd_loss', False):
        raise ConfigError('jsd_loss: the JSD loss compares the augmentation splits of one image; MoEx would exchange '
                          'moments across them. Drop --jsd-loss')
    if getattr(args, 'naflex_loader', False):
        raise ConfigError('naflex_loader: the NaFlex loader feeds patch dictionaries, which the MoEx hook does not '
                          'handle; drop --naflex-loader')
    moex_kwargs = sorted(k for k in (getattr(args, 'model_kwargs', None) or {}) if str(k).startswith('moex_'))
    if moex_kwargs:  # the hook is attached again with the --moex-* settings: these would be overridden
        raise ConfigError(f"model_kwargs: {', '.join(moex_kwargs)} would be replaced by this command's MoEx "
                          f"settings; pass {', '.join('--' + k.replace('_', '-') for k in moex_kwargs)} instead")


def _check_model_and_data(args: argparse.Namespace, layer: str) -> None:
    """What timm's train.py would stop on later, after its log lines or a traceback: an unknown model, a MoEx layer
    the model does not have, a missing dataset folder."""
    for module in getattr(args, 'device_modules', None) or ():  # train.py imports them first; they may add models
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f'device_modules: cannot import {module!r} ({e})') from None
    source, name = parse_model_name(str(getattr(args, 'model', '')))
    if not source and not timm.is_model(name):  # hf-hub: and local-dir: models are found by create_model
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.7)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else \
            "timm.list_models('*pattern*') lists the names"
        raise ConfigError(f'model: timm has no model {name!r}; {hint}')
    if not source:  # the layer, looked up in the model built on the meta device: no memory, no weights
        try:
            with torch.device('meta'):
                model = timm.create_model(name, num_classes=getattr(args, 'num_classes', None),
                                          **(getattr(args, 'model_kwargs', None) or {}))
        except Exception:  # noqa: BLE001  train.py reports it when it builds the model; the layer is checked then
            model = None
        if model is not None:
            try:
                resolve_moex_layer(model, layer)
            except ValueError as e:
                raise ConfigError(f'moex_layer: {e}') from None
    if '/' in str(getattr(args, 'dataset', '') or ''):  # torch/, hfds/, tfds/, wds/: timm's readers find them
        return
    data_dir = getattr(args, 'data_dir', None) or getattr(args, 'data', None)  # train.py's fallback: the positional
    if not data_dir:
        raise ConfigError("data_dir: no dataset given; pass --data-dir, the folder that holds the train/ and "
                          "validation/ class folders (or a .tar of them), or --dataset torch/NAME, hfds/NAME, ...")
    if not os.path.exists(str(data_dir)):
        raise DataError('data_dir: no such folder', data_dir,
                        'pass --data-dir the folder that holds the train/ and validation/ class folders (or a .tar)')


def hook_running_model(model: torch.nn.Module, layer: str = 'stem', norm: str = 'pono', eps: float = 1e-5,
                       impl: str = 'auto', verbose: bool = True) -> MoExHook:
    """The MoEx hook of ``model`` with the asked settings, on the module that will run.

    A model without a hook gets ``attach_moex(model, layer, norm, eps, impl)``. A model that has
    one (a ``*_moex`` model is born with it) keeps it when its layer, norm, eps and impl are the
    asked ones; if a BatchNorm conversion (SyncBatchNorm, split BN) replaced its module since,
    :func:`~timm_moex.reattach_moex` moves it to the module now at that layer (it would otherwise
    never fire). Otherwise the hook is removed and attached again with the asked settings (its
    ``detach`` and ``channel_dim`` kept), so that what runs is what was asked.

    Args:
        model: The model train.py built, before ``torch.compile`` and the DDP wrap.
        layer: 'stem' or a dotted module name.
        norm: Which moments are exchanged (see ``moment_exchange``).
        eps: Added to the variance inside the square root.
        impl: The implementation of ``moment_exchange`` (``MOEX_IMPLS``).
        verbose: Log when a model's own hook is replaced.

    Returns:
        The hook on the module that will run.

    Raises:
        ConfigError: ``layer`` is not a module of the model (or its stem cannot be found).
    """
    hook = reattach_moex(model)
    try:
        if hook is None:
            return attach_moex(model, layer=layer, norm=norm, eps=eps, impl=impl)
        asked = dict(layer=resolve_moex_layer(model, layer), norm=norm, eps=eps, impl=impl)
        if all(getattr(hook, key) == value for key, value in asked.items()):
            return hook
        kept = dict(detach=hook.detach, channel_dim=hook.channel_dim)
        hook.remove()
        new = attach_moex(model, **asked, **kept)
    except ValueError as e:  # a layer the model does not have, a stem that cannot be found
        raise ConfigError(f'moex_layer: {e}') from None
    if verbose:
        _logger.info(f'the model came with {hook}; attached as asked: {new}')
    return new


class _TimmTrainMoExTask(MoExClassificationTask):
    """MoExClassificationTask that counts its training batches and checks that the hook ran."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_batches = 0
        self.moex_batches = 0

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, Any]:
        result = super().forward(input, target)
        if self.get_trainable_module().training:
            self.train_batches += 1
            self.moex_batches += int(result['moex'])
            if result['moex'] and self.hook.armed:
                raise RuntimeError(
                    f'the MoEx hook at {self.hook.layer!r} did not run: the model that ran is not the one the hook '
                    'was attached to')
        return result


class _OutdirRecorder(types.ModuleType):
    """timm.utils as train.py sees it, except that ``get_outdir`` records the output folder."""

    def __init__(self, utils: types.ModuleType, run: Dict[str, Any]):
        super().__init__(utils.__name__)
        self._utils, self._run = utils, run

    def __getattr__(self, name: str) -> Any:
        return getattr(self._utils, name)

    def get_outdir(self, *args, **kwargs) -> str:
        out = self._utils.get_outdir(*args, **kwargs)
        self._run['output_dir'] = out
        return out


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run timm's train.py with MoEx.

    Args:
        argv: ``--timm-train PATH``, the ``--moex-*`` options and any of train.py's arguments;
            default ``sys.argv[1:]``.

    Returns:
        ``train_batches`` and ``moex_batches`` (this process), ``pairing``, the MoEx settings as the
        hook that ran has them, ``output_dir`` (timm's run folder, on the primary process) and the
        ``task``; empty for ``--help``.

    Raises:
        ConfigError: A bad or unknown MoEx setting, a missing or foreign train.py, a timm option
            that MoEx cannot run with, or a model timm does not know.
        DataError: A folder dataset's ``--data-dir`` does not exist.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, rest = split_argv(argv)
    path = ours.timm_train or os.environ.get(TIMM_TRAIN_ENV)
    if ours.moex_help or '-h' in rest or '--help' in rest:
        _print_help(path, timm_options=not ours.moex_help)
        return {}
    if not path:
        raise ConfigError(f"timm_train: where is timm's train.py? Pass --timm-train PATH/TO/pytorch-image-models/"
                          f'train.py or set {TIMM_TRAIN_ENV}')
    script = load_timm_train(path)
    run: Dict[str, Any] = dict(output_dir=None, task=None)
    parse_args = script._parse_args
    build_task = script.ClassificationTask

    def parse_with_moex():
        args, _ = parse_args()
        _refuse_unsupported(args)
        settings = _moex_settings(ours, args)
        _check_model_and_data(args, settings['moex_layer'])
        for key, value in settings.items():
            setattr(args, key, value)
        # train.py's own test of whether Mixup / CutMix is on: both pair sample i with sample B-1-i
        mixing = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
        run.update(settings, pairing='flip' if mixing else 'random')
        return args, yaml.safe_dump(args.__dict__, default_flow_style=False)  # args.yaml records MoEx too

    def moex_task(model, criterion=None, device=None, dtype=None, verbose=True, **kwargs):
        if kwargs:
            raise TypeError(f'{build_task.__name__} got unexpected arguments {sorted(kwargs)} from train.py')
        hook = hook_running_model(model, layer=run['moex_layer'], norm=run['moex_norm'], eps=run['moex_eps'],
                                  impl=run['moex_impl'], verbose=verbose)
        moex = MoExMixing(hook, prob=run['moex_prob'], lam=run['moex_lam'], pairing=run['pairing'])
        task = _TimmTrainMoExTask(model, moex, criterion=criterion, device=device, dtype=dtype, verbose=verbose)
        run['task'] = task
        return task

    script._parse_args = parse_with_moex
    script.ClassificationTask = moex_task
    script.utils = _OutdirRecorder(script.utils, run)
    with _script_argv(path, rest):
        script.main()
    task = run['task']
    if task is None:
        raise RuntimeError("timm's train.py did not build a ClassificationTask; MoEx was not used")
    hook = task.hook  # the record says what ran: the layer 'stem' resolved to, the hook's own settings
    run.update(train_batches=task.train_batches, moex_batches=task.moex_batches, moex_layer=hook.layer,
               moex_norm=hook.norm, moex_eps=hook.eps, moex_impl=hook.impl)
    _logger.info(f'MoEx: {task.moex_batches} of {task.train_batches} training batches moment-exchanged '
                 f'(prob {run["moex_prob"]}, lam {run["moex_lam"]}, {hook.norm} at {hook.layer!r}, eps {hook.eps}, '
                 f'pairing {run["pairing"]})')
    if run['output_dir']:
        record = {k: v for k, v in run.items() if k not in ('task', 'output_dir')}
        atomic_write_text(Path(run['output_dir']) / 'moex.json', json.dumps(record, indent=2))
    return run


@contextlib.contextmanager
def _script_argv(path: os.PathLike, args: Sequence[str]):
    """``sys.argv`` as train.py's parsers read it, for the duration of the block."""
    saved = sys.argv
    sys.argv = [str(path), *args]
    try:
        yield
    finally:
        sys.argv = saved


def _print_help(path: Optional[str], timm_options: bool = True) -> None:
    """This command's options, then train.py's own when ``path`` is one (help works without train.py too)."""
    _parser().print_help()
    if not timm_options:
        return
    print()
    if not path:
        print(f"train.py's own options are listed here when it is found: pass --timm-train PATH or set "
              f"{TIMM_TRAIN_ENV}")
        return
    try:
        script = load_timm_train(path)
    except ConfigError as e:
        print(f"train.py's own options are not listed here: {e}")
        return
    print(f"timm's train.py options ({path}):")
    sys.stdout.flush()
    with _script_argv(path, ['--help']):
        try:
            script._parse_args()  # argparse prints the help and exits
        except SystemExit:
            pass


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """The ``moex-timm-train`` command: a user error is one line on stderr and its exit code.

    Args:
        argv: As for :func:`main`; default ``sys.argv[1:]``.

    Returns:
        The exit code: 0, or the error's (2 configuration, 7 data; see ``timm_moex.train.errors``).
    """
    try:
        main(argv)
    except UserError as e:
        print(f'moex-timm-train: {e}', file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == '__main__':
    sys.exit(cli())
