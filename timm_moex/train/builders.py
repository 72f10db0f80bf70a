"""What a run trains, built from its configuration: the model with its hooks, and the task around it.

:func:`create_model` builds the timm model and attaches the hooks before ``torch.compile`` and
``accelerator.prepare`` (a hook added later is not traced); :func:`trial_forward` runs one armed forward so that
settings that fail only in a forward fail before the run starts; :func:`create_task` picks the training task
(MoEx, SnapMix, AutoMix, or timm's plain one) with the run's criterion.
"""
import warnings
from typing import Optional, Sequence

import timm
import torch
import torch.nn as nn
from accelerate import Accelerator
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import LocalEntryNotFoundError
from timm.data import Mixup
from timm.task import ClassificationTask

from ..hooks import attach_dsu, attach_mixstyle, attach_moex, convert_sync_batchnorm, get_moex_hook
from ..loss import BiTemperedLogisticLoss
from ..models import is_moex_variant
from ..task import AutoMix, AutoMixTask, MoExClassificationTask, MoExMixing, SnapMixTask
from ..task.automix import parse_feature_layer
from .config import TrainConfig
from .data import resolve_data_defaults
from .errors import CheckpointError, ConfigError, describe

__all__ = ['MOEX_VARIANT_KEYS', 'model_kwargs', 'create_model', 'trial_forward', 'compile_model', 'create_automix',
           'create_criterion', 'create_task']


MOEX_VARIANT_KEYS = ('moex_layer', 'moex_norm', 'moex_eps', 'moex_impl')
"""The configuration keys that a ``*_moex`` model takes as its own MoEx arguments."""


def model_kwargs(cfg: TrainConfig) -> dict:
    """The keyword arguments of ``timm.create_model`` for the run's model.

    A ``*_moex`` model is born with its MoEx hook: the run's ``moex_layer``, ``moex_norm``, ``moex_eps`` and
    ``moex_impl`` are its arguments, so that the hook is what the configuration (and the run's config.yaml) says.

    Args:
        cfg: The run's configuration (``model``, ``model_kwargs`` and the keys above).

    Returns:
        ``model_kwargs`` plus, for a ``*_moex`` model, its MoEx arguments.
    """
    kwargs = dict(cfg.model_kwargs)
    if is_moex_variant(cfg.model):
        kwargs.update({key: getattr(cfg, key) for key in MOEX_VARIANT_KEYS})
    return kwargs


def create_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The run's timm model with SyncBatchNorm, the MoEx hook and the MixStyle / DSU hooks, channels_last.

    Args:
        cfg: The run's configuration (``model``, ``pretrained``, ``model_kwargs``, ``sync_bn``, the ``moex_*``,
            ``mixstyle*`` and ``dsu*`` keys, ``channels_last``).
        num_classes: The classifier's class count.

    Returns:
        The model, on the CPU, its hooks attached (before compile and prepare).

    Raises:
        CheckpointError: ``pretrained`` weights that cannot be downloaded (offline, not cached), naming their source.
    """
    try:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes,
                                  **model_kwargs(cfg))
    except OSError as e:  # huggingface_hub's and urllib's download errors are OSErrors
        if not cfg.pretrained:
            raise
        raise _weights_unavailable(cfg.model, e) from None
    if cfg.sync_bn and torch.distributed.is_available():  # replaces the BatchNorms; a MoEx hook moves along
        model = convert_sync_batchnorm(model)
    hook = get_moex_hook(model)  # *_moex models come with one, made with the moex_* keys
    if hook is not None and not cfg.moex:
        hook.warn_unarmed = False  # MoEx is off on purpose: the hook stays idle
    if cfg.moex and hook is None:
        hook = attach_moex(model, layer=cfg.moex_layer, norm=cfg.moex_norm, eps=cfg.moex_eps, impl=cfg.moex_impl)
    elif cfg.moex and (hook.norm, hook.eps) != (cfg.moex_norm, cfg.moex_eps):
        warnings.warn(f'{cfg.model} comes with {hook}; moex_norm={cfg.moex_norm!r}, moex_eps={cfg.moex_eps} ignored')
    if cfg.mixstyle:  # no label changes, so no task: the hooks act in every training forward
        attach_mixstyle(model, layers=cfg.mixstyle_layers, p=cfg.mixstyle_p, alpha=cfg.mixstyle_alpha,
                        mix=cfg.mixstyle_mix)
    if cfg.dsu:
        attach_dsu(model, layers=cfg.dsu_layers, p=cfg.dsu_p)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _weights_unavailable(name: str, e: OSError) -> CheckpointError:
    """The one-line error for pretrained weights that could not be downloaded, naming where they live."""
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    source = None if pretrained_cfg is None else (
        f'hf-hub:{pretrained_cfg.hf_hub_id}' if pretrained_cfg.hf_hub_id else pretrained_cfg.url or pretrained_cfg.file)
    cause = e.__cause__ or e.__context__
    if isinstance(e, LocalEntryNotFoundError) and hub_constants.is_offline_mode():
        reason = 'not in the local cache, and HF_HUB_OFFLINE forbids downloads'
    elif isinstance(e, LocalEntryNotFoundError):  # its own text is a paragraph; what failed is its cause, if any
        reason = 'not in the local cache, and the download failed' + (f': {describe(cause)}' if cause else '')
    else:
        reason = describe(e)
    return CheckpointError(f'pretrained: the weights of {name} cannot be downloaded ({reason})',
                           source or 'timm\'s pretrained weights',
                           'download them once while online (timm keeps them in the Hugging Face cache), or give '
                           '--initial-checkpoint PATH (a weights file), or --pretrained false')


def trial_forward(cfg: TrainConfig, model: nn.Module, accelerator: Accelerator) -> None:
    """One training-mode forward of min(batch_size, 2) random images with the MoEx hook armed.

    Settings that fail only in a forward (a ``moex_norm`` group count that does not divide the layer's
    channels, BatchNorm with one sample) fail now rather than at the first MoEx batch, hours in. Weights,
    buffers (BatchNorm statistics) and random states are left as they were.

    Args:
        cfg: The run's configuration (its image size, batch size, MoEx and channels_last settings).
        model: The model from :func:`create_model`; moved to the run's device.
        accelerator: The run's Accelerator (device and autocast).

    Raises:
        ConfigError: The forward fails, naming the likely key.
    """
    img_size = resolve_data_defaults(cfg)[0]
    n = min(cfg.batch_size, 2)
    device = accelerator.device
    model.to(device)
    hook = get_moex_hook(model) if cfg.moex else None
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []), torch.no_grad(), \
                accelerator.autocast():
            x = torch.randn(n, 3, img_size, img_size, device=device)
            model.train()
            if hook is not None:
                hook.arm(torch.arange(n - 1, -1, -1, device=device))
            model(x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x)
    except Exception as e:  # noqa: BLE001  whatever the forward raises is the configuration's fault
        reason = describe(e)
        if 'more than 1 value per channel' in str(e):
            raise ConfigError(f'batch_size: {cfg.batch_size} is too small for the BatchNorm layers of {cfg.model} '
                              f'in training ({reason}); use --batch-size 2 or more') from None
        moex = f' with MoEx (moex_layer={cfg.moex_layer!r}, moex_norm={cfg.moex_norm!r})' if hook is not None else ''
        raise ConfigError(f'model: a trial forward of {cfg.model}{moex} on {n} images of {img_size} px fails '
                          f'({reason}); check moex_norm / moex_layer / img_size / model_kwargs') from None
    finally:
        if hook is not None:
            hook.disarm()
        for buffer, saved in buffers:
            buffer.copy_(saved)
        model.train(was_training)


def compile_model(cfg: TrainConfig, model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """``torch.compile`` the model with the run's backend, after its hooks are attached (a later hook is not traced).

    Shapes are static: a partial last batch gets its own graph instead of making every later graph dynamic in the
    batch size. MoEx armed and idle, train and eval, are separate graphs.

    Args:
        cfg: The run's configuration (``compile_backend``, ``compile_mode``).
        model: The model from :func:`create_model`.
        accelerator: The run's Accelerator: 'cudagraphs' needs a CUDA device; elsewhere the run says so in one line
            and compiles with the 'eager' backend.

    Returns:
        The compiled model.
    """
    backend = cfg.compile_backend
    if backend == 'cudagraphs' and accelerator.device.type != 'cuda':
        accelerator.print(f"compile_backend: 'cudagraphs' needs a CUDA device and this run is on "
                          f"{accelerator.device.type}: compiling with the 'eager' backend instead")
        backend = 'eager'
    options = dict(mode=cfg.compile_mode) if backend == 'inductor' else {}
    return torch.compile(model, backend=backend, dynamic=False, **options)


def create_automix(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> AutoMix:
    """AutoMix's module (Mix Block, mixed-image head, momentum encoder), its parameters added to ``optimizer``.

    Args:
        cfg: The run's configuration (the ``automix_*`` keys, ``weight_decay``).
        model: The classifier, before compile and prepare.
        optimizer: The run's optimizer; gets the mixed-image head's group (the model's lr) and the Mix Block's.
        lr: The model's learning rate (the Mix Block's too unless ``automix_lr`` is set).

    Returns:
        The AutoMix module, to prepare beside the model.
    """
    automix = AutoMix(model, feature_layer=parse_feature_layer(cfg.automix_feature_layer),
                      reduction=cfg.automix_reduction, lam_embed=cfg.automix_lam_embed,
                      upsample=cfg.automix_upsample, momentum=cfg.automix_momentum)
    mix_block_lr = lr if cfg.automix_lr is None else cfg.automix_lr
    for group in automix.param_groups(cfg.weight_decay, mix_block_lr=mix_block_lr):
        optimizer.add_param_group(group)
    return automix


def create_criterion(cfg: TrainConfig, mixup: Optional[Mixup]) -> Optional[nn.Module]:
    """The run's loss when it is not timm's default (``loss: bi_tempered``), else None.

    Args:
        cfg: The run's configuration (``loss``, ``bitempered_*``, ``smoothing``).
        mixup: timm's Mixup / CutMix, or None; with it the smoothing is already in its soft targets.

    Returns:
        A :class:`~timm_moex.loss.BiTemperedLogisticLoss`, or None (the task's cross-entropy).
    """
    if cfg.loss != 'bi_tempered':
        return None
    return BiTemperedLogisticLoss(cfg.bitempered_t1, cfg.bitempered_t2, num_iters=cfg.bitempered_iters,
                                  smoothing=0.0 if mixup is not None else cfg.smoothing)


def create_task(cfg: TrainConfig, models: Sequence[nn.Module], mixup: Optional[Mixup], accelerator: Accelerator,
                steps_per_epoch: int) -> ClassificationTask:
    """The training task the configuration asks for: AutoMix, SnapMix, MoEx, or timm's plain task.

    MoEx composes with SnapMix and AutoMix through one :class:`~timm_moex.task.MoExMixing`; with Mixup / CutMix
    on, MoEx pairs sample i with B-1-i, Mixup's pairing.

    Args:
        cfg: The run's configuration.
        models: The prepared model, and AutoMix's module after it when ``mix: automix``.
        mixup: timm's Mixup / CutMix, or None.
        accelerator: The run's Accelerator (the task's device; unwrapping AutoMix).
        steps_per_epoch: Training batches per epoch (AutoMix's momentum and area schedules).

    Returns:
        The task: ``task(images, targets)`` returns a dict with the loss.
    """
    model = models[0]
    criterion = create_criterion(cfg, mixup)
    common = dict(criterion=criterion, device=accelerator.device, verbose=False,
                  criterion_kwargs=None if criterion is not None else dict(smoothing=cfg.smoothing,
                                                                           soft_targets=mixup is not None))
    # Mixup / CutMix pair sample i with B-1-i: MoEx shares that pairing (SnapMix and AutoMix, which refuse
    # Mixup, pair at random)
    pairing = 'flip' if mixup is not None else 'random'
    moex = MoExMixing(get_moex_hook(model), prob=cfg.moex_prob, lam=cfg.moex_lam, pairing=pairing) if cfg.moex else None
    if cfg.mix == 'automix':
        accelerator.unwrap_model(models[1]).total_steps = cfg.epochs * steps_per_epoch
        return AutoMixTask(model, models[1], alpha=cfg.automix_alpha, lam_margin=cfg.automix_lam_margin,
                           clean_weight=cfg.automix_clean_weight, area_weight=cfg.automix_area_weight,
                           area_margin=cfg.automix_area_margin, area_decay=cfg.automix_area_decay, moex=moex,
                           **common)
    if cfg.snapmix:
        return SnapMixTask(model, alpha=cfg.snapmix_alpha, prob=cfg.snapmix_prob, moex=moex, **common)
    if cfg.moex:
        return MoExClassificationTask(model, moex, **common)
    return ClassificationTask(model, **common)
