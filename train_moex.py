#!/usr/bin/env python3
"""Train a timm model with Moment Exchange (MoEx), with Accelerate for devices and precision.

    accelerate launch train_moex.py --config hparams/cifar100_pyramidnet200_moex.yaml
    python train_moex.py --config hparams/quickstart.yaml --epochs 5      # the command line wins
    python train_moex.py --config hparams/quickstart.yaml --eval-only --checkpoint PATH
    python train_moex.py --help                                          # every key

The script reads top to bottom: ``main`` (configuration, Accelerator, the run folder's lock), ``train``
(data, model + MoEx hook, optimizer, prepare, scheduler / task / EMA, resume, the loop), ``train_one_epoch`` and
``train_step`` (the training step, on one screen), then the helpers. Per epoch the loop writes a row of
summary.csv and a checkpoint-<epoch> folder, and at the end model.safetensors (+ model_ema.safetensors) and
results.json (with eval_corruptions, the final model's errors on corrupted copies of the eval set, also in
corruptions.csv / .png), all in the run's output folder. What the loop builds on lives in ``timm_moex.train``:
``builders`` (model, task), ``run_folder`` (lock, resume, divergence advice, Hub push), ``checkpoint``, ``data``.

MoEx with Mixup / CutMix: timm's Mixup pairs sample i with sample B-1-i. MoEx then uses that
same pairing (perm = B-1-i) instead of a random permutation, and MoExLoss permutes the soft
targets along it: ``lam * CE(out, t) + (1 - lam) * CE(out, t[perm])``. With t mixed along the
same pairing this is exactly the three-term loss of the official CutMix + MoEx code (its
target_c = target_b[perm] is target_a here, the pairing being its own inverse). The batch is
shuffled, so the pairing is as random as a random permutation, except that no sample is paired
with itself.
"""
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Tuple

_NOT_STARTED = 'before the run started: nothing was trained; run the same command again'


def _interrupted_while_loading(signum, frame):
    """Ctrl-C while the imports below load: the line :func:`cli` prints for a Ctrl-C before the run, exit 130."""
    if os.environ.get('RANK', '0') in ('', '0'):  # under DDP every process stops, one reports
        print(f'train_moex.py: interrupted (Ctrl-C) {_NOT_STARTED}', file=sys.stderr, flush=True)
    os._exit(130)  # Interrupted.exit_code; nothing is written yet, and an exception would unwind through the imports


# Ctrl-C in the seconds torch and timm take to load would end in a traceback of the import machinery.
_LOADING_HANDLER = threading.current_thread() is threading.main_thread() and \
    signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not where SIGINT is ignored (a background job)
if _LOADING_HANDLER:
    signal.signal(signal.SIGINT, _interrupted_while_loading)

import torch
import torch.nn as nn
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.task import ClassificationTask
from timm.utils import ModelEmaV3, update_summary
from tqdm import tqdm

import timm_moex  # noqa: F401  (registers the package's models with timm)
from timm_moex.train import ConfigError, Interrupted, UserError, atomic_write_text, config_help, parse_config, \
    resolve_output_dir, save_config, validate_config
from timm_moex.train.errors import Terminated, TerminationRequest
from timm_moex.train.builders import compile_model, create_automix, create_model, create_task, trial_forward
from timm_moex.train.checkpoint import CheckpointManager, TrainState, export_weights, find_latest_checkpoint, \
    load_initial_weights, load_weights, read_resume_records, truncate_summary
from timm_moex.train.config import TrainConfig
from timm_moex.train.data import create_datasets, create_loaders, create_mixup
from timm_moex.train.metrics import evaluate
from timm_moex.train.model_folder import write_model_folder
from timm_moex.train.robustness import corruption_robustness
from timm_moex.train.run_folder import SavedRun, apply_resume, check_resume, diverged, own_run_folder, push_run, \
    record_resume

if _LOADING_HANDLER:  # loaded: Python's handler again, for the run's own Ctrl-C handling and for an importer
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: Optional[list] = None):
    """Train as ``argv`` configures: :func:`run` of the configuration it reads.

    Args:
        argv: The arguments (default: the command line).

    Returns:
        results.json's content (eval.json's with eval_only) on the main process, None on the others.

    Raises:
        UserError: the subclasses in timm_moex.train.errors for what the user can fix (ConfigError, RunFolderBusy,
            ResumeMismatch, CheckpointError, DataError, Diverged, Interrupted, Terminated); :func:`cli` prints them
            as one line.
    """
    return run(parse_config(argv))


def run(cfg: TrainConfig):
    """Train as ``cfg`` configures.

    Args:
        cfg: The configuration as read (``parse_config``); checked here, before anything is written.

    Returns:
        results.json's content (eval.json's with eval_only) on the main process, None on the others.

    Raises:
        UserError: as :func:`main`.
    """
    # ---- configuration (validated once; raises ConfigError before anything is written) ----
    cfg = validate_config(cfg)
    out = Path(resolve_output_dir(cfg))
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=cfg.log_with, project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed))
    set_seed(cfg.seed, device_specific=True)
    fp32 = accelerator.mixed_precision == 'fp16' and accelerator.device.type == 'cpu'  # Accelerate's choice on a CPU
    if fp32:
        accelerator.print('mixed_precision: fp16 has no effect on a CPU (Accelerate trains in fp32 there): this run '
                          'trains in fp32 and records mixed_precision: no (bf16 is the mixed precision of a CPU)')
    cfg = replace(cfg, mixed_precision='no' if fp32 else accelerator.mixed_precision)  # what runs: recorded, compared
    if cfg.sync_bn and accelerator.num_processes > 1 and accelerator.device.type == 'cpu':
        raise ConfigError('sync_bn: SyncBatchNorm works on GPUs only; this run uses CPU processes (--sync-bn false)')
    if cfg.eval_only:
        return train(cfg, out, accelerator, (None, {}))
    # ---- one owner per run folder, an honest resume: both before anything is written ----
    lock, failed = own_run_folder(accelerator, out), True
    try:
        results = train(cfg, out, accelerator, check_resume(cfg, out))
        failed = False
        return results
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM through the handler of cli()
        stop = Terminated if isinstance(e, TerminationRequest) else Interrupted
        last = find_latest_checkpoint(out)
        raise stop(_STOPPED[stop], out, (f'{last.name} is kept' if last else 'no checkpoint was written yet') +
                   '; run the same command with --resume auto to continue') from None
    finally:
        if lock is not None:
            lock.release(unused=failed)  # a run that failed before writing leaves no empty folder behind


def train(cfg: TrainConfig, out: Path, accelerator: Accelerator, saved: SavedRun):
    """The run after configuration, Accelerator and lock: data, model, optimizer, loop, outputs.

    Args:
        cfg: The validated configuration.
        out: The run folder (locked by :func:`main` unless ``eval_only``).
        accelerator: The run's Accelerator.
        saved: What ``check_resume`` found of the run being resumed.

    Returns:
        results.json's content on the main process (None on the others); eval.json's with ``eval_only``.
    """
    # ---- data ----
    train_set, eval_set, num_classes = create_datasets(cfg, accelerator.device)
    train_loader, eval_loader = create_loaders(cfg, train_set, eval_set)

    # ---- model (+ MoEx hook) ----
    model = create_model(cfg, num_classes)
    trial_forward(cfg, model, accelerator)
    if cfg.initial_checkpoint and not cfg.eval_only:  # fine-tuning: another class count's classifier is new
        accelerator.print(load_initial_weights(model, cfg.initial_checkpoint))
    if cfg.eval_only:
        return evaluate_only(cfg, model, eval_set, eval_loader, accelerator, out)

    # ---- optimizer, prepare, scheduler, task, EMA ----
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum_steps
    lr = cfg.lr if cfg.lr is not None else cfg.lr_base * global_batch / cfg.lr_base_size
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, **cfg.opt_kwargs)
    models = (model,)
    if cfg.mix == 'automix':  # Mix Block, mixed-image head, momentum encoder: a second prepared module
        models = (model, create_automix(cfg, model, optimizer, lr))
    if cfg.compile:
        model = compile_model(cfg, model, accelerator)
    *models, optimizer, train_loader, eval_loader = accelerator.prepare(
        model, *models[1:], optimizer, train_loader, eval_loader)
    model = models[0]
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, decay_epochs=cfg.decay_epochs,
        decay_milestones=cfg.decay_milestones, decay_rate=cfg.decay_rate, min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, step_on_epochs=False,
        updates_per_epoch=math.ceil(len(train_loader) / cfg.grad_accum_steps))
    mixup = create_mixup(cfg, num_classes)
    task = create_task(cfg, models, mixup, accelerator, steps_per_epoch=len(train_loader))
    model_ema = None
    if cfg.model_ema:
        model_ema = ModelEmaV3(accelerator.unwrap_model(model, keep_torch_compile=False),
                               decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)

    # ---- resume ----
    state = TrainState(scheduler)
    checkpoints = CheckpointManager(accelerator, out, state, keep=cfg.checkpoint_keep, model_ema=model_ema)
    start_epoch = checkpoints.resume(cfg.resume)
    resumed = None  # the resume's record: written once its first epoch is trained and saved
    if checkpoints.resumed_from is not None:
        resumed = apply_resume(cfg, out, accelerator, checkpoints, scheduler, saved)
    elif accelerator.is_main_process:
        save_config(cfg, out / 'config.yaml')  # the effective configuration
    if accelerator.is_main_process:
        truncate_summary(out / 'summary.csv', start_epoch - 1)
    if cfg.log_with:
        accelerator.init_trackers(out.name, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                    for k, v in cfg.to_dict().items()})
    accelerator.print(f'{cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, '
                      f'{len(train_set)} train / {len(eval_set)} eval images, {accelerator.num_processes} '
                      f'process(es), global batch {global_batch}, lr {lr:g}, moex={cfg.moex}, mix={cfg.mix}, '
                      f'mixed_precision={cfg.mixed_precision}, output {out}')

    # ---- loop ----
    loop = Loop(cfg, accelerator, task, models, train_loader, optimizer, scheduler, mixup, model_ema, state)
    for epoch in range(start_epoch, cfg.epochs + 1):
        train_metrics = train_one_epoch(loop, epoch)
        eval_metrics = evaluate(model, eval_loader, accelerator, cfg.channels_last)
        if model_ema is not None:
            ema_metrics = evaluate(model_ema.module, eval_loader, accelerator, cfg.channels_last)
            eval_metrics.update({f'ema_{k}': v for k, v in ema_metrics.items() if k != 'count'})
        if not math.isfinite(eval_metrics['loss']):  # weights broken by the last update: keep the checkpoints
            raise diverged(cfg, epoch, None, optimizer, 'the evaluation loss is not finite after')
        state.epoch = epoch
        is_best = state.update_best(epoch, {**eval_metrics, 'train_loss': train_metrics['loss']})
        lr_now = optimizer.param_groups[0]['lr']
        if accelerator.is_main_process:
            update_summary(epoch, train_metrics, eval_metrics, out / 'summary.csv', lr=lr_now)
        accelerator.log({**{f'train/{k}': v for k, v in train_metrics.items()},
                         **{f'eval/{k}': v for k, v in eval_metrics.items()}, 'lr': lr_now}, step=epoch)
        accelerator.print(f'epoch {epoch}: train loss {train_metrics["loss"]:.4f}, eval loss '
                          f'{eval_metrics["loss"]:.4f}, top-1 err {eval_metrics["top1_err"]:.2f}%, top-5 err '
                          f'{eval_metrics["top5_err"]:.2f}%, {train_metrics["img_per_sec"]:.0f} img/s'
                          + (' (best)' if is_best else ''))
        checkpoints.save(epoch)
        if resumed is not None:  # the resume's settings have trained an epoch: now they are the run's
            record_resume(cfg, out, accelerator, resumed)
            resumed = None

    # ---- outputs (+ the corruption evaluation of the final model when eval_corruptions asks for it) ----
    corruptions = corruption_robustness(cfg, model, eval_set, accelerator, out)
    return finish(cfg, out, accelerator, model, model_ema, state, classes=getattr(train_set, 'classes', None),
                  corruptions=corruptions)


@dataclass
class Loop:
    """What the training step works with, built once by :func:`train`."""
    cfg: TrainConfig
    accelerator: Accelerator
    task: ClassificationTask
    models: Tuple[nn.Module, ...]  # the classifier, then AutoMix's module when mix: automix
    loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: Optional[Scheduler]
    mixup: Optional[Mixup]
    model_ema: Optional[ModelEmaV3]
    state: TrainState


def train_one_epoch(loop: Loop, epoch: int) -> dict:
    """One epoch of :func:`train_step`, its loss summed on the device and looked at every ``DIVERGENCE_CHECK_STEPS``.

    Args:
        loop: What the step works with.
        epoch: The epoch, 1-based (the loader's shuffle depends on the seed and the epoch only).

    Returns:
        ``loss`` (mean over the epoch's images, all processes), ``epoch_time``, ``img_per_sec`` and
        ``moex_frac`` (the fraction of batches MoEx ran on).

    Raises:
        Diverged: A process saw a non-finite loss.
    """
    cfg, accelerator, loader = loop.cfg, loop.accelerator, loop.loader
    loop.models[0].train()
    loader.set_epoch(epoch)  # the shuffle depends on (seed, epoch) only: resumable
    loss_sum = torch.zeros((), device=accelerator.device)  # stays on the device: no sync per step
    first_bad = torch.full((), -1, dtype=torch.long, device=accelerator.device)  # the first step of a non-finite loss
    images, moex_batches = 0, 0  # this process
    start = time.perf_counter()
    bar = tqdm(loader, desc=f'epoch {epoch}/{cfg.epochs}', dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_main_process))
    for step, (input, target) in enumerate(bar):
        result = train_step(loop, input, target)
        loss = result['loss'].detach().float()
        loss_sum += loss * input.shape[0]
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        images, moex_batches = images + input.shape[0], moex_batches + int(result.get('moex', False))
        if (step + 1) % DIVERGENCE_CHECK_STEPS == 0 or step + 1 == len(loader):
            check_finite(first_bad, epoch, accelerator, cfg, loop.optimizer)
        if not bar.disable and step % 10 == 0:
            bar.set_postfix(loss=f'{loss_sum.item() / images:.4f}',
                            img_s=f'{images * accelerator.num_processes / (time.perf_counter() - start):.0f}')
    totals = accelerator.reduce(torch.stack([loss_sum, torch.tensor(float(images), device=loss_sum.device),
                                             torch.tensor(float(moex_batches), device=loss_sum.device)]), 'sum')
    elapsed = time.perf_counter() - start
    return {'loss': (totals[0] / totals[1]).item(), 'epoch_time': elapsed, 'img_per_sec': totals[1].item() / elapsed,
            'moex_frac': totals[2].item() / (len(loader) * accelerator.num_processes)}


def train_step(loop: Loop, input: torch.Tensor, target: torch.Tensor) -> dict:
    """One training step: Mixup / CutMix, the task (MoEx when its coin says so), backward, clip, optimizer step,
    then, once per update, the schedule and the EMA. Nothing in it waits for the device.

    Args:
        loop: What the step works with.
        input: A batch of images from the loader.
        target: Their class indices.

    Returns:
        The task's result: ``loss`` (a device tensor) and, for the MoEx tasks, ``moex`` (whether it ran).
    """
    cfg, accelerator, model, optimizer = loop.cfg, loop.accelerator, loop.models[0], loop.optimizer
    if cfg.channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    if loop.mixup is not None:
        input, target = loop.mixup(input, target)  # soft targets, pairs i with B-1-i
    with accelerator.accumulate(*loop.models):  # AutoMix's module, when on, follows the classifier
        result = loop.task(input, target)  # MoEx (when drawn) + its label mixing
        accelerator.backward(result['loss'])
        if cfg.clip_grad and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if accelerator.sync_gradients:
        loop.state.num_updates += 1
        if loop.scheduler is not None:
            loop.scheduler.step_update(loop.state.num_updates)
        if loop.model_ema is not None:
            loop.model_ema.update(accelerator.unwrap_model(model, keep_torch_compile=False),
                                  step=loop.state.num_updates)
    return result


# How often (in steps) the loss is checked for NaN / inf: one device sync per this many steps.
DIVERGENCE_CHECK_STEPS = 50


def check_finite(first_bad: torch.Tensor, epoch: int, accelerator: Accelerator, cfg: TrainConfig,
                 optimizer: torch.optim.Optimizer) -> None:
    """Stop the run when any process has seen a non-finite loss this epoch (a collective: every process calls it
    at the same steps).

    Args:
        first_bad: This process's first step (0-based) of a non-finite loss this epoch, or -1.
        epoch: The epoch.
        accelerator: The run's Accelerator.
        cfg: The run's configuration.
        optimizer: The run's optimizer (for the lr in the message).

    Raises:
        Diverged: Naming the first such step over all processes.
    """
    seen = accelerator.gather(first_bad.reshape(1))
    seen = seen[seen >= 0]
    if seen.numel():
        raise diverged(cfg, epoch, int(seen.min()) + 1, optimizer, 'the training loss is not finite at')


def evaluate_only(cfg: TrainConfig, model: nn.Module, eval_set, eval_loader, accelerator: Accelerator,
                  out: Path) -> dict:
    """--eval-only --checkpoint PATH: top-1 / top-5 error, NLL and ECE (+ the corruption evaluation when
    eval_corruptions asks for it), printed and written to eval.json.

    Args:
        cfg: The run's configuration (``checkpoint``, ``channels_last``, ``eval_corruptions``).
        model: The model from ``create_model``, not prepared yet.
        eval_set: The evaluation dataset (the corruption evaluation reads its images).
        eval_loader: Its loader, not prepared yet.
        accelerator: The run's Accelerator.
        out: Where eval.json goes.

    Returns:
        eval.json's content.
    """
    accelerator.print(load_weights(model, cfg.checkpoint))
    model, eval_loader = accelerator.prepare(model, eval_loader)
    metrics = evaluate(model, eval_loader, accelerator, cfg.channels_last)
    metrics = dict(checkpoint=str(cfg.checkpoint), top1_err=metrics['top1_err'], top5_err=metrics['top5_err'],
                   nll=metrics['loss'], ece=metrics['ece'], count=metrics['count'])
    corruptions = corruption_robustness(cfg, model, eval_set, accelerator, out)
    if corruptions is not None:
        metrics['corruptions'] = corruptions
    if accelerator.is_main_process:
        atomic_write_text(out / 'eval.json', json.dumps(metrics, indent=2))
        print(json.dumps(metrics, indent=2))
    return metrics


def finish(cfg: TrainConfig, out: Path, accelerator: Accelerator, model: nn.Module, model_ema: Optional[ModelEmaV3],
           state: TrainState, classes: Optional[list] = None, corruptions: Optional[dict] = None) -> Optional[dict]:
    """The run's outputs: model.safetensors (+ model_ema.safetensors) with plain timm keys, results.json, and
    config.json + README.md for timm's local-dir: / hf-hub: loaders (pushed to the Hub with push_to_hub).

    Args:
        cfg: The run's configuration.
        out: The run folder.
        accelerator: The run's Accelerator.
        model: The trained (prepared) model.
        model_ema: Its EMA, or None.
        state: The best and last epochs with their metrics.
        classes: The class names, for the model card and config.json.
        corruptions: The corruption evaluation, added to results.json when given.

    Returns:
        results.json's content on the main process, None on the others.
    """
    accelerator.wait_for_everyone()
    results = None
    if accelerator.is_main_process:
        export_weights(accelerator.unwrap_model(model, keep_torch_compile=False), out / 'model.safetensors')
        if model_ema is not None:
            export_weights(model_ema.module, out / 'model_ema.safetensors')
        results = dict(model=cfg.model, dataset=cfg.dataset, epochs=cfg.epochs, moex=cfg.moex, mix=cfg.mix,
                       num_processes=accelerator.num_processes, mixed_precision=cfg.mixed_precision,
                       last=dict(epoch=state.epoch, **state.last_metrics),
                       best=dict(epoch=state.best_epoch, **state.best_metrics),
                       note='best = the epoch of lowest eval top-1 error (selected on the eval set, as the '
                            'official codes report); last = the final epoch')
        resumes = read_resume_records(out)
        if resumes:  # what changed when, from resume.jsonl: the settings above hold from the last resume on
            results['resumes'] = [dict(epoch=r['epoch'], changes=r['changes']) for r in resumes]
        if corruptions is not None:
            results['corruptions'] = corruptions
        atomic_write_text(out / 'results.json', json.dumps(results, indent=2))
        # ---- the run folder as a timm model folder: timm.create_model('local-dir:<out>', pretrained=True) ----
        write_model_folder(accelerator.unwrap_model(model, keep_torch_compile=False), out, cfg, label_names=classes,
                           results=results)
        print(f'last epoch {state.epoch}: top-1 err {state.last_metrics["top1_err"]:.2f}%, top-5 err '
              f'{state.last_metrics["top5_err"]:.2f}% | best epoch {state.best_epoch}: top-1 err '
              f'{state.best_metrics["top1_err"]:.2f}% | {out}')
    accelerator.end_training()
    if cfg.push_to_hub and accelerator.is_main_process:
        push_run(out, cfg.push_to_hub)
    return results


def cli(argv: Optional[list] = None) -> int:
    """Run :func:`main` as the command does: an error the user can fix is one line on stderr,
    ``train_moex.py: <what> (<the bad value>): <what to do>``, and its exit code, without a traceback
    (``--debug`` or TIMM_MOEX_DEBUG=1 shows it; only the variable, for an error in reading the configuration
    itself, which comes before the ``debug`` key is known).

    Args:
        argv: The arguments (default: the command line).

    Returns:
        The exit code.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if {'-h', '--help'} & set(argv):
        print(config_help())
        return 0
    debug = os.environ.get('TIMM_MOEX_DEBUG', '').lower() not in ('', '0', 'false', 'no')
    report = os.environ.get('RANK', '0') in ('', '0')  # under DDP every process stops, one reports
    try:
        with _as_a_command():
            cfg = parse_config(argv)
            debug = debug or cfg.debug
            run(cfg)
    except UserError as e:
        if debug:
            traceback.print_exc()
        if report:
            prefix = 'configuration error: ' if isinstance(e, ConfigError) else ''
            print(f'train_moex.py: {prefix}{e}', file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # before the run started (the run itself raises Interrupted / Terminated)
        stop = Terminated if isinstance(e, TerminationRequest) else Interrupted
        if debug:
            traceback.print_exc()
        if report:
            print(f'train_moex.py: {_STOPPED[stop]} {_NOT_STARTED}', file=sys.stderr)
        return stop.exit_code
    return 0


_STOPPED = {Interrupted: 'interrupted (Ctrl-C)', Terminated: 'terminated (SIGTERM)'}
_OWN_FILES = (os.path.dirname(os.path.abspath(timm_moex.__file__)) + os.sep, os.path.abspath(__file__))


@contextmanager
def _as_a_command():
    """What the command adds to :func:`main`: SIGTERM stops the run as Ctrl-C does (a :class:`TerminationRequest`
    raised in the main thread), and the package's own warnings print as one line (Python's format adds the
    source line of the ``warnings.warn`` call)."""
    def one_line(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(_OWN_FILES):
            return f'train_moex.py: {category.__name__}: {message}\n'
        return python_format(message, category, filename, lineno, line)

    def request_termination(signum, frame):
        raise TerminationRequest()

    python_format, warnings.formatwarning = warnings.formatwarning, one_line
    try:
        previous = signal.signal(signal.SIGTERM, request_termination)
    except ValueError:  # not the main thread: a signal handler cannot be set there
        previous = False
    try:
        yield
    finally:
        warnings.formatwarning = python_format
        if previous is not False:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == '__main__':
    sys.exit(cli())
