"""A run folder that can be trusted: one owner, honest resumes, divergence stopped, one-line user errors.

Runs are tiny (16 training images, 8 evaluated, batch 8: two steps an epoch) and in-process where the
behaviour allows it; the one-line form of errors is checked through ``train_moex.cli`` (what the command
runs), with a few real subprocesses where a second process or a signal is the point.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file

import timm_moex
import train_moex
from accelerate import Accelerator
from timm_moex.train import builders, run_folder
from timm_moex.train.checkpoint import LOCK_FILE, RESUME_RECORD, RunLock, read_weights
from timm_moex.train import CheckpointError, ConfigError, DataError, Diverged, Interrupted, ResumeMismatch, RunError, \
    RunFolderBusy, load_config, save_config
from timm_moex.train.errors import Terminated, UnreadableImage
from timm_moex.train.metrics import ClassificationMeter

from helpers import ROOT, make_image_folder, read_summary

SMALL = ['--train-limit', '16', '--eval-limit', '8']


@pytest.fixture
def args(run_args):
    """run_args on 16 training / 8 evaluation images, one epoch unless told otherwise."""
    def make(*extra, out):
        return run_args('--epochs', '1', *SMALL, *extra, out=out)
    return make


def one_line_error(capsys, argv, code):
    """Run the command in-process; it must exit with ``code`` and print exactly one line, no traceback."""
    assert train_moex.cli(argv) == code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and 'Warning' not in ln and not ln.startswith('  ')]
    assert len(lines) == 1 and lines[0].startswith('train_moex.py: '), err
    assert 'Traceback' not in err, err
    return lines[0]


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


# ---- one owner per run folder ----

HOLD = 'import sys, time; from timm_moex.train.checkpoint import RunLock; RunLock(sys.argv[1]); print("locked", flush=True); ' \
       'time.sleep(300)'


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == 'win32', reason='SIGKILL')
def test_a_second_process_on_a_held_run_folder_stops_at_once(args, tmp_path, capsys):
    out = tmp_path / 'run'
    holder = subprocess.Popen([sys.executable, '-c', HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == 'locked'
        assert (out / LOCK_FILE).read_text().strip() == str(holder.pid)
        line = one_line_error(capsys, args(out=out), RunFolderBusy.exit_code)
        assert str(out) in line and f'PID {holder.pid}' in line and '--output-dir' in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the refused run wrote nothing
        with pytest.raises(RunFolderBusy):  # --resume auto too: it would write the same epochs twice
            train_moex.main(args('--resume', 'auto', out=out))
    finally:
        holder.kill()  # SIGKILL: the OS drops the lock with the process, no stale marker
        holder.wait()
    RunLock(out).release()
    results = train_moex.main(args(out=out))
    assert results['last']['epoch'] == 1


@pytest.mark.slow
def test_the_command_reports_a_busy_folder_in_one_line(args, tmp_path):
    """The real command, not cli() in-process: exit code, one line on stderr, no traceback."""
    out = tmp_path / 'run'
    lock = RunLock(out)  # this process holds it: the command is the second process
    try:
        proc = subprocess.run([sys.executable, str(ROOT / 'train_moex.py'), *args(out=out)], capture_output=True,
                              text=True, timeout=300)
    finally:
        lock.release()
    assert proc.returncode == RunFolderBusy.exit_code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f'train_moex.py: the run folder is in use by another training process ({out}, PID {os.getpid()})'
                     ': wait for it to finish (or stop it), or pass another --output-dir'], proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != 'linux', reason='gloo DDP on CPU tested on Linux')
def test_a_ddp_run_on_a_held_folder_stops_every_process(args, tmp_path):
    """Under DDP the main process takes the lock; the run stops at once instead of waiting at a barrier."""
    out = tmp_path / 'run'
    lock = RunLock(out)
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0',
           str(ROOT / 'train_moex.py'), *args(out=out)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        lock.release()
    busy = f'train_moex.py: the run folder is in use by another training process ({out}, PID {os.getpid()})'
    # The main rank says it in one line and exits with the busy code; the launcher then stops the other rank
    # (which would otherwise stop by itself with the same line), so the launch ends instead of hanging.
    assert proc.returncode != 0
    assert busy in proc.stderr, proc.stderr[-3000:]
    assert f'exitcode  : {RunFolderBusy.exit_code} ' in proc.stderr, proc.stderr[-3000:]
    # (the launcher's own ChildFailedError traceback follows; none comes from the script)
    assert not [ln for ln in proc.stderr.splitlines() if ln.strip().startswith('File ') and 'moex' in ln], proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


@pytest.mark.slow
def test_a_failed_start_leaves_no_folder_behind(args, tmp_path, capsys):
    out = tmp_path / 'never'
    one_line_error(capsys, args('--batch-size', '64', out=out), DataError.exit_code)  # 16 images
    assert not out.exists()


# ---- honest resume ----

def _finished_run(out, image_folder):
    train_moex.main(['--dataset', 'imagefolder', '--data-dir', str(image_folder), '--model', 'resnet10t',
                     '--epochs', '1', *SMALL, '--batch-size', '8', '--workers', '0', '--lr', '0.05', '--seed', '0',
                     '--sched', 'constant', '--output-dir', str(out), '--progress', 'false'])
    return out


@pytest.fixture
def finished(image_folder, tmp_path):
    """A finished one-epoch run (constant lr 0.05) of the ``args`` settings."""
    return _finished_run(tmp_path / 'done', image_folder)


@pytest.fixture(scope='module')
def finished_once(image_folder, tmp_path_factory):
    """The same, shared by the tests that must leave it untouched."""
    return _finished_run(tmp_path_factory.mktemp('finished') / 'done', image_folder)


@pytest.mark.slow
@pytest.mark.parametrize('extra', [['--model', 'resnet18'], ['--num-classes', '3'],  # the model
                                   ['--img-size', '48'], ['--train-limit', '12'], ['--moex'],  # data and method
                                   ['--opt', 'adamw'], ['--weight-decay', '5e-4'], ['--batch-size', '4']],  # optimizer
                         ids=['model', 'num_classes', 'img_size', 'train_limit', 'moex', 'opt', 'weight_decay',
                              'batch_size'])
def test_resume_refuses_changed_identity_before_writing(extra, finished_once, args, capsys):
    finished = finished_once
    before = snapshot(finished)
    line = one_line_error(capsys, args('--sched', 'constant', '--epochs', '2', '--resume', 'auto', *extra,
                                       out=finished), ResumeMismatch.exit_code)
    key = extra[0][2:].replace('-', '_')
    assert f'{key} ' in line and 'config.yaml' in line and '--output-dir' in line
    assert snapshot(finished) == before  # config.yaml, checkpoints, results: untouched


@pytest.mark.slow
def test_resume_with_changed_lr_and_epochs_trains_with_them(finished, args):
    """--lr and --epochs take effect (the restored scheduler state used to keep the old ones), are printed,
    recorded in resume.jsonl and config.yaml, and results.json says what trained."""
    before = load_file(str(finished / 'checkpoint-1' / 'model.safetensors'))
    results = train_moex.main(args('--sched', 'constant', '--epochs', '2', '--lr', '0.02', '--resume', 'auto',
                                   out=finished))
    rows = read_summary(finished)
    assert [float(r['lr']) for r in rows] == pytest.approx([0.05, 0.02])
    groups = torch.load(finished / 'checkpoint-2' / 'optimizer.bin', weights_only=False)['param_groups']
    assert groups[0]['lr'] == pytest.approx(0.02) and groups[0]['initial_lr'] == pytest.approx(0.02)
    records = [json.loads(ln) for ln in (finished / RESUME_RECORD).read_text().splitlines()]
    assert len(records) == 1 and records[0]['epoch'] == 1
    assert records[0]['changes'] == {'epochs': [1, 2], 'lr': [0.05, 0.02]}
    assert yaml.safe_load((finished / 'config.yaml').read_text())['lr'] == 0.02
    assert results['epochs'] == 2 and results['resumes'] == [dict(epoch=1, changes=records[0]['changes'])]
    after = load_file(str(finished / 'model.safetensors'))
    assert not torch.equal(before['fc.weight'], after['fc.weight'])
    before = snapshot(finished)
    with pytest.raises(ResumeMismatch, match=r'--epochs is below what the run has trained .*give --epochs 2 or more'):
        train_moex.main(args('--sched', 'constant', '--lr', '0.02', '--resume', 'auto', out=finished))  # 1 epoch
    assert snapshot(finished) == before


@pytest.mark.slow
def test_resume_of_a_finished_run_trains_nothing_and_records_nothing(finished, args, capsys):
    results_before = (finished / 'results.json').read_text()
    config_before = (finished / 'config.yaml').read_text()
    train_moex.main(args('--sched', 'constant', '--lr', '0.5', '--resume', 'auto', out=finished))
    assert 'nothing to train' in capsys.readouterr().out
    assert (finished / 'config.yaml').read_text() == config_before  # lr 0.5 never trained: not recorded as used
    assert not (finished / RESUME_RECORD).exists()
    assert json.loads((finished / 'results.json').read_text()) == json.loads(results_before)


@pytest.mark.slow
def test_extended_cosine_continues_from_the_update_count(args, tmp_path):
    """A finished one-epoch cosine run extended to 3 epochs trains on at the lr of a 3-epoch cosine at its
    update count (it used to train at lr 0: the restored scheduler still ended after epoch 1)."""
    out = tmp_path / 'cos'
    train_moex.main(args('--sched', 'cosine', out=out))
    weights_1 = load_file(str(out / 'checkpoint-1' / 'model.safetensors'))
    train_moex.main(args('--sched', 'cosine', '--epochs', '3', '--resume', 'auto', out=out))
    lrs = [float(r['lr']) for r in read_summary(out)]
    # two updates an epoch: after epoch 2, update 4 of 6 on the 3-epoch cosine
    assert lrs[1] == pytest.approx(0.5 * 0.05 * (1 + math.cos(math.pi * 4 / 6)))
    assert lrs[1] > 0
    weights_2 = load_file(str(out / 'checkpoint-2' / 'model.safetensors'))
    assert not torch.equal(weights_1['conv1.0.weight'], weights_2['conv1.0.weight'])


@pytest.mark.slow
def test_extended_step_schedule_follows_the_run_planned_that_long(args, tmp_path):
    """The step schedule does not depend on the run's length: a 1-epoch run extended to 3 epochs trains
    epochs 2-3 exactly as a run planned for 3."""
    common = ['--sched', 'step', '--decay-epochs', '1', '--decay-rate', '0.5', '--moex', '--moex-prob', '0.5']
    full, grown = tmp_path / 'full', tmp_path / 'grown'
    train_moex.main(args(*common, '--epochs', '3', out=full))
    train_moex.main(args(*common, out=grown))
    train_moex.main(args(*common, '--epochs', '3', '--resume', 'auto', out=grown))
    full_rows, grown_rows = read_summary(full), read_summary(grown)
    for key in ('train_loss', 'eval_loss', 'eval_top1_err', 'lr'):
        for a, b in zip(full_rows, grown_rows):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-6, abs=1e-9), key


# ---- divergence ----

@pytest.mark.slow
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(args, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'nan'
    calls = []

    class Poisoned(builders.ClassificationTask):
        def forward(self, input, target):
            result = super().forward(input, target)
            calls.append(1)
            if len(calls) == 4:  # epoch 2, step 2
                result['loss'] = result['loss'] * float('nan')
            return result
    monkeypatch.setattr(builders, 'ClassificationTask', Poisoned)
    line = one_line_error(capsys, args('--epochs', '3', out=out), Diverged.exit_code)
    assert 'epoch 2, step 2' in line and str(out / 'checkpoint-1') in line and '--resume auto' in line
    assert sorted(p.name for p in out.glob('checkpoint-*')) == ['checkpoint-1']
    assert not (out / 'model.safetensors').exists() and not (out / 'results.json').exists()
    assert [r['epoch'] for r in read_summary(out)] == ['1']
    weights = load_file(str(out / 'checkpoint-1' / 'model.safetensors'))
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_a_huge_lr_diverges_cleanly(args, tmp_path):
    with pytest.raises(Diverged, match=r'training diverged: the (training|evaluation) loss is not finite'):
        train_moex.main(args('--lr', '1e30', '--epochs', '2', out=tmp_path / 'huge'))
    assert not (tmp_path / 'huge' / 'checkpoint-1').exists()


def test_calibration_error_survives_nan_logits():
    meter = ClassificationMeter(bins=5)
    logits = torch.tensor([[float('nan'), 0.0], [2.0, 0.0], [0.0, float('inf')]])
    meter.update(logits, torch.tensor([0, 0, 1]))
    metrics = meter.compute()
    assert math.isnan(metrics['loss']) and metrics['count'] == 3 and math.isfinite(metrics['ece'])


# ---- validate early ----

def test_config_numbers_in_exponent_form():
    cfg = load_config(['--lr', '1e-3', '--weight-decay', '5e-4', '--warmup-lr', '1E-6'], check_paths=False)
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_lr) == (1e-3, 5e-4, 1e-6)


def test_yaml_numbers_in_exponent_form(tmp_path):
    path = tmp_path / 'c.yaml'
    path.write_text('lr: 1e-3\nweight_decay: 5e-4\nmean: [5e-1, 0.5, .5]\n')
    assert yaml.safe_load(path.read_text())['lr'] == '1e-3'  # YAML 1.1: a string
    cfg = load_config(['--config', str(path)], check_paths=False)
    assert (cfg.lr, cfg.weight_decay, cfg.mean) == (1e-3, 5e-4, [0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="lr: expected a number or null, got '1e-3x'"):
        load_config(['--lr', '1e-3x'], check_paths=False)


@pytest.mark.slow
@pytest.mark.parametrize('extra, match', [
    (['--moex', '--moex-norm', 'gn3'], r"model: a trial forward of resnet10t with MoEx .*moex_norm='gn3'"),
    (['--batch-size', '1', '--img-size', '32'], r'batch_size: 1 is too small for the BatchNorm layers of resnet10t'),
], ids=['gn3_on_64_channels', 'batch_1_batchnorm'])
def test_trial_forward_fails_before_training(extra, match, args, tmp_path, capsys):
    out = tmp_path / 'trial'
    line = one_line_error(capsys, args(*extra, out=out), ConfigError.exit_code)
    assert __import__('re').search(match, line), line
    assert not out.exists()


def test_trial_forward_leaves_the_model_as_it_was():
    import timm
    cfg = load_config(['--model', 'resnet10t', '--moex', '--batch-size', '8'], check_paths=False)
    model = timm.create_model('resnet10t', num_classes=2)
    timm_moex.attach_moex(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accelerator = Accelerator(cpu=True)  # before seeding: only trial_forward runs in between
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    builders.trial_forward(cfg, model, accelerator)
    assert torch.equal(torch.rand(3), expected)  # random state untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not timm_moex.get_moex_hook(model).armed


@pytest.mark.slow
def test_img_size_above_32_on_digits_trains(run_args, tmp_path):
    """The 32 px datasets are resized to another img_size (RandomCrop used to fail on the 32 px images)."""
    out = tmp_path / 'digits64'
    results = train_moex.main(['--dataset', 'digits', '--img-size', '64', '--model', 'resnet10t', '--epochs', '1',
                               '--batch-size', '8', *SMALL, '--workers', '0', '--output-dir', str(out),
                               '--progress', 'false'])
    assert results['last']['epoch'] == 1


# ---- one clear line for every user error ----

@pytest.mark.slow
def test_data_errors_are_one_line(tmp_path, capsys):
    common = ['--dataset', 'imagefolder', '--model', 'resnet10t', '--epochs', '1', '--batch-size', '4',
              '--workers', '0', '--progress', 'false']
    other = make_image_folder(tmp_path / 'other', classes=('a', 'b'), train_per_class=2, test_per_class=1)
    (other / 'test' / 'b').rename(other / 'test' / 'c')
    line = one_line_error(capsys, [*common, '--data-dir', str(other), '--output-dir', str(tmp_path / 'o1')],
                          DataError.exit_code)
    assert "only in train/ ['b']" in line and "only in test/ ['c']" in line
    empty = make_image_folder(tmp_path / 'empty', classes=('a', 'b'), train_per_class=2, test_per_class=1)
    for f in (empty / 'train' / 'b').iterdir():
        f.unlink()
    line = one_line_error(capsys, [*common, '--data-dir', str(empty), '--output-dir', str(tmp_path / 'o2')],
                          DataError.exit_code)
    assert 'no images to read' in line and str(empty / 'train') in line
    assert not (tmp_path / 'o1').exists() and not (tmp_path / 'o2').exists()


@pytest.mark.slow
def test_output_dir_under_a_regular_file(args, tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    line = one_line_error(capsys, args(out=blocker / 'run'), ConfigError.exit_code)
    assert f"output_dir: '{blocker}' is a file" in line


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_previous(args, tmp_path, capsys):
    out = tmp_path / 'run'
    common = ['--sched', 'constant', '--epochs', '2']
    train_moex.main(args(*common, out=out))
    reference = read_summary(out)
    damages = {'empty model': ('model.safetensors', lambda b: b''),
               'truncated model': ('model.safetensors', lambda b: b[:len(b) // 2]),
               'foreign model': ('model.safetensors', lambda b: b'PK\x03\x04 not weights'),
               'truncated optimizer': ('optimizer.bin', lambda b: b[:len(b) // 3]),
               'missing state': ('custom_checkpoint_0.pkl', None)}
    for damage, (name, cut) in damages.items():
        path = out / 'checkpoint-2' / name
        if cut is None:
            path.unlink()
        else:
            path.write_bytes(cut(path.read_bytes()))
        with pytest.warns(UserWarning, match='checkpoint-2 is damaged .* resuming from .*checkpoint-1'):
            train_moex.main(args(*common, '--resume', 'auto', out=out))
        rows = read_summary(out)
        assert [r['epoch'] for r in rows] == ['1', '2'], damage
        assert float(rows[1]['train_loss']) == pytest.approx(float(reference[1]['train_loss']), rel=1e-6), damage
        load_file(str(out / 'checkpoint-2' / 'model.safetensors'))  # redone, whole again
    # Named explicitly, a damaged checkpoint is an error, not a fallback.
    (out / 'checkpoint-2' / 'model.safetensors').write_bytes(b'')
    line = one_line_error(capsys, args('--sched', 'constant', '--epochs', '3', '--resume',
                                       str(out / 'checkpoint-2'), out=out), CheckpointError.exit_code)
    assert 'the checkpoint is damaged' in line and 'checkpoint-2' in line


@pytest.mark.slow
def test_checkpoint_of_another_class_count_is_one_line(finished, args, capsys):
    path = finished / 'config.yaml'
    saved = yaml.safe_load(path.read_text())
    saved['num_classes'] = 3  # an identity its checkpoints do not match: the shapes are checked on load
    path.write_text(yaml.safe_dump(saved, sort_keys=False))
    before = path.read_text()
    line = one_line_error(capsys, args('--sched', 'constant', '--epochs', '2', '--num-classes', '3', '--resume',
                                       'auto', out=finished), CheckpointError.exit_code)
    assert 'does not fit this model' in line and 'size mismatch' in line
    assert path.read_text() == before


def test_resume_needs_the_run_folders_config_yaml(tmp_path):
    out = tmp_path / 'run'
    cfg = load_config(['--resume', 'auto', '--output-dir', str(out)], check_paths=False)
    assert run_folder.check_resume(cfg, out) == (None, {})  # nothing to resume yet: a new run
    (out / 'checkpoint-1').mkdir(parents=True)
    with pytest.raises(ResumeMismatch, match=r'^--resume of a run folder without config.yaml, the run\'s settings '
                                             r'\(.*run/config.yaml\): restore the file, or start a new run in '
                                             r'another --output-dir$'):
        run_folder.check_resume(cfg, out)
    save_config(cfg, out / 'config.yaml')
    assert run_folder.check_resume(cfg, out) == (cfg.to_dict(), {})


def test_resume_auto_without_a_checkpoint_says_it_starts_a_new_run(tmp_path, capsys):
    """--resume auto starts a run where there is none (one command starts and restarts a job), but not silently: a
    mistyped --output-dir would otherwise train from scratch without a word."""
    out = tmp_path / 'run'
    said = f'resume: auto found no checkpoint in {out}: starting a new run\n'
    cfg = load_config(['--resume', 'auto', '--output-dir', str(out)], check_paths=False)
    assert run_folder.check_resume(cfg, out) == (None, {})
    assert capsys.readouterr().out == said
    save_config(cfg, out / 'config.yaml')  # a run stopped in its first epoch: its settings, no checkpoint yet
    run_folder.check_resume(cfg, out)
    assert capsys.readouterr().out == said
    (out / 'checkpoint-1').mkdir()
    assert run_folder.check_resume(cfg, out) == (cfg.to_dict(), {})
    assert capsys.readouterr().out == ''


# Runs train_moex.py as __main__ and sends SIGINT to itself when it first imports torch, as Ctrl-C in the seconds
# the imports take would: deterministic, and done before anything slow is loaded.
_CTRL_C_WHILE_LOADING = """
import builtins, os, runpy, signal, sys
real_import = builtins.__import__
def importing(name, *args, **kwargs):
    if name == 'torch':
        os.kill(os.getpid(), signal.SIGINT)
        raise SystemExit(3)  # the signal did not stop the script
    return real_import(name, *args, **kwargs)
builtins.__import__ = importing
runpy.run_path(sys.argv[1], run_name='__main__')
"""


@pytest.mark.skipif(sys.platform == 'win32', reason='SIGINT to a child process')
def test_ctrl_c_while_the_imports_load_is_one_line():
    """Ctrl-C before cli() runs used to end in a KeyboardInterrupt traceback from the import machinery."""
    command = [sys.executable, '-c', _CTRL_C_WHILE_LOADING, str(ROOT / 'train_moex.py')]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == Interrupted.exit_code, proc.stderr
    assert proc.stderr == ('train_moex.py: interrupted (Ctrl-C) before the run started: nothing was trained; run the '
                           'same command again\n') and proc.stdout == ''
    # A SIGINT the shell ignores (a background job) stays ignored.
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert (proc.returncode, proc.stderr) == (3, '')
    # Loaded, the module leaves Python's handler: the run's Ctrl-C handling, and an importer's, are unchanged.
    assert signal.getsignal(signal.SIGINT) is not train_moex._interrupted_while_loading


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == 'win32', reason='signals to a child process')
@pytest.mark.parametrize('signum, code, said', [(signal.SIGINT, 130, 'interrupted (Ctrl-C)'),
                                                (signal.SIGTERM, 143, 'terminated (SIGTERM)')])
def test_a_signal_stops_the_run_in_one_line_and_keeps_whole_checkpoints(args, tmp_path, signum, code, said):
    """Ctrl-C, or SIGTERM (kill, a job scheduler): one line saying how to resume, the last checkpoint kept, the
    signal's own exit code."""
    out = tmp_path / 'run'
    proc = subprocess.Popen([sys.executable, str(ROOT / 'train_moex.py'), *args('--epochs', '50', out=out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / 'checkpoint-1').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code == (Interrupted if signum == signal.SIGINT else Terminated).exit_code, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith(f'train_moex.py: {said} ({out}): checkpoint-') and \
        lines[0].endswith('run the same command with --resume auto to continue'), lines[0]
    assert not (out / 'results.json').exists()
    assert (out / 'checkpoint-1' / 'model.safetensors').exists()
    for checkpoint in out.glob('checkpoint-*'):  # whole: a save cut short stays under its temporary name
        assert (checkpoint / 'model.safetensors').exists() and (checkpoint / 'custom_checkpoint_0.pkl').exists()


def test_the_debug_key_or_the_variable_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv('TIMM_MOEX_DEBUG', raising=False)
    blocker = tmp_path / 'file'
    blocker.write_text('')
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text('debug: true\n')
    bad = ['--output-dir', str(blocker / 'run')]  # a ConfigError once the configuration is read
    for argv, shown in [(bad, False), (bad + ['--debug'], True), (['--config', str(recipe), *bad], True),
                        (['--config', str(recipe), *bad, '--debug', 'false'], False)]:
        assert train_moex.cli(argv) == ConfigError.exit_code
        err = capsys.readouterr().err
        assert ('Traceback' in err) is shown, argv
        assert err.strip().splitlines()[-1].startswith('train_moex.py: configuration error: output_dir:')
    # An error in the command line itself comes before the key is known: the variable shows its traceback.
    assert train_moex.cli(['--debug', '--moex-lamb', '0.5']) == ConfigError.exit_code
    assert 'Traceback' not in capsys.readouterr().err
    monkeypatch.setenv('TIMM_MOEX_DEBUG', '1')
    assert train_moex.cli(['--moex-lamb', '0.5']) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert 'Traceback' in err and "unknown config key 'moex_lamb'" in err.strip().splitlines()[-1]


@pytest.mark.slow
def test_debug_shows_the_traceback(args, tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    assert train_moex.cli(args('--debug', out=blocker / 'run')) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert 'Traceback' in err and err.strip().splitlines()[-1].startswith('train_moex.py: configuration error:')


# ---- what a run records is what ran ----

@pytest.mark.slow
def test_fp16_on_a_cpu_trains_in_fp32_and_records_it(args, tmp_path, capsys):
    """Accelerate runs fp16 on a CPU as fp32 (no autocast, no GradScaler): the run says so once and config.yaml,
    the banner and results.json record 'no' (they used to say fp16)."""
    out = tmp_path / 'fp16'
    results = train_moex.main(args('--mixed-precision', 'fp16', out=out))
    printed = capsys.readouterr().out
    assert 'fp16 has no effect on a CPU' in printed and 'mixed_precision=no' in printed
    assert results['mixed_precision'] == 'no'
    assert json.loads((out / 'results.json').read_text())['mixed_precision'] == 'no'
    assert yaml.safe_load((out / 'config.yaml').read_text())['mixed_precision'] == 'no'


@pytest.mark.parametrize('dataset', ['imagefolder', 'imagenet'])  # torchvision's ImageFolder, timm's create_dataset
def test_a_one_class_dataset_is_refused(dataset, tmp_path, capsys):
    """One class trains to loss 0 and 0 % error with nothing learned: refused, naming the folder and the class."""
    data = make_image_folder(tmp_path / 'one', classes=('cat',), train_per_class=4, test_per_class=2)
    (data / 'test').rename(data / 'val')
    out = tmp_path / 'run'
    line = one_line_error(capsys, ['--dataset', dataset, '--data-dir', str(data), '--model', 'resnet10t',
                                   '--batch-size', '2', '--workers', '0', '--output-dir', str(out),
                                   '--progress', 'false'], DataError.exit_code)
    assert 'single class' in line and f"{data}: only 'cat'" in line
    assert not out.exists()


@pytest.mark.slow
def test_a_resume_that_diverges_again_records_nothing(finished, args, monkeypatch, capsys):
    """A resume with a new lr and epochs that diverges in its first epoch trained nothing with them: config.yaml,
    resume.jsonl and results.json still say what trained, and the next resume's changes start from there."""
    before = snapshot(finished)

    class Poisoned(builders.ClassificationTask):
        def forward(self, input, target):
            result = super().forward(input, target)
            result['loss'] = result['loss'] * float('nan')
            return result
    monkeypatch.setattr(builders, 'ClassificationTask', Poisoned)
    resume = ['--sched', 'constant', '--epochs', '2', '--resume', 'auto']
    one_line_error(capsys, args(*resume, '--lr', '0.02', out=finished), Diverged.exit_code)
    assert snapshot(finished) == before  # config.yaml (lr 0.05, 1 epoch) kept, no resume.jsonl
    monkeypatch.undo()
    train_moex.main(args(*resume, '--lr', '0.03', out=finished))
    records = [json.loads(ln) for ln in (finished / RESUME_RECORD).read_text().splitlines()]
    assert [r['changes'] for r in records] == [{'epochs': [1, 2], 'lr': [0.05, 0.03]}]
    assert yaml.safe_load((finished / 'config.yaml').read_text())['lr'] == 0.03


# ---- one clear line at the edges ----

def test_an_empty_run_config_is_a_damaged_run_folder(args, tmp_path, capsys):
    """An empty config.yaml used to be read as the defaults (then "model 'resnet18' in the run" for a resnet10t
    run); empty or not a mapping, it is a damaged run folder, said in one line before anything is written."""
    out = tmp_path / 'run'
    out.mkdir()
    for text, found in (('', 'is empty'), ('- 1\n- 2\n', 'holds a list')):
        (out / 'config.yaml').write_text(text)
        line = one_line_error(capsys, args('--resume', 'auto', out=out), ConfigError.exit_code)
        assert f"'{out / 'config.yaml'}' {found}" in line and 'the run folder is damaged' in line, line
        assert 'resnet18' not in line and (out / 'config.yaml').read_text() == text


def _no_dac_override():
    """A command prefix that runs without the capability that lets root write anywhere, or None."""
    if os.name != 'posix' or os.geteuid() != 0:
        return []
    setpriv = shutil.which('setpriv')
    return [setpriv, '--inh-caps=-dac_override', '--bounding-set=-dac_override', '--'] if setpriv else None


@pytest.mark.slow
@pytest.mark.skipif(_no_dac_override() is None, reason='root without setpriv writes into read-only folders')
def test_a_read_only_output_dir_is_one_line(args, tmp_path):
    """A read-only parent folder used to end in a PermissionError traceback (as root: without dac_override)."""
    parent = tmp_path / 'read_only'
    parent.mkdir()
    parent.chmod(0o555)
    try:
        proc = subprocess.run([*_no_dac_override(), sys.executable, str(ROOT / 'train_moex.py'),
                               *args(out=parent / 'run')], capture_output=True, text=True, timeout=300)
    finally:
        parent.chmod(0o755)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == ConfigError.exit_code and len(lines) == 1, proc.stderr
    assert f"output_dir: '{parent}' is not writable" in lines[0] and '--output-dir' in lines[0]
    assert not (parent / 'run').exists()


def test_pretrained_weights_offline_are_one_line(args, tmp_path, monkeypatch, capsys):
    """Offline and not cached, --pretrained used to end in a traceback (after a minute of retries when the network
    is down; HF_HUB_OFFLINE fails at once): one line naming the model, where its weights live and what to do."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'empty_cache'))
    line = one_line_error(capsys, args('--model', 'resnet18', '--pretrained', 'true', out=tmp_path / 'run'),
                          CheckpointError.exit_code)
    assert 'the weights of resnet18 cannot be downloaded' in line and '(hf-hub:timm/resnet18.a1_in1k)' in line
    assert 'HF_HUB_OFFLINE' in line and '--initial-checkpoint' in line and '--pretrained false' in line
    with pytest.raises(ConfigError, match="pretrained: timm has no pretrained weights for 'resnet18_cifar_moex'"):
        load_config(args('--model', 'resnet18_cifar_moex', '--pretrained', 'true', out=tmp_path / 'run'))


def _truncated_legacy_save(path):
    torch.save({'w': torch.zeros(4)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-30])  # the tensor data (24 bytes) and more cut: an EOFError without a message


@pytest.mark.parametrize('make, what, todo', [
    (lambda p: p.write_bytes(os.urandom(256)), 'not a PyTorch checkpoint (torch.save) nor a safetensors file',
     'give a .safetensors file'),
    (lambda p: p.write_bytes(b''), 'the file is empty', 'copy or download the file again'),
    (lambda p: (torch.save({'state_dict': {'w': torch.zeros(4)}}, p), p.write_bytes(p.read_bytes()[:300])),
     'a truncated or damaged archive', 'copy or download the file again'),
    (_truncated_legacy_save, 'a truncated or damaged torch.save file (EOFError)', 'copy or download the file again'),
], ids=['garbage', 'empty', 'truncated_zip', 'truncated_legacy'])
def test_damaged_weight_files_say_what_is_wrong(make, what, todo, tmp_path):
    """PyTorch's weights_only advice and miniz's text used to be cut mid-sentence, and an empty message showed
    as 'EOFError: EOFError': one line, what is wrong with the file, and what to do."""
    path = tmp_path / 'model_best.pth.tar'
    make(path)
    with pytest.raises(CheckpointError) as err:
        read_weights(path, key='initial_checkpoint')
    message = str(err.value)
    assert message.startswith(f'initial_checkpoint: cannot read the file as weights: {what}') and \
        f'({path}): {todo}' in message, message
    assert '\n' not in message and 'EOFError: EOFError' not in message and 'PyTorch 2.6' not in message
    assert 'miniz' not in message


def test_package_warnings_print_as_one_line():
    """The command prints the package's warnings without the source line of their warnings.warn call; other
    warnings keep Python's format."""
    ours = timm_moex.train.checkpoint.__file__
    with train_moex._as_a_command():
        own = warnings.formatwarning('checkpoint-2 is damaged', UserWarning, ours, 354)
        other = warnings.formatwarning('deprecated', FutureWarning, '/elsewhere/lib.py', 3)
    assert own == 'train_moex.py: UserWarning: checkpoint-2 is damaged\n'
    assert other.startswith('/elsewhere/lib.py:3: FutureWarning: deprecated')
    assert warnings.formatwarning('x', UserWarning, ours, 354).startswith(f'{ours}:354: UserWarning: x')  # restored


def test_readme_lists_every_exit_code():
    """The README's exit-code line names the code of every error the command reports."""
    line = next(ln for ln in (ROOT / 'README.md').read_text().split(';') if 'exit codes 2 config' in ln)
    listed = {int(n) for n in re.findall(r'(?<![\w-])(\d+) [A-Za-z]', line)}
    codes = {cls.exit_code for cls in (ConfigError, RunError, RunFolderBusy, ResumeMismatch, CheckpointError,
                                       DataError, UnreadableImage, Diverged, Interrupted, Terminated)}
    assert listed == codes, (sorted(listed), sorted(codes))
