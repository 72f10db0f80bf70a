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
``set_epoch``). The scheduler is the exception: timm schedulers compute the lr from the update
count alone, so the run rebuilds its scheduler from the (possibly changed) configuration and
sets it to the restored update count; the scheduler state in a checkpoint is kept for reference
only. ``resume: auto`` skips a damaged latest checkpoint (truncated or unreadable files) with a
warning and takes the one before it.

:class:`RunLock` makes one process the owner of a run folder: an OS lock on ``.lock`` that the
operating system releases when the process ends, however it ends.
"""
import argparse
import datetime
import json
import os
import pickle
import re
import shutil
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ResumeMismatch, RunFolderBusy, describe, first_line
from .files import atomic_path, atomic_write_text

__all__ = ['TrainState', 'CheckpointManager', 'RunLock', 'LOCK_FILE', 'RESUME_RECORD', 'append_resume_record',
           'read_resume_records', 'list_checkpoints', 'find_latest_checkpoint', 'export_weights',
           'load_weights', 'load_initial_weights', 'read_weights', 'truncate_summary']

_CHECKPOINT = re.compile(r'^checkpoint-(\d+)$')
EMA_WEIGHTS = 'model_ema.safetensors'
LOCK_FILE = '.lock'
RESUME_RECORD = 'resume.jsonl'
# What a truncated, empty or half-written checkpoint file raises when read: such a checkpoint is damaged and
# ``resume: auto`` falls back to the one before it. (A size mismatch, another model's weights, is not damage.)
_DAMAGE = (SafetensorError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, FileNotFoundError, IsADirectoryError)


class RunLock:
    """An exclusive, non-blocking OS lock on ``<run folder>/.lock``, held until :meth:`release` or the
    process ends (the OS drops it, so a killed run leaves no stale lock).

    POSIX uses ``fcntl.flock``; Windows ``msvcrt.locking`` on a byte past the PID, so that the PID stays
    readable. The holder's PID is written into the file once locked.

    Args:
        folder: the run folder; created if missing.

    Raises:
        RunFolderBusy: another live process holds the lock.
    """

    def __init__(self, folder: os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: Optional[int] = None
        self.created = not self.folder.exists()  # by this lock: removed again by release(unused=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                holder = _read_pid(fd)
                os.close(fd)
                raise RunFolderBusy('the run folder is in use by another training process',
                                    f'{self.folder}, PID {holder or "unknown"}',
                                    'wait for it to finish (or stop it), or pass another --output-dir')
            # The file may have been removed and recreated between open and lock: then this lock guards
            # nothing; lock the new file instead.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f'{os.getpid()}\n'.encode())
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, unused: bool = False) -> None:
        """Drop the lock.

        Args:
            unused: the run stopped before writing anything: remove the folder too when this lock created it
                and it holds nothing but the lock file. (Otherwise the file stays; a process that opened it
                before its removal finds it replaced, see the check in ``__init__``.)
        """
        if self._fd is not None and unused and self.created:
            try:
                if [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
                    self.path.unlink()
                    self.folder.rmdir()
            except OSError:  # another process wrote into it meanwhile: leave it
                pass
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock / msvcrt lock
            self._fd = None


if sys.platform == 'win32':
    import msvcrt

    _LOCK_OFFSET = 1 << 20  # a byte far past the PID text, so that readers can still read the PID

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, _LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False


def _read_pid(fd: int) -> Optional[int]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode(errors='replace').strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def append_resume_record(output_dir: os.PathLike, record: Dict[str, Any]) -> None:
    """Append one JSON line, stamped with the UTC time, to the run folder's resume record.

    Args:
        output_dir: The run folder, which must exist.
        record: The JSON-serializable fields of the line, written after ``time``.
    """
    record = dict(time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'), **record)
    with open(Path(output_dir) / RESUME_RECORD, 'a') as f:
        f.write(json.dumps(record) + '\n')
        f.flush()
        os.fsync(f.fileno())


def read_resume_records(output_dir: os.PathLike) -> List[Dict[str, Any]]:
    """The run folder's resume records, oldest first; a line cut by a crash is skipped.

    Args:
        output_dir: The run folder.

    Returns:
        One dict per record; [] when the run was never resumed.
    """
    path = Path(output_dir) / RESUME_RECORD
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash while appending
            continue
    return records


class TrainState:
    """The loop's counters and the timm scheduler, saved with the checkpoint.

    timm schedulers are not torch LR schedulers, so Accelerate does not save them by itself.

    Args:
        scheduler: The run's timm scheduler, whose state is saved (for reference: loading does not
            restore it); None saves none.
    """

    def __init__(self, scheduler=None):
        self.scheduler = scheduler
        self.epoch = 0  # the last completed epoch (1-based)
        self.num_updates = 0
        self.best_epoch: Optional[int] = None  # the epoch of lowest eval top-1 error so far
        self.best_metrics: Dict[str, float] = {}
        self.last_metrics: Dict[str, float] = {}

    def update_best(self, epoch: int, metrics: Dict[str, float], key: str = 'top1_err') -> bool:
        """Record an epoch's eval metrics (lower ``key`` is better).

        Args:
            epoch: The epoch evaluated.
            metrics: Its eval metrics; they become ``last_metrics``.
            key: The metric compared, lower being better.

        Returns:
            True when it is a new best (always for the first epoch recorded).
        """
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
        # The scheduler's saved state is not restored: it holds the planned length and base lr of the run that
        # saved it, which would override a changed --epochs / --lr. The run sets its own to num_updates.
        self.last_metrics = state['last_metrics']


def list_checkpoints(output_dir: os.PathLike) -> List[Path]:
    """The ``checkpoint-<epoch>`` folders of a run, oldest first (not the ``.tmp`` folders of unfinished saves).

    Args:
        output_dir: The run folder.

    Returns:
        The folders, by epoch; [] when the run folder does not exist.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(output_dir: os.PathLike) -> Optional[Path]:
    """The last of :func:`list_checkpoints`.

    Args:
        output_dir: The run folder.

    Returns:
        The ``checkpoint-<epoch>`` folder of the highest epoch, or None when there is none.
    """
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


class CheckpointManager:
    """Save / resume a run's ``checkpoint-<epoch>`` folders in ``output_dir``; every process makes one.

    Args:
        accelerator: The run's Accelerator; ``state`` is registered with it for checkpointing.
        output_dir: The run folder.
        state: The loop's counters, saved and restored with each checkpoint.
        keep: How many of the latest checkpoints are kept after a save (0 keeps them all).
        model_ema: The timm EMA wrapper, whose ``module`` is saved as ``model_ema.safetensors``; None
            without EMA.
    """

    def __init__(self, accelerator, output_dir: os.PathLike, state: TrainState, keep: int = 2,
                 model_ema: Optional[nn.Module] = None):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.state = state
        self.keep = keep
        self.model_ema = model_ema
        accelerator.register_for_checkpointing(state)

    def save(self, epoch: int) -> Path:
        """Save the run as ``checkpoint-<epoch>`` atomically, then keep only the last ``keep``; every process calls it.

        Args:
            epoch: The epoch just completed; an existing folder of that epoch is replaced.

        Returns:
            The checkpoint folder.
        """
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
        """Load ``resume`` ('' = nothing, 'auto' = the latest checkpoint, if any, or a folder); the next epoch.

        With 'auto', a damaged checkpoint (empty, truncated or missing files) is skipped, with a warning, for
        the one before it. ``resumed_from`` is then the folder loaded (None when nothing was).

        Args:
            resume: '' (start fresh), 'auto' or a ``checkpoint-<epoch>`` folder.

        Returns:
            The epoch to train next: 1 when nothing was loaded.

        Raises:
            CheckpointError: the checkpoint cannot be read or does not fit the model (another model or class
                count), or every checkpoint is damaged.
            ResumeMismatch: the run has EMA and the checkpoint was saved without it.
        """
        if self.accelerator.is_main_process:  # leftovers of a crash while saving
            for leftover in self.output_dir.glob('.checkpoint-*'):
                shutil.rmtree(leftover, ignore_errors=True)
        self.resumed_from = None
        candidates = list(reversed(list_checkpoints(self.output_dir))) if resume == 'auto' else \
            ([Path(resume)] if resume else [])
        for i, path in enumerate(candidates):
            try:
                try:
                    self._load(path)
                except RuntimeError as e:  # torch.load says so for a truncated file, load_state_dict for a misfit
                    if _is_misfit(e):
                        raise
                    raise EOFError(first_line(e)) from e
            except _DAMAGE as e:
                reason = describe(e)
                if i + 1 < len(candidates):
                    warnings.warn(f'{path} is damaged ({reason}); resuming from {candidates[i + 1]} instead')
                    continue
                raise CheckpointError('the checkpoint is damaged (empty, truncated or missing files)',
                                      f'{path}: {reason}', 'resume from an older checkpoint-<epoch> folder, or start '
                                      'a new run in another --output-dir') from e
            except RuntimeError as e:  # load_state_dict: missing / unexpected keys, other shapes
                raise CheckpointError('the checkpoint does not fit this model (another model, class count or '
                                      'settings)', f'{path}: {_mismatch_line(e)}',
                                      'resume with the settings the checkpoint was trained with') from e
            self.accelerator.print(f'Resumed from {path} (epoch {self.state.epoch}, {self.state.num_updates} '
                                   'updates)')
            self.resumed_from = path
            return self.state.epoch + 1
        return 1

    def _load(self, path: Path) -> None:
        if not (path / 'custom_checkpoint_0.pkl').is_file():
            raise FileNotFoundError(f'{path} holds no custom_checkpoint_0.pkl: not a complete checkpoint-<epoch> '
                                    'folder')
        self.accelerator.load_state(str(path))
        if self.model_ema is not None:
            ema_file = path / EMA_WEIGHTS
            if not ema_file.exists():
                raise ResumeMismatch('the checkpoint was saved without model_ema', str(ema_file),
                               'resume with --model-ema false, as the run was trained')
            self.model_ema.module.load_state_dict(load_file(str(ema_file), device=str(self.accelerator.device)))


def _is_misfit(e: RuntimeError) -> bool:
    return any(k in str(e) for k in ('loading state_dict', 'size mismatch', 'Missing key', 'Unexpected key'))


def _mismatch_line(e: BaseException) -> str:
    """The informative line of a load_state_dict error (its first line only names the model class)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keys = ('size mismatch', 'Missing key', 'Unexpected key')
    return next((ln for ln in lines if any(k in ln for k in keys)), lines[0] if lines else type(e).__name__)[:300]


def _plain_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Contiguous, unshared tensors (safetensors refuses shared storage)."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def export_weights(model: nn.Module, path: os.PathLike) -> None:
    """The plain model's weights (timm keys, no wrapper prefix) as safetensors, written atomically.

    The MoEx hook adds no keys, so the file loads into ``timm.create_model(name)``, e.g. with
    ``pretrained=True, pretrained_cfg_overlay=dict(file=path)``.

    Args:
        model: The plain model (no Accelerate / DDP / compile wrapper).
        path: The file to write or replace.
    """
    with atomic_path(path) as tmp:
        save_file(_plain_state(model), str(tmp), metadata={'format': 'pt'})


def load_weights(model: nn.Module, path: os.PathLike, key: str = 'checkpoint') -> str:
    """Load every weight of ``model`` from ``path`` (any file :func:`read_weights` takes).

    Args:
        model: The model (plain, no wrapper); the MoEx hook adds no keys.
        path: A weights file or a folder holding one.
        key: The setting that named ``path``, for the error message.

    Returns:
        What was loaded, one line.

    Raises:
        CheckpointError: The file cannot be read or does not fit ``model`` (missing, unexpected or
            differently shaped tensors).
    """
    state, where = read_weights(path, key=key)
    missing, unexpected, reshaped = _compare(model, state)
    if missing or unexpected or reshaped:
        raise _misfit(model, path, key, state, missing, unexpected, reshaped)
    model.load_state_dict(state)
    return f'{key}: loaded {len(state)} tensors from {path}{where}'


def load_initial_weights(model: nn.Module, path: os.PathLike, key: str = 'initial_checkpoint') -> str:
    """Start weights for fine-tuning: as :func:`load_weights`, except that a classifier of another
    class count is dropped and keeps the model's fresh initialization, as timm does for pretrained heads.

    The classifier is the module named by ``model.pretrained_cfg['classifier']`` (timm's field; else
    the module ``model.get_classifier()`` returns).

    Args:
        model: The model (plain, no wrapper).
        path: A weights file or a folder holding one (see :func:`read_weights`).
        key: The setting that named ``path``, for the messages.

    Returns:
        What was loaded and what was dropped, one line.

    Raises:
        CheckpointError: The file cannot be read, holds tensors the model lacks, or tensors outside
            the classifier are missing or differently shaped.
    """
    state, where = read_weights(path, key=key)
    heads = _classifier_prefixes(model)
    missing, unexpected, reshaped = _compare(model, state)
    in_head = lambda k: any(k.startswith(p) for p in heads)  # noqa: E731
    dropped = [k for k in reshaped if in_head(k)]
    reset = [k for k in missing if in_head(k)]
    missing = [k for k in missing if not in_head(k)]
    reshaped = [k for k in reshaped if not in_head(k)]
    if missing or unexpected or reshaped:
        raise _misfit(model, path, key, state, missing, unexpected, reshaped)
    shapes = {k: _shape(state[k]) for k in dropped}
    own = model.state_dict()
    for k in dropped:
        del state[k]
    model.load_state_dict(state, strict=False)
    msg = f'{key}: loaded {len(state)} tensors from {path}{where}'
    if dropped or reset:
        details = [f'{k} ({shapes[k]} in the file, {_shape(own[k])} here)' for k in dropped] + \
                  [f'{k} (not in the file)' for k in reset]
        msg += f'; classifier re-initialized: {", ".join(details)}'
    return msg


def read_weights(path: os.PathLike, key: str = 'checkpoint') -> Tuple[Dict[str, torch.Tensor], str]:
    """The plain state dict held by any weights file timm's loaders take.

    Accepted: safetensors files; ``torch.save`` files (``.pth``, ``.pth.tar``, ``.bin``, ...) of a
    state dict, or of a dict holding one under ``state_dict``, ``model``, ``state_dict_ema`` or
    ``model_ema`` (the first present, in that order), read with ``weights_only=True``; a folder holding
    ``model.safetensors`` (a run folder, a ``checkpoint-<epoch>`` folder, a timm model folder) or
    ``pytorch_model.bin``. The file type is read from its first bytes, not its name. Key prefixes of
    DataParallel / DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) are removed.

    Args:
        path: The file or folder.
        key: The setting that named ``path``, for the error message.

    Returns:
        (state dict, where in the file it was: '' or " (key 'state_dict')").

    Raises:
        CheckpointError: The path holds no weights, cannot be read, or is not a weights file.
    """
    path = Path(path)
    todo = ('give a .safetensors file, a torch.save file (.pth, .pth.tar, .bin) of a state dict or of a dict '
            "with 'state_dict' / 'model' / 'state_dict_ema', or a folder holding model.safetensors")
    if path.is_dir():
        found = [path / n for n in _FOLDER_FILES if (path / n).is_file()]
        if not found:
            raise CheckpointError(f'{key}: the folder holds none of {", ".join(_FOLDER_FILES)}', path, todo)
        path = found[0]
    if not path.is_file():
        raise CheckpointError(f'{key}: no such file', path, todo)
    with open(path, 'rb') as f:
        head = f.read(9)
    try:
        if len(head) == 9 and head[8:9] == b'{':  # safetensors: an 8-byte header length, then JSON
            obj = load_file(str(path))
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):  # timm's train.py saves its args
                obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001  torch and safetensors raise many types for a foreign or truncated file
        what, advice = _unreadable(path, head, e)
        raise CheckpointError(f'{key}: cannot read the file as weights: {what}', path, advice or todo) from None
    where = ''
    if isinstance(obj, dict) and not _is_state_dict(obj):
        found = next((k for k in _STATE_KEYS if isinstance(obj.get(k), dict)), None)
        if found is None:
            names = ', '.join(repr(k) for k in list(obj)[:8])
            raise CheckpointError(f'{key}: the file holds no state dict (its keys: {names})', path, todo)
        obj, where = obj[found], f' (key {found!r})'
    if not isinstance(obj, dict) or not obj or not _is_state_dict(obj):
        raise CheckpointError(f'{key}: the file holds no tensors by parameter name ({type(obj).__name__})', path,
                              todo)
    return {_strip_wrappers(k): v for k, v in obj.items()}, where


_FOLDER_FILES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')
_STATE_KEYS = ('state_dict', 'model', 'state_dict_ema', 'model_ema')


def _is_state_dict(obj: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


_TORCH_LEGACY = b'\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19'  # torch.save's legacy format: its pickled magic number
_REFUSED_GLOBAL = re.compile(r'Unsupported global: GLOBAL (\S+)')


def _unreadable(path: Path, head: bytes, e: BaseException) -> Tuple[str, Optional[str]]:
    """(what is wrong, what to do or None for the usual advice) for a file torch.load or safetensors refused,
    told from its first bytes rather than from the loaders' messages (which run to paragraphs)."""
    again = 'copy or download the file again'
    if not head:
        return 'the file is empty', again
    refused = _REFUSED_GLOBAL.search(str(e))
    if refused:
        return (f'the file holds Python objects that weights_only=True refuses ({refused.group(1)})',
                'load it in a trusted session and re-save its state dict with torch.save')
    if len(head) == 9 and head[8:9] == b'{':
        return f'a truncated or damaged safetensors file ({describe(e)})', again
    if head.startswith(b'PK\x03\x04'):  # torch.save's zip archive
        if not zipfile.is_zipfile(path):
            return 'a truncated or damaged archive (its end, the zip directory, is missing)', again
        return f'a zip archive that torch.load cannot read ({describe(e)}): damaged, or not written by torch.save', None
    if head.startswith(_TORCH_LEGACY[:len(head)]):
        return f'a truncated or damaged torch.save file ({describe(e)})', again
    return 'not a PyTorch checkpoint (torch.save) nor a safetensors file', None


def _shape(t: torch.Tensor) -> str:
    return 'x'.join(map(str, t.shape)) or 'scalar'


def _compare(model: nn.Module, state: Dict[str, torch.Tensor]) -> Tuple[List[str], List[str], List[str]]:
    """(missing, unexpected, differently shaped) keys of ``state`` against ``model``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and state[k].shape != own[k].shape]
    return missing, unexpected, reshaped


def _classifier_prefixes(model: nn.Module) -> List[str]:
    names = getattr(model, 'pretrained_cfg', {}).get('classifier')
    names = [names] if isinstance(names, str) else list(names or [])
    if not names and hasattr(model, 'get_classifier'):
        head = model.get_classifier()
        names = [n for n, m in model.named_modules() if m is head and n]
    return [n + '.' for n in names]


def _misfit(model, path, key, state, missing, unexpected, reshaped) -> CheckpointError:
    own = model.state_dict()
    parts = []
    for label, keys in (('missing', missing), ('unexpected', unexpected)):
        if keys:
            parts.append(f'{len(keys)} {label} ({", ".join(keys[:3])}{", ..." if len(keys) > 3 else ""})')
    if reshaped:
        shown = ', '.join(f'{k}: {_shape(state[k])} in the file, {_shape(own[k])} here' for k in reshaped[:3])
        parts.append(f'{len(reshaped)} of another shape ({shown}{", ..." if len(reshaped) > 3 else ""})')
    todo = 'use the --model (and --num-classes) the file was trained with'
    if key != 'initial_checkpoint':
        todo += '; to fine-tune on another class count use --initial-checkpoint'
    return CheckpointError(f'{key}: the weights do not fit {type(model).__name__}: {"; ".join(parts)}', path, todo)


def _strip_wrappers(key: str) -> str:
    """A plain key from a checkpoint of a DataParallel / DDP ('module.') or torch.compile ('_orig_mod.') model."""
    while key.startswith(('module.', '_orig_mod.')):
        key = key.split('.', 1)[1]
    return key


def truncate_summary(path: os.PathLike, last_epoch: int) -> None:
    """Keep only the rows of epochs <= ``last_epoch`` in summary.csv (after a resume), atomically.

    Args:
        path: The summary.csv; nothing happens when it does not exist.
        last_epoch: The last epoch whose row is kept.
    """
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
    atomic_write_text(path, buf.getvalue())
