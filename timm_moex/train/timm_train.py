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

- The hook is attached to the model train.py created when the task is built, which is after the
  model is moved to its device (and converted to SyncBatchNorm / split BN when asked) and before
  ``torch.compile`` and the DDP wrap: the module that runs carries it. A ``*_moex`` model keeps
  the hook it was born with (re-attached at the same layer if a BatchNorm conversion replaced
  that module).
- With ``--mixup`` / ``--cutmix`` (``Mixup`` or the prefetcher's ``FastCollateMixup``, both of
  which pair sample i with sample B-1-i), MoEx uses that same pairing ('flip'), as train_moex.py
  does, and the loss is the paper's CutMix + MoEx loss; otherwise a random permutation.
- The MoEx settings can also be keys of timm's ``--config`` YAML (``moex_prob: 1.0``); the
  command line wins. They are added to the run's ``args.yaml`` and checkpoint ``args``.
- The number of training batches that were moment-exchanged is logged at the end and written,
  with the settings, to ``moex.json`` in timm's output folder.
"""
import argparse
import json
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from ..hooks.moex import MoExHook, attach_moex, get_moex_hook
from ..ops.moex import parse_norm
from ..task.moex import MoExClassificationTask
from .errors import ConfigError
from .files import atomic_write_text

__all__ = ['main', 'cli', 'load_timm_train', 'hook_running_model', 'MOEX_DEFAULTS', 'TIMM_TRAIN_ENV']

TIMM_TRAIN_ENV = 'TIMM_TRAIN_PY'  # the path of timm's train.py when --timm-train is not given

# The MoEx settings and their defaults (the paper's ImageNet recipe: PONO at the stem, lam 0.9, every batch).
MOEX_DEFAULTS: Dict[str, Any] = dict(moex_prob=1.0, moex_lam=0.9, moex_norm='pono', moex_layer='stem', moex_eps=1e-5)

_logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='moex-timm-train', add_help=False, allow_abbrev=False,
        description="timm's train.py with Moment Exchange; every other option goes to train.py")
    p.add_argument('--timm-train', metavar='PATH', help=f"timm's train.py (default: ${TIMM_TRAIN_ENV})")
    p.add_argument('--moex-prob', type=float, help='probability that a batch is moment-exchanged (default 1.0)')
    p.add_argument('--moex-lam', type=float, help="weight of the sample's own label (default 0.9)")
    p.add_argument('--moex-norm', help='normalization of the moments: pono, in, ln, gnG, gn-dD, gponoG (default pono)')
    p.add_argument('--moex-layer', help="module whose output is exchanged: 'stem' or a dotted name (default stem)")
    p.add_argument('--moex-eps', type=float, help='epsilon added to the variance (default 1e-5)')
    p.add_argument('--moex-help', action='store_true', help='show these options and exit')
    return p


def split_argv(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    """(this command's options, the arguments left for timm's train.py, in their order)."""
    parser = _parser()
    try:
        ours, rest = parser.parse_known_args(list(argv))
    except SystemExit:  # argparse printed its usage line already
        raise ConfigError('moex options: see moex-timm-train --moex-help') from None
    return ours, rest


def load_timm_train(path: os.PathLike) -> types.ModuleType:
    """timm's train.py as a module (not ``__main__``, so its ``main()`` does not run), written nowhere.

    The source is compiled in memory: no ``__pycache__`` is written beside it, which may be read-only.

    Raises:
        ConfigError: The file is missing, is not Python, or is not timm's train.py.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"timm_train: no such file {str(path)!r}; pass --timm-train PATH/TO/pytorch-image-models/"
                          f"train.py (or set {TIMM_TRAIN_ENV})")
    module = types.ModuleType('timm_train_script')
    module.__file__ = str(path.resolve())
    try:
        code = compile(path.read_bytes(), module.__file__, 'exec', dont_inherit=True)
        exec(code, module.__dict__)
    except Exception as e:  # noqa: BLE001  anything a foreign file raises on import
        reason = (str(e).strip().splitlines() or [''])[0][:200]
        raise ConfigError(f"timm_train: cannot load {str(path)!r} ({type(e).__name__}: {reason}); it must be timm's "
                          'train.py') from None
    missing = [name for name in ('ClassificationTask', 'main', '_parse_args') if not hasattr(module, name)]
    if missing:
        raise ConfigError(f"timm_train: {str(path)!r} is not timm's train.py (it defines no {', '.join(missing)}); "
                          'pass the train.py of a timm checkout')
    return module


def _moex_settings(ours: argparse.Namespace, args: argparse.Namespace) -> Dict[str, Any]:
    """The command line, else timm's --config YAML (already in ``args``), else the defaults; checked."""
    settings = {}
    for key, default in MOEX_DEFAULTS.items():
        value = getattr(ours, key)
        settings[key] = value if value is not None else getattr(args, key, default)
    for key in ('moex_prob', 'moex_lam'):
        v = settings[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ConfigError(f'{key}: must be a number in [0, 1], got {v!r}')
    if not isinstance(settings['moex_eps'], (int, float)) or not settings['moex_eps'] >= 0:
        raise ConfigError(f"moex_eps: must be a number >= 0, got {settings['moex_eps']!r}")
    try:
        parse_norm(settings['moex_norm'])
    except ValueError as e:
        raise ConfigError(f'moex_norm: {e}') from None
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


def hook_running_model(model: torch.nn.Module, layer: str = 'stem', norm: str = 'pono', eps: float = 1e-5,
                       verbose: bool = True) -> MoExHook:
    """The MoEx hook of ``model``, on the module that will run.

    A ``*_moex`` model keeps the hook it was born with; if a BatchNorm conversion (SyncBatchNorm,
    split BN) replaced the hooked module since, the hook is moved to the module now at that layer
    (it would otherwise never fire). Any other model gets ``attach_moex(model, layer, norm, eps)``.

    Raises:
        ConfigError: ``layer`` is not a module of the model (or its stem cannot be found).
    """
    hook = get_moex_hook(model)
    if hook is not None and model.get_submodule(hook.layer) is not hook._module:
        spec = dict(layer=hook.layer, norm=hook.norm, eps=hook.eps, detach=hook.detach, channel_dim=hook.channel_dim)
        hook.remove()
        hook = attach_moex(model, **spec)
    if hook is None:
        try:
            hook = attach_moex(model, layer=layer, norm=norm, eps=eps)
        except ValueError as e:  # a layer the model does not have, a stem that cannot be found
            raise ConfigError(f'moex_layer: {e}') from None
    elif (hook.norm, hook.eps) != (norm, eps) and verbose:
        _logger.warning(f'the model comes with {hook}: moex_norm={norm!r}, moex_eps={eps} are not used')
    return hook


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
        ``train_batches`` and ``moex_batches`` (this process), ``pairing``, the MoEx settings,
        ``output_dir`` (timm's run folder, on the primary process) and the ``task``.

    Raises:
        ConfigError: A bad MoEx setting, a missing or foreign train.py, or a timm option that
            MoEx cannot run with.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, rest = split_argv(argv)
    if ours.moex_help:
        _parser().print_help()
        return {}
    path = ours.timm_train or os.environ.get(TIMM_TRAIN_ENV)
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
                                  verbose=verbose)
        task = _TimmTrainMoExTask(model, hook=hook, prob=run['moex_prob'], lam=run['moex_lam'],
                                  pairing=run['pairing'], criterion=criterion, device=device, dtype=dtype,
                                  verbose=verbose)
        run['task'] = task
        return task

    script._parse_args = parse_with_moex
    script.ClassificationTask = moex_task
    script.utils = _OutdirRecorder(script.utils, run)
    saved_argv = sys.argv
    sys.argv = [str(path), *rest]  # train.py's parsers read sys.argv
    try:
        script.main()
    finally:
        sys.argv = saved_argv
    task = run['task']
    if task is None:
        raise RuntimeError("timm's train.py did not build a ClassificationTask; MoEx was not used")
    run.update(train_batches=task.train_batches, moex_batches=task.moex_batches)
    _logger.info(f'MoEx: {task.moex_batches} of {task.train_batches} training batches moment-exchanged '
                 f'(prob {run["moex_prob"]}, lam {run["moex_lam"]}, {run["moex_norm"]} at {task.hook.layer!r}, '
                 f'pairing {run["pairing"]})')
    if run['output_dir']:
        record = {k: v for k, v in run.items() if k not in ('task', 'output_dir')}
        record['moex_layer'] = task.hook.layer
        atomic_write_text(Path(run['output_dir']) / 'moex.json', json.dumps(record, indent=2))
    return run


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """The ``moex-timm-train`` command: a user error is one line on stderr and exit code 2."""
    try:
        main(argv)
    except ConfigError as e:
        print(f'moex-timm-train: {e}', file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == '__main__':
    sys.exit(cli())
