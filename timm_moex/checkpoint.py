"""Checkpoints of a training run: ``accelerator.save_state`` into ``checkpoint-<epoch>`` folders.

A checkpoint folder holds what Accelerate saves (``model.safetensors``, ``optimizer.bin``, the
RNG states of every process ``random_states_<i>.pkl``, the GradScaler) plus
``custom_checkpoint_0.pkl`` (:class:`TrainState`: epoch, update count, best metric and the
timm scheduler's state, registered with ``accelerator.register_for_checkpointing``) and, with
EMA, ``model_ema.safetensors``.

Writing is atomic: every process saves into ``.checkpoint-<epoch>.tmp``, then the main process
renames the folder; a crash while saving leaves the previous checkpoints whole and at most a
``.tmp`` folder, which the next run removes. Only the last ``keep`` checkpoints are kept.

Resuming (``resume: auto`` or a folder) restores all of it, so that on CPU with a fixed seed a
run killed after epoch N and resumed gives the same metrics as the run that was not killed (the
training loader's order depends only on (seed, epoch): ``use_seedable_sampler`` and
``set_epoch``).
"""
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

__all__ = ['TrainState', 'CheckpointManager', 'list_checkpoints', 'find_latest_checkpoint', 'export_weights',
           'load_weights', 'truncate_summary']

_CHECKPOINT = re.compile(r'^checkpoint-(\d+)$')
EMA_WEIGHTS = 'model_ema.safetensors'


class TrainState:
    """The loop's counters and the timm scheduler, saved with the checkpoint.

    timm schedulers are not torch LR schedulers, so Accelerate does not save them by itself.
    """

    def __init__(self, scheduler=None):
        self.scheduler = scheduler
        self.epoch = 0  # the last completed epoch (1-based)
        self.num_updates = 0
        self.best_epoch: Optional[int] = None  # the epoch of lowest eval top-1 error so far
        self.best_metrics: Dict[str, float] = {}
        self.last_metrics: Dict[str, float] = {}

    def update_best(self, epoch: int, metrics: Dict[str, float], key: str = 'top1_err') -> bool:
        """Record an epoch's eval metrics (lower ``key`` is better); True when it is a new best."""
        self.last_metrics = dict(metrics)
        if self.best_epoch is None or metrics[key] < self.best_metrics[key]:
            self.best_epoch, self.best_metrics = epoch, dict(metrics)
            return True
        return False

    def state_dict(self) -> Dict[str, Any]:
        return dict(epoch=self.epoch, num_updates=self.num_updates, best_epoch=self.best_epoch,
                    best_metrics=self.best_metrics, last_metrics=self.last_metrics,
                    scheduler=self.scheduler.state_dict() if self.scheduler is not None else None)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch, self.num_updates = state['epoch'], state['num_updates']
        self.best_epoch, self.best_metrics = state['best_epoch'], state['best_metrics']
        self.last_metrics = state['last_metrics']
        if self.scheduler is not None and state.get('scheduler') is not None:
            self.scheduler.load_state_dict(state['scheduler'])


def list_checkpoints(output_dir: os.PathLike) -> List[Path]:
    """Complete ``checkpoint-<epoch>`` folders, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(output_dir: os.PathLike) -> Optional[Path]:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


class CheckpointManager:
    """Save / resume a run's ``checkpoint-<epoch>`` folders in ``output_dir``."""

    def __init__(self, accelerator, output_dir: os.PathLike, state: TrainState, keep: int = 2,
                 model_ema: Optional[nn.Module] = None):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.state = state
        self.keep = keep
        self.model_ema = model_ema
        accelerator.register_for_checkpointing(state)

    def save(self, epoch: int) -> Path:
        acc = self.accelerator
        final = self.output_dir / f'checkpoint-{epoch}'
        tmp = self.output_dir / f'.checkpoint-{epoch}.tmp'
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        if self.model_ema is not None and acc.is_main_process:
            save_file(_plain_state(self.model_ema.module), str(tmp / EMA_WEIGHTS))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():  # only after a resume from an older checkpoint: replace it
                old = self.output_dir / f'.checkpoint-{epoch}.old'
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            for stale in list_checkpoints(self.output_dir)[:-self.keep]:
                shutil.rmtree(stale)
        acc.wait_for_everyone()
        return final

    def resume(self, resume: str) -> int:
        """Load ``resume`` ('' = nothing, 'auto' = the latest checkpoint, if any, or a folder); the next epoch."""
        if self.accelerator.is_main_process:  # leftovers of a crash while saving
            for leftover in self.output_dir.glob('.checkpoint-*'):
                shutil.rmtree(leftover, ignore_errors=True)
        path = find_latest_checkpoint(self.output_dir) if resume == 'auto' else (Path(resume) if resume else None)
        if path is None:
            return 1
        self.accelerator.load_state(str(path))
        if self.model_ema is not None:
            ema_file = path / EMA_WEIGHTS
            if not ema_file.exists():
                raise FileNotFoundError(f'{ema_file} is missing: the checkpoint was saved without model_ema')
            self.model_ema.module.load_state_dict(load_file(str(ema_file), device=str(self.accelerator.device)))
        self.accelerator.print(f'Resumed from {path} (epoch {self.state.epoch}, {self.state.num_updates} updates)')
        return self.state.epoch + 1


def _plain_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Contiguous, unshared tensors (safetensors refuses shared storage)."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def export_weights(model: nn.Module, path: os.PathLike) -> None:
    """The plain model's weights (timm keys, no wrapper prefix) as safetensors, written atomically.

    The MoEx hook adds no keys, so the file loads into ``timm.create_model(name)``, e.g. with
    ``pretrained=True, pretrained_cfg_overlay=dict(file=path)``.
    """
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    save_file(_plain_state(model), str(tmp), metadata={'format': 'pt'})
    os.replace(tmp, path)


def load_weights(model: nn.Module, path: os.PathLike) -> None:
    """Load weights from a .safetensors file or a checkpoint folder's ``model.safetensors``."""
    path = Path(path)
    if path.is_dir():
        path = path / 'model.safetensors'
    state = load_file(str(path))
    model.load_state_dict({_strip_wrappers(k): v for k, v in state.items()})


def _strip_wrappers(key: str) -> str:
    """A plain key from a checkpoint of a DDP ('module.') or torch.compile ('_orig_mod.') model."""
    while key.startswith(('module.', '_orig_mod.')):
        key = key.split('.', 1)[1]
    return key


def truncate_summary(path: os.PathLike, last_epoch: int) -> None:
    """Keep only the rows of epochs <= ``last_epoch`` in summary.csv (after a resume), atomically."""
    import csv
    import io
    path = Path(path)
    if not path.exists():
        return
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    kept = [r for r in rows if int(r['epoch']) <= last_epoch]
    if len(kept) == len(rows):
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(kept)
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)
