#!/usr/bin/env python3
"""Train a timm model with Moment Exchange (MoEx), with Accelerate for devices and precision.

    accelerate launch train_moex.py --config hparams/cifar100_pyramidnet200_moex.yaml
    python train_moex.py --config hparams/quickstart.yaml --epochs 5      # the command line wins
    python train_moex.py --config hparams/quickstart.yaml --eval-only --checkpoint PATH
    python train_moex.py --help                                          # every key

The script reads top to bottom: configuration, Accelerator, data, model (+ MoEx hook),
optimizer, prepare, scheduler / task / EMA, then the loop, which writes per epoch a row of
summary.csv and a checkpoint-<epoch> folder, and at the end model.safetensors (+
model_ema.safetensors) and results.json (with eval_corruptions, the final model's errors on corrupted
copies of the eval set, also in corruptions.csv / .png), all in the run's output folder.

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
import sys
import time
import traceback
import warnings
from pathlib import Path

import timm
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast_object_list, set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import ClassificationTask
from timm.utils import ModelEmaV3, update_summary
from tqdm import tqdm

import timm_moex  # noqa: F401  (registers the package's models with timm)
from timm_moex import AutoMix, AutoMixTask, BiTemperedLogisticLoss, MoExClassificationTask, SnapMixTask, \
    attach_dsu, attach_mixstyle, attach_moex, get_moex_hook
from timm_moex.task.automix import parse_feature_layer
from timm_moex.train import ConfigError, Diverged, Interrupted, ResumeMismatch, RunError, RunFolderBusy, UserError, \
    atomic_write_text, config_help, load_config, read_run_config, resolve_output_dir, resume_differences, save_config
from timm_moex.train.checkpoint import CheckpointManager, RunLock, TrainState, append_resume_record, export_weights, \
    find_latest_checkpoint, load_initial_weights, load_weights, read_resume_records, truncate_summary
from timm_moex.train.data import create_datasets, create_loaders, create_mixup, resolve_data_defaults
from timm_moex.train.metrics import evaluate
from timm_moex.train.model_folder import push_model_folder, write_model_folder
from timm_moex.train.robustness import corruption_robustness


def create_model(cfg, num_classes):
    """A timm model, SyncBatchNorm, the MoEx hook and the MixStyle / DSU hooks (attached before compile and prepare),
    channels_last."""
    model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes, **cfg.model_kwargs)
    hook = get_moex_hook(model)  # *_moex models come with one, which wins over the moex_* keys
    if cfg.sync_bn and torch.distributed.is_available():  # replaces the BatchNorms: (re)attach the hook after
        spec = dict(layer=hook.layer, norm=hook.norm, eps=hook.eps, detach=hook.detach,
                    channel_dim=hook.channel_dim) if hook is not None else None
        if hook is not None:
            hook.remove()
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        hook = attach_moex(model, **spec) if spec else None
    if cfg.moex and hook is None:
        hook = attach_moex(model, layer=cfg.moex_layer, norm=cfg.moex_norm, eps=cfg.moex_eps)
    elif cfg.moex and (hook.norm, hook.eps) != (cfg.moex_norm, cfg.moex_eps):
        warnings.warn(f'{cfg.model} comes with {hook}; moex_norm={cfg.moex_norm!r}, moex_eps={cfg.moex_eps} ignored')
    if hook is not None:
        hook.impl = cfg.moex_impl
    if cfg.mixstyle:  # no label changes, so no task: the hooks act in every training forward
        attach_mixstyle(model, layers=cfg.mixstyle_layers, p=cfg.mixstyle_p, alpha=cfg.mixstyle_alpha,
                        mix=cfg.mixstyle_mix)
    if cfg.dsu:
        attach_dsu(model, layers=cfg.dsu_layers, p=cfg.dsu_p)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def train_one_epoch(epoch, task, models, loader, optimizer, scheduler, mixup, model_ema, state, accelerator, cfg):
    model = models[0]  # the classifier; AutoMix's module, when on, follows it (gradient accumulation)
    model.train()
    loader.set_epoch(epoch)  # the shuffle depends on (seed, epoch) only: resumable
    loss_sum = torch.zeros((), device=accelerator.device)  # stays on the device: no sync per step
    first_bad = torch.full((), -1, dtype=torch.long, device=accelerator.device)  # the first step of a non-finite loss
    images, moex_batches = 0, 0  # this process
    start = time.perf_counter()
    bar = tqdm(loader, desc=f'epoch {epoch}/{cfg.epochs}', dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_main_process))
    for step, (input, target) in enumerate(bar):
        if cfg.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            input, target = mixup(input, target)  # soft targets, pairs i with B-1-i
        with accelerator.accumulate(*models):
            result = task(input, target)  # MoEx (when drawn) + its label mixing
            accelerator.backward(result['loss'])
            if cfg.clip_grad and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            state.num_updates += 1
            if scheduler is not None:
                scheduler.step_update(state.num_updates)
            if model_ema is not None:
                model_ema.update(accelerator.unwrap_model(model, keep_torch_compile=False), step=state.num_updates)
        loss = result['loss'].detach().float()
        loss_sum += loss * input.shape[0]
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        images, moex_batches = images + input.shape[0], moex_batches + int(result.get('moex', False))
        if (step + 1) % DIVERGENCE_CHECK_STEPS == 0 or step + 1 == len(loader):
            check_finite(first_bad, epoch, accelerator, cfg, optimizer)
        if not bar.disable and step % 10 == 0:
            bar.set_postfix(loss=f'{loss_sum.item() / images:.4f}',
                            img_s=f'{images * accelerator.num_processes / (time.perf_counter() - start):.0f}')
    totals = accelerator.reduce(torch.stack([loss_sum, torch.tensor(float(images), device=loss_sum.device),
                                             torch.tensor(float(moex_batches), device=loss_sum.device)]), 'sum')
    elapsed = time.perf_counter() - start
    return {'loss': (totals[0] / totals[1]).item(), 'epoch_time': elapsed, 'img_per_sec': totals[1].item() / elapsed,
            'moex_frac': totals[2].item() / (len(loader) * accelerator.num_processes)}


# How often (in steps) the loss is checked for NaN / inf: one device sync per this many steps.
DIVERGENCE_CHECK_STEPS = 50


def check_finite(first_bad, epoch, accelerator, cfg, optimizer):
    """Raise Diverged when any process has seen a non-finite loss this epoch (a collective: every process
    calls it at the same steps)."""
    seen = accelerator.gather(first_bad.reshape(1))
    seen = seen[seen >= 0]
    if seen.numel():
        raise diverged(cfg, epoch, int(seen.min()) + 1, optimizer, 'the training loss is not finite at')


def diverged(cfg, epoch, step, optimizer, what):
    """The Diverged error: where, the lr, and the last good checkpoint to resume from."""
    last = find_latest_checkpoint(resolve_output_dir(cfg))
    where = f'epoch {epoch}' + (f', step {step}' if step is not None else '')
    todo = (f'the last good checkpoint is {last}, kept with the outputs; resume it with a lower --lr (or '
            f'--clip-grad): --resume auto --lr ...' if last is not None else
            'no checkpoint was written; start again with a lower --lr (or --clip-grad)')
    return Diverged(f'training diverged: {what} {where}', f'lr {optimizer.param_groups[0]["lr"]:g}', todo)


def trial_forward(cfg, model, accelerator):
    """One training-mode forward of min(batch_size, 2) random images at the run's image size, on the run's
    device, with the MoEx hook armed: settings that fail only in a forward (a moex_norm group count that does
    not divide the layer's channels, BatchNorm with one sample) fail now rather than at the first MoEx batch,
    hours in. Weights, buffers (BatchNorm statistics) and random states are left as they were."""
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
        reason = f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:200]}'
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


def own_run_folder(accelerator, out):
    """Lock ``out`` for this run (the main process holds the lock); every process raises RunFolderBusy when
    another run holds it. Called before anything is written into ``out``."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock(out)
        except RunError as e:
            error = e
    if accelerator.num_processes > 1:  # the other processes must stop too, not wait for the main one
        outcome = [None if error is None else (type(error).__name__, error.what, str(error.value), error.todo)]
        broadcast_object_list(outcome)
        if outcome[0] is not None and error is None:
            error = RunFolderBusy(*outcome[0][1:]) if outcome[0][0] == 'RunFolderBusy' else RunError(*outcome[0][1:])
    if error is not None:
        raise error
    return lock


def check_resume(cfg, out):
    """The saved configuration of the run being resumed and the allowed changes ((None, {}) for a new run);
    ResumeMismatch, before anything is written, when a key that shapes the model, data or optimizer state
    differs from the run folder's config.yaml."""
    if not cfg.resume:
        return None, {}
    folder = out if cfg.resume == 'auto' else Path(cfg.resume).parent
    path = next((f / 'config.yaml' for f in (folder, out) if (f / 'config.yaml').is_file()), None)
    if path is None:  # a run from before config.yaml was written: the checkpoint load checks the shapes
        return None, {}
    saved = read_run_config(path)
    changes, conflicts = resume_differences(saved, cfg)
    if conflicts:
        listed = '; '.join(f'{k} {old!r} in the run, {new!r} now' for k, (old, new) in conflicts.items())
        raise ResumeMismatch('--resume with settings that change the model, data or optimizer state',
                             f'{path}: {listed}', 'resume with the run\'s values (drop or fix these options), or '
                             'start a new run in another --output-dir')
    return saved, changes


def apply_resume(cfg, out, accelerator, checkpoints, scheduler, saved):
    """After a checkpoint is loaded: refuse fewer epochs than trained; set the rebuilt scheduler (new
    epochs / lr / schedule) to the restored update count; print the changed settings, append them to
    resume.jsonl and rewrite config.yaml (only when something is left to train)."""
    state = checkpoints.state
    saved, changes = saved
    if state.epoch > cfg.epochs:
        raise ResumeMismatch('--epochs is below what the run has trained', f'epochs {cfg.epochs}, '
                             f'{checkpoints.resumed_from} holds epoch {state.epoch}',
                             f'give --epochs {state.epoch} or more')
    if state.epoch == cfg.epochs:
        ignored = f'; ignored: {", ".join(changes)}' if changes else ''
        accelerator.print(f'{out}: all {cfg.epochs} epochs are trained, nothing to train (give --epochs above '
                          f'{cfg.epochs} to continue){ignored}')
        if accelerator.is_main_process and not (out / 'config.yaml').exists():
            save_config(cfg, out / 'config.yaml')
        return
    if scheduler is not None:
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_values):
            group[scheduler._initial_param_group_field] = base  # the checkpoint's value would be the old lr
        scheduler.step_update(state.num_updates)
    for key, (old, new) in changes.items():
        accelerator.print(f'resume: {key} {old!r} -> {new!r} from epoch {state.epoch + 1}')
    if accelerator.is_main_process:
        append_resume_record(out, dict(checkpoint=str(checkpoints.resumed_from), epoch=state.epoch,
                                       num_updates=state.num_updates,
                                       changes={k: [old, new] for k, (old, new) in changes.items()}))
        save_config(cfg, out / 'config.yaml')  # the run's identity, with the changes now in force


def main(argv=None):
    """Train as ``argv`` (default: the command line) configures; returns results.json's content (eval.json's
    with eval_only).

    Raises:
        UserError: the subclasses in timm_moex.train.errors for what the user can fix (ConfigError, RunFolderBusy,
            ResumeMismatch, CheckpointError, DataError, Diverged, Interrupted); :func:`cli` prints them as one line.
    """
    # ---- configuration (validated once; raises ConfigError before anything is written) ----
    cfg = load_config(argv)
    out = Path(resolve_output_dir(cfg))
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=cfg.log_with, project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed))
    set_seed(cfg.seed, device_specific=True)
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
    except KeyboardInterrupt:
        last = find_latest_checkpoint(out)
        raise Interrupted('interrupted (Ctrl-C)', out, (f'{last.name} is kept' if last else 'no checkpoint was '
                          'written yet') + '; run the same command with --resume auto to continue') from None
    finally:
        if lock is not None:
            lock.release(unused=failed)  # a run that failed before writing leaves no empty folder behind


def train(cfg, out, accelerator, saved):
    """The run after configuration, Accelerator and lock: data, model, optimizer, loop, outputs."""
    # ---- data ----
    train_set, eval_set, num_classes = create_datasets(cfg, accelerator.device)
    train_loader, eval_loader = create_loaders(cfg, train_set, eval_set)

    # ---- model (+ MoEx hook) ----
    model = create_model(cfg, num_classes)
    trial_forward(cfg, model, accelerator)
    if cfg.initial_checkpoint and not cfg.eval_only:  # fine-tuning: a classifier of another class count is re-initialized
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
        automix = AutoMix(model, feature_layer=parse_feature_layer(cfg.automix_feature_layer),
                          reduction=cfg.automix_reduction, lam_embed=cfg.automix_lam_embed,
                          upsample=cfg.automix_upsample, momentum=cfg.automix_momentum)
        mix_block_lr = lr if cfg.automix_lr is None else cfg.automix_lr
        for group in automix.param_groups(cfg.weight_decay, mix_block_lr=mix_block_lr):
            optimizer.add_param_group(group)  # the mixed-image head's (the model's lr), then the Mix Block's
        models = (model, automix)
    if cfg.compile:
        # After the hook (a hook added later is not traced). Static shapes: a partial last batch gets its own
        # graph instead of making every later graph dynamic in the batch size.
        model = torch.compile(model, mode=cfg.compile_mode, dynamic=False)
    *models, optimizer, train_loader, eval_loader = accelerator.prepare(
        model, *models[1:], optimizer, train_loader, eval_loader)
    model = models[0]
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, decay_epochs=cfg.decay_epochs,
        decay_milestones=cfg.decay_milestones, decay_rate=cfg.decay_rate, min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, step_on_epochs=False,
        updates_per_epoch=math.ceil(len(train_loader) / cfg.grad_accum_steps))
    mixup = create_mixup(cfg, num_classes)
    criterion = None
    if cfg.loss == 'bi_tempered':  # with Mixup, the smoothing is already in Mixup's soft targets
        criterion = BiTemperedLogisticLoss(cfg.bitempered_t1, cfg.bitempered_t2, num_iters=cfg.bitempered_iters,
                                           smoothing=0.0 if mixup is not None else cfg.smoothing)
    common = dict(criterion=criterion, device=accelerator.device, verbose=False,
                  criterion_kwargs=None if criterion is not None else dict(smoothing=cfg.smoothing,
                                                                           soft_targets=mixup is not None))
    moex = timm_moex.MoExMixing(get_moex_hook(model), prob=cfg.moex_prob, lam=cfg.moex_lam) if cfg.moex else None
    if cfg.mix == 'automix':
        accelerator.unwrap_model(models[1]).total_steps = cfg.epochs * len(train_loader)  # momentum/area schedules
        task = AutoMixTask(model, models[1], alpha=cfg.automix_alpha, lam_margin=cfg.automix_lam_margin,
                           clean_weight=cfg.automix_clean_weight, area_weight=cfg.automix_area_weight,
                           area_margin=cfg.automix_area_margin, area_decay=cfg.automix_area_decay, moex=moex,
                           **common)
    elif cfg.snapmix:
        task = SnapMixTask(model, alpha=cfg.snapmix_alpha, prob=cfg.snapmix_prob, moex=moex, **common)
    elif cfg.moex:
        task = MoExClassificationTask(model, hook=get_moex_hook(model), prob=cfg.moex_prob, lam=cfg.moex_lam,
                                      pairing='flip' if mixup is not None else 'random', **common)
    else:
        task = ClassificationTask(model, **common)
    model_ema = None
    if cfg.model_ema:
        model_ema = ModelEmaV3(accelerator.unwrap_model(model, keep_torch_compile=False),
                               decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)

    # ---- resume ----
    state = TrainState(scheduler)
    checkpoints = CheckpointManager(accelerator, out, state, keep=cfg.checkpoint_keep, model_ema=model_ema)
    start_epoch = checkpoints.resume(cfg.resume)
    if checkpoints.resumed_from is not None:
        apply_resume(cfg, out, accelerator, checkpoints, scheduler, saved)
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
                      f'mixed_precision={accelerator.mixed_precision}, output {out}')

    # ---- loop ----
    for epoch in range(start_epoch, cfg.epochs + 1):
        train_metrics = train_one_epoch(epoch, task, models, train_loader, optimizer, scheduler, mixup, model_ema,
                                        state, accelerator, cfg)
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

    # ---- outputs (+ the corruption evaluation of the final model when eval_corruptions asks for it) ----
    corruptions = corruption_robustness(cfg, model, eval_set, accelerator, out)
    return finish(cfg, out, accelerator, model, model_ema, state, classes=getattr(train_set, 'classes', None),
                  corruptions=corruptions)


def finish(cfg, out, accelerator, model, model_ema, state, classes=None, corruptions=None):
    """model.safetensors (+ model_ema.safetensors) with plain timm keys, results.json (with ``corruptions`` when
    given), and config.json + README.md for timm's local-dir: / hf-hub: loaders (pushed to the Hub with
    push_to_hub)."""
    accelerator.wait_for_everyone()
    results = None
    if accelerator.is_main_process:
        export_weights(accelerator.unwrap_model(model, keep_torch_compile=False), out / 'model.safetensors')
        if model_ema is not None:
            export_weights(model_ema.module, out / 'model_ema.safetensors')
        results = dict(model=cfg.model, dataset=cfg.dataset, epochs=cfg.epochs, moex=cfg.moex, mix=cfg.mix,
                       num_processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision,
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


def push_run(out, repo_id):
    """Publish the run folder on the Hugging Face Hub; a failed upload leaves the run complete."""
    try:
        info = push_model_folder(out, repo_id)
    except Exception as e:  # noqa: BLE001  network, authentication and Hub errors alike
        reason = (str(e).strip().splitlines() or [''])[0][:200]
        raise RunError(f'push_to_hub: the upload failed ({type(e).__name__}: {reason})', repo_id,
                       f'the run folder {out} is complete; retry with python -m timm_moex.train.model_folder {out} {repo_id}'
                       ) from None
    print(f'pushed {out} to {getattr(info, "commit_url", repo_id)}')


def evaluate_only(cfg, model, eval_set, eval_loader, accelerator, out):
    """--eval-only --checkpoint PATH: top-1 / top-5 error, NLL and ECE (+ the corruption evaluation when
    eval_corruptions asks for it), printed and written to eval.json."""
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


def _debug_requested(argv) -> bool:
    """--debug on the command line (read before the configuration, which may itself be the error) or
    TIMM_MOEX_DEBUG=1."""
    if os.environ.get('TIMM_MOEX_DEBUG', '').lower() not in ('', '0', 'false', 'no'):
        return True
    for i, arg in enumerate(argv):
        if arg == '--debug':
            return i + 1 == len(argv) or argv[i + 1].startswith('--') or argv[i + 1].lower() not in ('false', 'no', '0')
        if arg.startswith('--debug='):
            return arg.split('=', 1)[1].lower() not in ('false', 'no', '0')
    return False


def cli(argv=None) -> int:
    """Run :func:`main` as the command does: an error the user can fix is one line on stderr,
    ``train_moex.py: <what> (<the bad value>): <what to do>``, and its exit code, without a traceback
    (``--debug`` or TIMM_MOEX_DEBUG=1 shows it). Returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if {'-h', '--help'} & set(argv):
        print(config_help())
        return 0
    debug = _debug_requested(argv)
    report = os.environ.get('RANK', '0') in ('', '0')  # under DDP every process stops, one reports
    try:
        main(argv)
    except UserError as e:
        if debug:
            traceback.print_exc()
        if report:
            prefix = 'configuration error: ' if isinstance(e, ConfigError) else ''
            print(f'train_moex.py: {prefix}{e}', file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # before the run started (the run itself raises Interrupted)
        if debug:
            traceback.print_exc()
        if report:
            print('train_moex.py: interrupted (Ctrl-C) before the run started: nothing was trained; run the same '
                  'command again', file=sys.stderr)
        return Interrupted.exit_code
    return 0


if __name__ == '__main__':
    sys.exit(cli())
