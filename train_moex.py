#!/usr/bin/env python3
"""Train a timm model with Moment Exchange (MoEx), with Accelerate for devices and precision.

    accelerate launch train_moex.py --config hparams/cifar100_pyramidnet200_moex.yaml
    python train_moex.py --config hparams/quickstart.yaml --epochs 5      # the command line wins
    python train_moex.py --config hparams/quickstart.yaml --eval-only --checkpoint PATH
    python train_moex.py --help                                          # every key

The script reads top to bottom: configuration, Accelerator, data, model (+ MoEx hook),
optimizer, prepare, scheduler / task / EMA, then the loop, which writes per epoch a row of
summary.csv and a checkpoint-<epoch> folder, and at the end model.safetensors (+
model_ema.safetensors) and results.json, all in the run's output folder.

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
import sys
import time
import warnings
from pathlib import Path

import timm
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import ClassificationTask
from timm.utils import ModelEmaV3, update_summary
from tqdm import tqdm

import timm_moex  # noqa: F401  (registers the package's models with timm)
from timm_moex import AutoMix, AutoMixTask, BiTemperedLogisticLoss, MoExClassificationTask, SnapMixTask, \
    attach_moex, get_moex_hook
from timm_moex.automix import parse_feature_layer
from timm_moex.checkpoint import CheckpointManager, TrainState, export_weights, load_weights, truncate_summary
from timm_moex.config import ConfigError, atomic_write_text, config_help, load_config, resolve_output_dir, \
    save_config
from timm_moex.data import create_datasets, create_loaders, create_mixup
from timm_moex.metrics import evaluate


def create_model(cfg, num_classes):
    """A timm model, SyncBatchNorm and the MoEx hook (attached before compile and prepare), channels_last."""
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
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def train_one_epoch(epoch, task, models, loader, optimizer, scheduler, mixup, model_ema, state, accelerator, cfg):
    model = models[0]  # the classifier; AutoMix's module, when on, follows it (gradient accumulation)
    model.train()
    loader.set_epoch(epoch)  # the shuffle depends on (seed, epoch) only: resumable
    loss_sum = torch.zeros((), device=accelerator.device)  # stays on the device: no sync per step
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
        loss_sum += result['loss'].detach().float() * input.shape[0]
        images, moex_batches = images + input.shape[0], moex_batches + int(result.get('moex', False))
        if not bar.disable and step % 10 == 0:
            bar.set_postfix(loss=f'{loss_sum.item() / images:.4f}',
                            img_s=f'{images * accelerator.num_processes / (time.perf_counter() - start):.0f}')
    totals = accelerator.reduce(torch.stack([loss_sum, torch.tensor(float(images), device=loss_sum.device),
                                             torch.tensor(float(moex_batches), device=loss_sum.device)]), 'sum')
    elapsed = time.perf_counter() - start
    return {'loss': (totals[0] / totals[1]).item(), 'epoch_time': elapsed, 'img_per_sec': totals[1].item() / elapsed,
            'moex_frac': totals[2].item() / (len(loader) * accelerator.num_processes)}


def main(argv=None):
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

    # ---- data ----
    train_set, eval_set, num_classes = create_datasets(cfg, accelerator.device)
    train_loader, eval_loader = create_loaders(cfg, train_set, eval_set)

    # ---- model (+ MoEx hook) ----
    model = create_model(cfg, num_classes)
    if cfg.eval_only:
        return evaluate_only(cfg, model, eval_loader, accelerator, out)
    if accelerator.is_main_process:
        save_config(cfg, out / 'config.yaml')  # the effective configuration

    # ---- optimizer, prepare, scheduler, task, EMA ----
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum_steps
    lr = cfg.lr if cfg.lr is not None else cfg.lr_base * global_batch / cfg.lr_base_size
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, **cfg.opt_kwargs)
    models = (model,)
    if cfg.mix == 'automix':  # the Mix Block + momentum encoder: a second prepared module, its own param group
        automix = AutoMix(model, feature_layer=parse_feature_layer(cfg.automix_feature_layer),
                          reduction=cfg.automix_reduction, lam_embed=cfg.automix_lam_embed,
                          upsample=cfg.automix_upsample, momentum=cfg.automix_momentum)
        optimizer.add_param_group(dict(params=list(automix.mix_block.parameters()), weight_decay=cfg.weight_decay,
                                       lr=lr if cfg.automix_lr is None else cfg.automix_lr))
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
    if cfg.mix == 'automix':
        accelerator.unwrap_model(models[1]).total_steps = cfg.epochs * len(train_loader)  # momentum/area schedules
        task = AutoMixTask(model, models[1], alpha=cfg.automix_alpha, lam_margin=cfg.automix_lam_margin,
                           clean_weight=cfg.automix_clean_weight, area_weight=cfg.automix_area_weight,
                           area_margin=cfg.automix_area_margin, area_decay=cfg.automix_area_decay,
                           hook=get_moex_hook(model) if cfg.moex else None, moex_prob=cfg.moex_prob,
                           moex_lam=cfg.moex_lam, **common)
    elif cfg.snapmix:
        task = SnapMixTask(model, alpha=cfg.snapmix_alpha, prob=cfg.snapmix_prob,
                           hook=get_moex_hook(model) if cfg.moex else None, moex_prob=cfg.moex_prob,
                           moex_lam=cfg.moex_lam, **common)
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

    # ---- outputs ----
    return finish(cfg, out, accelerator, model, model_ema, state)


def finish(cfg, out, accelerator, model, model_ema, state):
    """model.safetensors (+ model_ema.safetensors) with plain timm keys, and results.json."""
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
        atomic_write_text(out / 'results.json', json.dumps(results, indent=2))
        print(f'last epoch {state.epoch}: top-1 err {state.last_metrics["top1_err"]:.2f}%, top-5 err '
              f'{state.last_metrics["top5_err"]:.2f}% | best epoch {state.best_epoch}: top-1 err '
              f'{state.best_metrics["top1_err"]:.2f}% | {out}')
    accelerator.end_training()
    return results


def evaluate_only(cfg, model, eval_loader, accelerator, out):
    """--eval-only --checkpoint PATH: top-1 / top-5 error, NLL and ECE, printed and written to eval.json."""
    load_weights(model, cfg.checkpoint)
    model, eval_loader = accelerator.prepare(model, eval_loader)
    metrics = evaluate(model, eval_loader, accelerator, cfg.channels_last)
    metrics = dict(checkpoint=str(cfg.checkpoint), top1_err=metrics['top1_err'], top5_err=metrics['top5_err'],
                   nll=metrics['loss'], ece=metrics['ece'], count=metrics['count'])
    if accelerator.is_main_process:
        atomic_write_text(out / 'eval.json', json.dumps(metrics, indent=2))
        print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == '__main__':
    if {'-h', '--help'} & set(sys.argv[1:]):
        print(config_help())
        sys.exit(0)
    try:
        main()
    except ConfigError as e:
        print(f'train_moex.py: configuration error: {e}', file=sys.stderr)
        sys.exit(2)
