"""A run's output folder over its life: one owner at a time, an honest resume, the divergence stop's advice, and
publishing the finished folder on the Hugging Face Hub.

Everything here runs before anything is written into the folder (:func:`own_run_folder`, :func:`check_resume`),
after a checkpoint is loaded (:func:`apply_resume`), or once the run is complete (:func:`push_run`).
"""
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list
from timm.scheduler.scheduler import Scheduler
from torch.optim import Optimizer

from .checkpoint import CheckpointManager, RunLock, append_resume_record, find_latest_checkpoint
from .config import TrainConfig, read_run_config, resolve_output_dir, resume_differences, save_config
from .errors import ConfigError, Diverged, ResumeMismatch, RunError, RunFolderBusy, describe
from .model_folder import push_model_folder

__all__ = ['own_run_folder', 'check_resume', 'apply_resume', 'record_resume', 'diverged', 'push_run', 'SavedRun']

SavedRun = Tuple[Optional[Dict[str, Any]], Dict[str, tuple]]
"""What :func:`check_resume` found: the run folder's saved configuration (None for a new run) and the allowed
changes, ``{key: (old, new)}``."""


def own_run_folder(accelerator: Accelerator, out: Path) -> Optional[RunLock]:
    """Lock the run folder for this run before anything is written into it.

    Args:
        accelerator: The run's Accelerator; the main process takes the lock, and under DDP every
            process learns whether it got it.
        out: The run folder.

    Returns:
        The lock on the main process, None on the others.

    Raises:
        RunFolderBusy: Another run holds the folder (on every process, so that none waits for the others).
        RunError: The folder cannot be locked (not creatable, not writable).
    """
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock(out)
        except RunError as e:
            error = e
        except OSError as e:  # not creatable or writable (the configuration's check found it writable)
            error = RunError('the run folder cannot be created or written', f'{out}: {e.strerror or e}',
                             'pass an --output-dir you can write to', exit_code=ConfigError.exit_code)
    if accelerator.num_processes > 1:  # the other processes must stop too, not wait for the main one
        outcome = [None if error is None else (type(error).__name__, error.what, str(error.value), error.todo,
                                               error.exit_code)]
        broadcast_object_list(outcome)
        if outcome[0] is not None and error is None:
            name, what, value, todo, code = outcome[0]
            error = (RunFolderBusy if name == 'RunFolderBusy' else RunError)(what, value, todo, exit_code=code)
    if error is not None:
        raise error
    return lock


def check_resume(cfg: TrainConfig, out: Path) -> SavedRun:
    """The saved configuration of the run that ``cfg.resume`` continues, and what may change.

    Args:
        cfg: The configuration of this invocation.
        out: The run folder.

    Returns:
        ``(saved, changes)``: the folder's ``config.yaml`` as a dict and ``{key: (old, new)}`` for the keys that
        may change on a resume (lr, schedule, epochs); ``(None, {})`` for a new run.

    Raises:
        ResumeMismatch: A key that shapes the model, data or optimizer state differs from the run folder's
            ``config.yaml``, or there are checkpoints to resume but no ``config.yaml`` (raised before anything is
            written).
    """
    if not cfg.resume:
        return None, {}
    folder = out if cfg.resume == 'auto' else Path(cfg.resume).parent
    path = next((f / 'config.yaml' for f in (folder, out) if (f / 'config.yaml').is_file()), None)
    new_run = cfg.resume == 'auto' and find_latest_checkpoint(out) is None
    if path is None:
        if not new_run:
            raise ResumeMismatch('--resume of a run folder without config.yaml, the run\'s settings',
                                 folder / 'config.yaml', 'restore the file, or start a new run in another --output-dir')
        saved, changes = None, {}
    else:
        saved = read_run_config(path)
        changes, conflicts = resume_differences(saved, cfg)
        if conflicts:
            listed = '; '.join(f'{k} {old!r} in the run, {new!r} now' for k, (old, new) in conflicts.items())
            raise ResumeMismatch('--resume with settings that change the model, data or optimizer state',
                                 f'{path}: {listed}', 'resume with the run\'s values (drop or fix these options), or '
                                 'start a new run in another --output-dir')
    if new_run:  # one command both starts and restarts a job; said, since a mistyped --output-dir lands here too
        PartialState().print(f'resume: auto found no checkpoint in {out}: starting a new run')
    return saved, changes


def apply_resume(cfg: TrainConfig, out: Path, accelerator: Accelerator, checkpoints: CheckpointManager,
                 scheduler: Optional[Scheduler], saved: SavedRun) -> Optional[Dict[str, Any]]:
    """Continue a run from the checkpoint that ``checkpoints`` loaded, with the settings now in force.

    Refuses fewer epochs than trained; sets the rebuilt scheduler (new epochs / lr / schedule) to the restored
    update count; prints the changed settings. They are recorded (``resume.jsonl``, ``config.yaml``) only once
    they have trained an epoch: :func:`record_resume`, with the record returned here.

    Args:
        cfg: The configuration of this invocation.
        out: The run folder.
        accelerator: The run's Accelerator.
        checkpoints: The checkpoint manager, after its ``resume``.
        scheduler: timm's scheduler, or None.
        saved: What :func:`check_resume` returned.

    Returns:
        The resume's record for :func:`record_resume`; None when nothing is left to train.

    Raises:
        ResumeMismatch: ``cfg.epochs`` is below the epochs the checkpoint has trained.
    """
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
    return dict(checkpoint=str(checkpoints.resumed_from), epoch=state.epoch, num_updates=state.num_updates,
                changes={k: [old, new] for k, (old, new) in changes.items()})


def record_resume(cfg: TrainConfig, out: Path, accelerator: Accelerator, record: Dict[str, Any]) -> None:
    """Make a resume's settings the run's: append ``record`` to ``resume.jsonl`` and rewrite ``config.yaml``.

    Called once the first resumed epoch is trained and its checkpoint saved: a resume that stops before that
    (diverged again, interrupted) trained nothing with its settings, and the run folder keeps saying what did train.

    Args:
        cfg: The configuration of this invocation.
        out: The run folder.
        accelerator: The run's Accelerator (the main process writes).
        record: What :func:`apply_resume` returned.
    """
    if accelerator.is_main_process:
        append_resume_record(out, record)
        save_config(cfg, out / 'config.yaml')  # the run's identity, with the changes now in force


def diverged(cfg: TrainConfig, epoch: int, step: Optional[int], optimizer: Optimizer, what: str) -> Diverged:
    """The error that stops a diverged run: where, the lr, and the last good checkpoint to resume from.

    Args:
        cfg: The run's configuration.
        epoch: The epoch the non-finite value appeared in.
        step: Its step within the epoch (1-based), or None for an evaluation.
        optimizer: The run's optimizer (for the lr in force).
        what: What was not finite, e.g. 'the training loss is not finite at'.

    Returns:
        The :class:`~timm_moex.train.errors.Diverged` error, to raise.
    """
    last = find_latest_checkpoint(resolve_output_dir(cfg))
    where = f'epoch {epoch}' + (f', step {step}' if step is not None else '')
    todo = (f'the last good checkpoint is {last}, kept with the outputs; resume it with a lower --lr (or '
            f'--clip-grad): --resume auto --lr ...' if last is not None else
            'no checkpoint was written; start again with a lower --lr (or --clip-grad)')
    return Diverged(f'training diverged: {what} {where}', f'lr {optimizer.param_groups[0]["lr"]:g}', todo)


def push_run(out: Path, repo_id: str) -> None:
    """Publish the finished run folder on the Hugging Face Hub.

    Args:
        out: The run folder (a timm model folder: ``config.json``, ``model.safetensors``, the card).
        repo_id: The Hub repository, ``owner/name``.

    Raises:
        RunError: The upload failed; the run folder stays complete and the message names the command that retries.
    """
    try:
        info = push_model_folder(out, repo_id)
    except Exception as e:  # noqa: BLE001  network, authentication and Hub errors alike
        raise RunError(f'push_to_hub: the upload failed ({describe(e)})', repo_id,
                       f'the run folder {out} is complete; retry with python -m timm_moex.train.model_folder {out} '
                       f'{repo_id}') from None
    print(f'pushed {out} to {getattr(info, "commit_url", repo_id)}')
