"""train_moex.py end to end on CPU: two-epoch runs on a tiny generated ImageFolder."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from timm.data import Mixup

import train_moex
from timm_moex import MoExClassificationTask, MoExMixing, attach_moex
from timm_moex.train import builders
from timm_moex.train import ConfigError, DataError
from timm_moex.train.errors import UnreadableImage

from helpers import CIFAR10_JPEG, ROOT, make_image_folder, read_summary


def check_run(out, epochs=2, ema=False, num_classes=2):
    rows = read_summary(out)
    assert [int(r['epoch']) for r in rows] == list(range(1, epochs + 1))
    for key in ('train_loss', 'eval_loss', 'eval_top1_err', 'eval_top5_err', 'lr', 'train_epoch_time',
                'train_img_per_sec'):
        assert key in rows[0], key
        for r in rows:
            assert torch.isfinite(torch.tensor(float(r[key]))), (key, r[key])
    for r in rows:
        assert 0 <= float(r['eval_top1_err']) <= 100
        assert int(r['eval_count']) == 18  # the whole eval set, once
    results = json.loads((out / 'results.json').read_text())
    assert results['last']['epoch'] == epochs and 1 <= results['best']['epoch'] <= epochs
    assert results['best']['top1_err'] <= results['last']['top1_err']
    assert float(rows[-1]['eval_top1_err']) == pytest.approx(results['last']['top1_err'])
    assert float(rows[-1]['train_loss']) == pytest.approx(results['last']['train_loss'])
    assert {'top1_err', 'top5_err', 'loss', 'ece', 'train_loss'} <= set(results['best'])
    assert sorted(p.name for p in out.glob('checkpoint-*')) == [f'checkpoint-{e}' for e in range(max(1, epochs - 1),
                                                                                                    epochs + 1)]
    assert not list(out.glob('.*tmp'))
    assert (out / 'config.yaml').exists()
    model = timm.create_model('resnet10t', num_classes=num_classes)
    model.load_state_dict(load_file(str(out / 'model.safetensors')))  # plain timm keys, strict
    if ema:
        ema_model = timm.create_model('resnet10t', num_classes=num_classes, pretrained=True,
                                      pretrained_cfg_overlay=dict(file=str(out / 'model_ema.safetensors')))
        assert 'ema_top1_err' in results['last']
        assert not torch.equal(ema_model.conv1[0].weight, model.conv1[0].weight)
    return rows, results


VARIANTS = {
    'baseline': [],
    'moex': ['--moex', '--moex-prob', '1.0'],
    'cutmix_moex': ['--moex', '--moex-prob', '0.5', '--moex-lam', '0.9', '--cutmix', '1.0', '--mixup-prob', '0.5'],
    'mixup_moex': ['--moex', '--moex-prob', '1.0', '--mixup', '0.2'],
    'label_smoothing': ['--smoothing', '0.1', '--moex'],
    'ema': ['--model-ema', '--model-ema-decay', '0.9', '--moex'],
    'grad_accum_2': ['--grad-accum-steps', '2', '--moex'],
    'bf16': ['--mixed-precision', 'bf16', '--moex', '--moex-prob', '1.0'],
    'channels_last_autoaugment_cutout': ['--channels-last', '--moex', '--auto-augment', 'cifar10', '--cutout', '8',
                                         '--aug-recipe', 'cifar'],
    'automix': ['--mix', 'automix'],
    'automix_moex_bf16_accum': ['--mix', 'automix', '--moex', '--moex-prob', '1.0', '--mixed-precision', 'bf16',
                                '--grad-accum-steps', '2', '--automix-lr', '0.01'],
    'device_loader_cutmix_moex': ['--loader', 'device', '--img-size', '32', '--channels-last', '--cutout', '8',
                                  '--moex', '--moex-prob', '1.0', '--cutmix', '1.0'],
}


@pytest.mark.slow
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_two_epoch_runs(variant, run_args, tmp_path):
    out = tmp_path / variant
    results = train_moex.main(run_args(*VARIANTS[variant], out=out))
    rows, saved = check_run(out, ema=variant == 'ema')
    assert results == saved
    moex_frac = [float(r['train_moex_frac']) for r in rows]
    if '--moex' not in VARIANTS[variant]:
        assert moex_frac == [0.0, 0.0]
    elif '1.0' in VARIANTS[variant][VARIANTS[variant].index('--moex'):][:3]:  # --moex --moex-prob 1.0
        assert moex_frac == [1.0, 1.0]
    if variant == 'bf16':
        assert saved['mixed_precision'] == 'bf16'
    if variant.startswith('automix'):  # the Mix Block's own parameter group: its lr and the run's weight decay
        groups = torch.load(out / 'checkpoint-2' / 'optimizer.bin', weights_only=False)['param_groups']
        assert len(groups[-1]['params']) == 4  # query and value convolutions, weights and biases
        assert groups[-1]['weight_decay'] == 1e-4
        assert groups[-1]['initial_lr'] == (0.01 if '--automix-lr' in VARIANTS[variant] else 0.05)


@pytest.mark.slow
def test_compiled_run_traces_the_hook_in_static_graphs(run_args, tmp_path, monkeypatch):
    """compile: true traces model and hook without graph breaks, and a partial last batch gets its
    own static graph rather than turning the batch dimension dynamic (slower kernels on a GPU)."""
    from torch._dynamo.utils import counters
    real_compile, calls, graphs = torch.compile, [], []

    def record(gm, example_inputs):  # a backend that runs the graph as traced; a dynamic one has SymInt inputs
        graphs.append([type(n.meta.get('example_value')).__name__ for n in gm.graph.nodes if n.op == 'placeholder'])
        return gm.forward

    def compile_recording(model, **kwargs):
        calls.append(dict(kwargs))
        kwargs.pop('mode')  # a mode needs Inductor; 'reduce-overhead' only matters on a GPU
        kwargs.pop('backend')
        return real_compile(model, backend=record, **kwargs)
    monkeypatch.setattr(torch, 'compile', compile_recording)
    torch._dynamo.reset()
    counters.clear()
    out = tmp_path / 'compiled'
    train_moex.main(run_args('--moex', '--moex-prob', '0.5', '--compile', '--compile-mode', 'reduce-overhead',
                             out=out))
    rows, _ = check_run(out)
    assert [(c['backend'], c['mode']) for c in calls] == [('inductor', 'reduce-overhead')]
    assert not counters['graph_break'], dict(counters['graph_break'])
    assert 0 < sum(float(r['train_moex_frac']) for r in rows) < 2
    # MoEx idle and armed in training, full and partial (18 = 16 + 2) eval batches: four graphs, none symbolic.
    assert len(graphs) == 4
    assert not any('SymInt' in inputs for inputs in graphs), graphs


@pytest.mark.slow
def test_triton_kernels_train_like_the_pytorch_ops(run_args, tmp_path, monkeypatch):
    """moex_impl: triton (on a CPU, in Triton's interpreter) trains exactly as moex_impl: torch."""
    kernels = pytest.importorskip('timm_moex.ops.moex_triton')
    if not (torch.cuda.is_available() or kernels.interpreted()):
        pytest.skip('no GPU and no Triton interpreter')
    launches = []
    for name in ('pono_exchange_forward', 'pono_exchange_backward'):
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, fn=fn, name=name: launches.append(name) or fn(*a))
    common = ['--moex', '--moex-prob', '1.0', '--channels-last', '--img-size', '32']
    runs = {impl: read_summary(tmp_path / impl) for impl in ('triton', 'torch')
            if train_moex.main(run_args(*common, '--moex-impl', impl, out=tmp_path / impl)) is not None}
    # 8 training batches (2 epochs of 4), each one forward and one backward, plus the start-up trial forward
    assert launches.count('pono_exchange_forward') == 8 + 1 and launches.count('pono_exchange_backward') == 8
    # Rounding differs in the last bits; eight SGD steps at lr 0.05 amplify it (epoch 1's train loss
    # agrees to about 1e-6, epoch 2's eval loss to about 1e-3).
    assert float(runs['triton'][0]['train_loss']) == pytest.approx(float(runs['torch'][0]['train_loss']), rel=1e-5)
    for key in ('train_loss', 'eval_loss', 'eval_top1_err'):
        for a, b in zip(runs['triton'], runs['torch']):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-2, abs=1e-4), key


@pytest.mark.slow
def test_grad_accum_counts_updates(run_args, tmp_path):
    """32 images, batch 8, 2 accumulation steps: 2 updates per epoch, seen by the step scheduler."""
    out = tmp_path / 'accum'
    train_moex.main(run_args('--grad-accum-steps', '2', '--sched', 'step', '--decay-epochs', '1',
                             '--decay-rate', '0.5', out=out))
    state = torch.load(out / 'checkpoint-2' / 'custom_checkpoint_0.pkl', weights_only=False)
    assert state['num_updates'] == 4
    lrs = [float(r['lr']) for r in read_summary(out)]
    assert lrs == pytest.approx([0.025, 0.0125])


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_metrics(run_args, tmp_path):
    """A run killed after epoch 2 and resumed reproduces epoch 3 of the uninterrupted run exactly."""
    common = ['--moex', '--moex-prob', '0.5', '--cutmix', '1.0', '--mixup-prob', '0.5', '--model-ema',
              '--model-ema-decay', '0.9', '--sched', 'step', '--decay-epochs', '1', '--decay-rate', '0.5',
              '--auto-augment', 'rand-m5-mstd0.5', '--reprob', '0.25']
    full, part = tmp_path / 'full', tmp_path / 'part'
    train_moex.main(run_args(*common, '--epochs', '3', out=full))
    train_moex.main(run_args(*common, '--epochs', '2', out=part))  # "killed" after epoch 2
    (part / 'results.json').unlink()
    (part / 'model.safetensors').unlink()
    train_moex.main(run_args(*common, '--epochs', '3', '--resume', 'auto', out=part))
    full_rows, part_rows = read_summary(full), read_summary(part)
    assert [r['epoch'] for r in part_rows] == ['1', '2', '3']
    for key in full_rows[2]:
        if key not in ('train_epoch_time', 'train_img_per_sec'):
            assert float(part_rows[2][key]) == pytest.approx(float(full_rows[2][key]), rel=1e-6, abs=1e-9), key
    full_w, part_w = load_file(str(full / 'model.safetensors')), load_file(str(part / 'model.safetensors'))
    for k in full_w:
        torch.testing.assert_close(part_w[k], full_w[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_automix_resume_restores_the_mix_block_and_momentum_encoder(run_args, tmp_path, monkeypatch):
    """AutoMix (+ MoEx) stopped after checkpoint-2 and resumed: epoch 3 and the AutoMix state match the
    uninterrupted run (whose momentum and mask-area schedules span the same 3 epochs)."""
    common = ['--mix', 'automix', '--moex', '--moex-prob', '0.5', '--epochs', '3']
    full, part = tmp_path / 'full', tmp_path / 'part'
    train_moex.main(run_args(*common, out=full))

    class Stop(Exception):
        pass
    save = train_moex.CheckpointManager.save

    def save_then_stop(self, epoch):
        path = save(self, epoch)
        if epoch == 2:
            raise Stop
        return path
    monkeypatch.setattr(train_moex.CheckpointManager, 'save', save_then_stop)
    with pytest.raises(Stop):
        train_moex.main(run_args(*common, out=part))
    monkeypatch.undo()
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    train_moex.main(run_args(*common, '--resume', 'auto', out=part))
    full_rows, part_rows = read_summary(full), read_summary(part)
    for key in ('train_loss', 'eval_loss', 'eval_top1_err', 'lr', 'train_moex_frac'):
        assert float(part_rows[2][key]) == pytest.approx(float(full_rows[2][key]), rel=1e-6, abs=1e-9), key
    full_am = load_file(str(full / 'checkpoint-3' / 'model_1.safetensors'))
    part_am = load_file(str(part / 'checkpoint-3' / 'model_1.safetensors'))
    assert int(full_am['num_updates']) == 3 * 4  # 32 images, batch 8, 3 epochs: one momentum update per step
    assert {k.split('.')[0] for k in full_am} == {'encoder', 'mix_block', 'mix_head', 'num_updates'}
    for k in full_am:
        torch.testing.assert_close(part_am[k], full_am[k], rtol=1e-5, atol=1e-6)
    two = load_file(str(part / 'checkpoint-2' / 'model_1.safetensors'))
    assert not torch.equal(two['mix_block.value.weight'], full_am['mix_block.value.weight'])  # it trained on


def test_automix_config_errors():
    from timm_moex.train import load_config
    with pytest.raises(ConfigError, match='mix: AutoMix does its own mixing'):
        load_config(['--mix', 'automix', '--mixup', '0.2'], check_paths=False)
    with pytest.raises(ConfigError, match=r"automix_feature_layer: .*no module 'stage9'"):
        load_config(['--mix', 'automix', '--automix-feature-layer', 'stage9'], check_paths=False)
    with pytest.raises(ConfigError, match='automix_feature_layer: feature layer 12 is out of range'):
        load_config(['--mix', 'automix', '--automix-feature-layer', '12'], check_paths=False)
    with pytest.raises(ConfigError, match="mix: 'auto_mix' is not one of none, automix"):
        load_config(['--mix', 'auto_mix'], check_paths=False)
    with pytest.raises(ConfigError, match='automix_lam_margin'):
        load_config(['--mix', 'automix', '--automix-lam-margin', '0.5'], check_paths=False)
    cfg = load_config(['--mix', 'automix', '--automix-feature-layer', '-3'], check_paths=False)
    assert cfg.automix_feature_layer == '-3'


@pytest.mark.slow
def test_new_run_refuses_a_used_output_dir(run_args, tmp_path):
    out = tmp_path / 'used'
    train_moex.main(run_args('--epochs', '1', out=out))
    with pytest.raises(ConfigError, match='--resume auto'):
        train_moex.main(run_args('--epochs', '1', out=out))


@pytest.mark.slow
def test_crash_while_saving_keeps_the_previous_checkpoint(run_args, tmp_path, monkeypatch):
    out = tmp_path / 'crash'
    from timm_moex.train import checkpoint
    real_save = checkpoint.save_file

    def failing_save(state, path, *a, **kw):
        if 'checkpoint-2' in path:
            raise OSError('disk full (simulated)')
        return real_save(state, path, *a, **kw)

    monkeypatch.setattr(checkpoint, 'save_file', failing_save)
    with pytest.raises(OSError, match='simulated'):
        train_moex.main(run_args('--model-ema', out=out))
    assert [p.name for p in out.glob('checkpoint-*')] == ['checkpoint-1']
    assert (out / 'checkpoint-1' / 'model.safetensors').exists()
    monkeypatch.setattr(checkpoint, 'save_file', real_save)
    assert list(out.glob('.checkpoint-2.tmp'))  # the half-written one
    # cleans the .tmp, redoes epoch 2
    train_moex.main(run_args('--model-ema', '--resume', str(out / 'checkpoint-1'), out=out))
    check_run(out, ema=True)


@pytest.mark.slow
def test_eval_only_matches_the_last_epoch(run_args, tmp_path):
    out = tmp_path / 'evalrun'
    results = train_moex.main(run_args(out=out))
    metrics = train_moex.main(run_args('--eval-only', '--checkpoint', str(out / 'checkpoint-2'),
                                       out=tmp_path / 'evalonly'))
    assert set(metrics) >= {'top1_err', 'top5_err', 'nll', 'ece'}
    assert metrics['top1_err'] == pytest.approx(results['last']['top1_err'])
    assert metrics['nll'] == pytest.approx(results['last']['loss'], rel=1e-5)
    again = train_moex.main(run_args('--eval-only', '--checkpoint', str(out / 'model.safetensors'),
                                     out=tmp_path / 'evalonly2'))
    assert again['top1_err'] == pytest.approx(metrics['top1_err'])
    assert json.loads((tmp_path / 'evalonly' / 'eval.json').read_text())['ece'] == pytest.approx(metrics['ece'])


def _truncated_jpeg(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.slow
@pytest.mark.parametrize('loader, where, damage', [
    (['--workers', '0'], 'train', _truncated_jpeg),
    (['--workers', '2'], 'train', _truncated_jpeg),  # raised in a DataLoader worker process
    (['--workers', '2'], 'test', lambda path: path.write_text('not an image')),  # in the evaluation
    (['--loader', 'device', '--img-size', '32'], 'train', lambda path: path.write_text('not an image')),
], ids=['truncated_workers_0', 'truncated_workers_2', 'text_in_eval_workers_2', 'text_device_loader'])
def test_an_undecodable_image_is_one_line(loader, where, damage, tmp_path, capsys):
    """A truncated JPEG or text saved as .jpg used to end in a traceback and exit 1, also from a DataLoader
    worker: one line naming the file, the data exit code."""
    data = make_image_folder(tmp_path / 'data', train_per_class=4, test_per_class=2)
    (data / where / 'a' / '000.png').unlink()  # replaced: every image is read in the first epoch (drop_last)
    damage(bad := data / where / 'a' / '000.jpg')
    args = ['--dataset', 'imagefolder', '--data-dir', str(data), '--model', 'resnet10t', '--epochs', '1',
            '--batch-size', '4', '--output-dir', str(tmp_path / 'out'), '--progress', 'false', *loader]
    assert train_moex.cli(args) == UnreadableImage.exit_code == DataError.exit_code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith(f'train_moex.py: an image file cannot be decoded ({bad}: ') and \
        lines[0].endswith('replace or remove the file (a truncated copy, or not an image)'), lines[0]


def _cutmix_moex_batch(mix_kwargs, lam):
    torch.manual_seed(0)
    model = timm.create_model('resnet10t', num_classes=4)
    moex = MoExMixing(attach_moex(model), prob=1.0, lam=lam, pairing='flip')
    task = MoExClassificationTask(model, moex, criterion_kwargs=dict(soft_targets=True), verbose=False)
    x = torch.randn(6, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3, 0, 1])  # y[i] != y[5 - i]: the mixing weight can be read from t
    x, t = Mixup(label_smoothing=0.0, num_classes=4, **mix_kwargs)(x, y)
    mix_lam = t[0, y[0]].item()
    result = task(x, t)
    return result, y, mix_lam


@pytest.mark.slow
@pytest.mark.parametrize('mix_kwargs', [dict(mixup_alpha=0.0, cutmix_alpha=1.0), dict(mixup_alpha=1.0)])
def test_mixing_plus_moex_is_the_three_term_loss(mix_kwargs):
    """CutMix (or Mixup) + MoEx share the pairing; the loss is the official three-term formula."""
    lam = 0.7
    result, y, cm = _cutmix_moex_batch(mix_kwargs, lam)
    perm = result['perm']
    assert result['moex'] and perm.tolist() == [5, 4, 3, 2, 1, 0]  # timm Mixup's pairing
    a, b = y, y[perm]
    c = b[perm]
    out = result['output']
    ce = lambda target: F.cross_entropy(out, target)  # noqa: E731
    by_hand = ce(a) * cm * lam + ce(b) * ((1 - cm) * lam + cm * (1 - lam)) + ce(c) * (1 - cm) * (1 - lam)
    torch.testing.assert_close(result['loss'], by_hand)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != 'linux', reason='gloo DDP on CPU tested on Linux')
@pytest.mark.parametrize('extra', [['--moex', '--moex-prob', '1.0', '--cutmix', '1.0'],
                                   ['--mix', 'automix', '--moex', '--moex-prob', '1.0']], ids=['cutmix_moex', 'automix'])
def test_two_process_ddp_writes_one_set_of_outputs(extra, image_folder, tmp_path):
    out = tmp_path / 'ddp'
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0',
           str(ROOT / 'train_moex.py'),
           '--dataset', 'imagefolder', '--data-dir', str(image_folder), '--model', 'resnet10t', '--epochs', '2',
           '--batch-size', '4', '--workers', '0', '--lr', '0.05', '--output-dir', str(out), '--progress', 'false',
           *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows, results = check_run(out)
    assert results['num_processes'] == 2
    assert sorted(p.name for p in (out / 'checkpoint-2').glob('random_states_*')) == \
        ['random_states_0.pkl', 'random_states_1.pkl']
    assert proc.stdout.count('last epoch 2:') == 1  # one process reports
    # The checkpoint of the DDP model (keys with 'module.') evaluates in one process like the run did.
    metrics = train_moex.main(['--dataset', 'imagefolder', '--data-dir', str(image_folder), '--model', 'resnet10t',
                               '--workers', '0', '--output-dir', str(tmp_path / 'eval'), '--progress', 'false',
                               '--eval-only', '--checkpoint', str(out / 'checkpoint-2')])
    assert metrics['top1_err'] == pytest.approx(results['last']['top1_err'])
    assert metrics['count'] == 18


# ---- parts of the script ----

def test_digits_split_is_fixed_and_real():
    from timm_moex.train.data import DigitsDataset
    train, test = DigitsDataset(True), DigitsDataset(False)
    assert (len(train), len(test)) == (1437, 360)
    img, label = train[0]
    assert img.size == (32, 32) and img.mode == 'RGB' and 0 <= label < 10
    assert DigitsDataset(True).targets == train.targets  # same split every time


def test_a_failed_cifar_download_is_a_data_error_and_leaves_no_partial_archive(tmp_path, monkeypatch):
    """Offline, torchvision's download ended in urllib's URLError traceback; a cut download left part of the archive
    where the next download would look for it."""
    import urllib.error
    import urllib.request
    from torchvision.datasets import cifar
    from timm_moex.train import load_config
    from timm_moex.train.data import create_datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(101, 'Network is unreachable'))

    monkeypatch.setattr(urllib.request, 'urlopen', offline)
    data = tmp_path / 'data'
    cfg = load_config(['--dataset', 'cifar10', '--data-dir', str(data), '--download', 'true'], check_paths=False)
    with pytest.raises(DataError) as e:
        create_datasets(cfg)
    assert str(e.value) == (f'cifar10: the download failed ([Errno 101] Network is unreachable): download it while '
                            f'online, or put the dataset in {data}')
    assert e.value.exit_code == DataError.exit_code

    def cut(url, root, filename, md5):
        with open(os.path.join(root, filename), 'wb') as f:
            f.write(b'part of the archive')
        raise ConnectionResetError(104, 'Connection reset by peer')

    monkeypatch.setattr(cifar, 'download_and_extract_archive', cut)
    with pytest.raises(DataError, match=r'^cifar10: the download failed \(\[Errno 104\] Connection reset by peer\)'):
        create_datasets(cfg)
    assert os.listdir(data) == []


def test_cifar_recipe_transforms(tmp_path):
    from timm_moex.train import load_config
    from timm_moex.train.data import Cutout, create_transforms
    cfg = load_config(['--dataset', 'digits', '--auto-augment', 'cifar10', '--cutout', '8', '--reprob', '0.5'],
                      check_paths=False)
    train_tf, eval_tf = create_transforms(cfg)
    names = [type(t).__name__ for t in train_tf.transforms]
    assert names == ['RandomCrop', 'RandomHorizontalFlip', 'AutoAugment', 'ToTensor', 'Normalize', 'Cutout',
                     'RandomErasing']
    assert [type(t).__name__ for t in eval_tf.transforms] == ['ToTensor', 'Normalize']
    img = torch.ones(3, 32, 32)
    torch.manual_seed(0)
    cut = Cutout(8)(img)
    holes = (cut == 0).all(0)
    assert 16 <= holes.sum() <= 64 and img.eq(1).all()  # a square of side <= 8, clipped at the border
    rows, cols = holes.any(1).nonzero(), holes.any(0).nonzero()
    assert holes.sum() == len(rows) * len(cols)


def test_imagenet_recipe_uses_timm_create_transform():
    from timm_moex.train import load_config
    from timm_moex.train.data import create_transforms
    cfg = load_config(['--dataset', 'imagefolder', '--img-size', '64', '--aug-recipe', 'imagenet',
                       '--auto-augment', 'rand-m9-mstd0.5', '--reprob', '0.25'], check_paths=False)
    train_tf, eval_tf = create_transforms(cfg)
    names = [type(t).__name__ for t in train_tf.transforms]
    assert 'RandomResizedCropAndInterpolation' in names and 'RandAugment' in names and 'RandomErasing' in names
    x = train_tf(__import__('PIL.Image', fromlist=['Image']).new('RGB', (80, 90)))
    assert x.shape == (3, 64, 64)


def test_metrics_by_hand():
    from timm_moex.train.metrics import ClassificationMeter
    logits = torch.tensor([[4.0, 1.0, 0.5, 0.4, 0.3, 0.2],    # top-1 hit
                           [0.9, 3.0, 0.5, 0.4, 0.3, 0.2],    # rank 2: top-5 hit
                           [0.1, 0.2, 0.3, 0.4, 0.6, 5.0],    # rank 4: top-5 hit
                           [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]])   # rank 6: miss
    target = torch.tensor([0, 0, 2, 0])
    meter = ClassificationMeter(bins=10)
    meter.update(logits[:2], target[:2])
    meter.update(logits[2:], target[2:])
    m = meter.compute()
    assert m['count'] == 4
    assert m['top1_err'] == pytest.approx(75.0)
    assert m['top5_err'] == pytest.approx(25.0)
    assert m['loss'] == pytest.approx(F.cross_entropy(logits, target).item())
    conf = logits.softmax(-1).max(-1).values
    correct = logits.argmax(-1).eq(target).float()
    bins = (conf * 10).long().clamp(max=9)
    ece = sum((conf[bins == b].sum() - correct[bins == b].sum()).abs() for b in bins.unique()) / 4
    assert m['ece'] == pytest.approx(100 * ece.item())


def test_metrics_accumulate_on_the_device_across_batches():
    from timm_moex.train.metrics import ClassificationMeter
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(203, 10, generator=gen)).to(device)
    target = torch.randint(10, (203,), generator=gen).to(device)
    whole, batched = ClassificationMeter(), ClassificationMeter()
    whole.update(logits, target)
    if device == 'cuda':  # updates queue work on the GPU and never wait for it
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
    try:
        for i in range(0, 203, 64):
            batched.update(logits[i:i + 64], target[i:i + 64])
    finally:
        if device == 'cuda':
            torch.cuda.set_sync_debug_mode('default')
    assert batched.sums.device == logits.device
    a, b = whole.compute(), batched.compute()
    assert a['count'] == b['count'] == 203
    for key in ('loss', 'top1_err', 'top5_err', 'ece'):
        assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-9), key
    assert a['top1_err'] == pytest.approx(100 * logits.argmax(-1).ne(target).float().mean().item())
    assert ClassificationMeter().compute() == dict(loss=0.0, top1_err=100.0, top5_err=100.0, ece=0.0, count=0)
    with pytest.raises(ValueError, match='bins=0'):
        ClassificationMeter(bins=0)


def test_sync_bn_keeps_the_moex_hook():
    from timm_moex import get_moex_hook
    from timm_moex.train import load_config
    cfg = load_config(['--model', 'resnet10t', '--moex', '--sync-bn', '--moex-layer', 'bn1'], check_paths=False)
    model = builders.create_model(cfg, num_classes=3)
    assert isinstance(model.bn1, torch.nn.SyncBatchNorm)
    hook = get_moex_hook(model)
    assert hook.layer == 'bn1' and hook.attached and hook._module is model.bn1
    # A *_moex-style model that arrives with its hook: it is re-attached to the converted module.
    model = timm.create_model('resnet10t', num_classes=3)
    attach_moex(model, layer='bn1', norm='in')
    cfg = load_config(['--model', 'resnet10t', '--sync-bn', '--moex'], check_paths=False)
    import unittest.mock as mock
    with mock.patch.object(timm, 'create_model', return_value=model), pytest.warns(UserWarning, match='ignored'):
        model = builders.create_model(cfg, num_classes=3)
    hook = get_moex_hook(model)
    assert hook._module is model.bn1 and hook.norm == 'in' and hook.attached


@pytest.mark.parametrize('model_name, extra', [('resnet10t', ['--moex']), ('resnet18_moex', [])])
def test_moex_impl_reaches_the_hook(model_name, extra):
    from timm_moex import get_moex_hook
    from timm_moex.train import load_config
    for impl in ('torch', 'auto'):
        cfg = load_config(['--model', model_name, '--moex-impl', impl] + extra, check_paths=False)
        assert get_moex_hook(builders.create_model(cfg, num_classes=3)).impl == impl


@pytest.mark.skipif(not (CIFAR10_JPEG / 'train').is_dir(),
                    reason=f'the CIFAR-10 JPEG folder is absent ({CIFAR10_JPEG}; set TIMM_MOEX_CIFAR10_JPEG to an '
                           'unpacked copy of cifar10_jpeg.tar.gz)')
def test_real_cifar10_jpeg_folder_loads():
    from timm_moex.train import load_config
    from timm_moex.train.data import create_datasets
    cfg = load_config(['--config', str(ROOT / 'hparams' / 'cifar10_resnet18_cifar_moex.yaml'), '--model', 'resnet18',
                       '--dataset', 'imagefolder', '--data-dir', str(CIFAR10_JPEG), '--cutout', '16'],
                      check_paths=False)
    train_set, eval_set, num_classes = create_datasets(cfg)
    assert (len(train_set), len(eval_set), num_classes) == (50000, 10000, 10)
    assert train_set.classes[0] == 'airplane'
    x, y = train_set[0]
    assert x.shape == (3, 32, 32) and y == 0
    assert abs(x.mean().item()) < 2


@pytest.mark.slow
def test_imagenet_layout_through_timm_create_dataset(tmp_path):
    data = make_image_folder(tmp_path / 'inet', train_per_class=8, test_per_class=3, size=40)
    (data / 'test').rename(data / 'val')
    out = tmp_path / 'inet_run'
    results = train_moex.main(['--dataset', 'imagenet', '--data-dir', str(data), '--model', 'resnet10t',
                               '--img-size', '32', '--auto-augment', 'rand-m9-mstd0.5', '--reprob', '0.25',
                               '--epochs', '1', '--batch-size', '8', '--workers', '0', '--moex',
                               '--output-dir', str(out), '--progress', 'false'])
    assert results['last']['count'] == 6
    from timm_moex.train.data import FileListDataset, create_datasets
    from timm_moex.train import load_config
    train_set, eval_set, n = create_datasets(load_config(['--dataset', 'imagenet', '--data-dir', str(data)],
                                                         check_paths=False))
    assert isinstance(train_set, FileListDataset) and (len(train_set), len(eval_set), n) == (16, 6, 2)
    assert train_set[0][0].shape == (3, 224, 224)


@pytest.mark.slow
@pytest.mark.parametrize('model', ['pyramidnet110_a48_moex', 'resnet18_cifar'])
def test_package_models_with_a_cifar_recipe(model, image_folder, tmp_path):
    """A paper recipe with this package's models (a *_moex variant brings its own hook)."""
    out = tmp_path / model
    results = train_moex.main(['--config', str(ROOT / 'hparams' / 'cifar10_pyramidnet110_a48_moex.yaml'),
                               '--model', model, '--dataset', 'imagefolder', '--data-dir', str(image_folder),
                               '--epochs', '1', '--batch-size', '8', '--workers', '0', '--moex-prob', '1.0',
                               '--output-dir', str(out), '--progress', 'false'])
    assert results['last']['epoch'] == 1
    base = model.removesuffix('_moex')
    timm.create_model(base, num_classes=2, pretrained=True,
                      pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors')))


@pytest.mark.slow
def test_sigkill_then_resume_auto(run_args, tmp_path):
    """A real kill (SIGKILL) once checkpoint-2 exists; --resume auto ends with the uninterrupted run's metrics."""
    import signal
    import time
    common = ['--moex', '--moex-prob', '0.5', '--batch-size', '4', '--sched', 'step', '--decay-epochs', '1',
              '--epochs', '3']
    full, killed = tmp_path / 'full', tmp_path / 'killed'
    train_moex.main(run_args(*common, out=full))
    proc = subprocess.Popen([sys.executable, str(ROOT / 'train_moex.py'), *run_args(*common, out=killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / 'checkpoint-2').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / 'checkpoint-2').exists()
    train_moex.main(run_args(*common, '--resume', 'auto', out=killed))
    full_rows, killed_rows = read_summary(full), read_summary(killed)
    assert [r['epoch'] for r in killed_rows] == ['1', '2', '3']
    for key in ('train_loss', 'eval_loss', 'eval_top1_err', 'eval_ece', 'lr'):
        assert float(killed_rows[2][key]) == pytest.approx(float(full_rows[2][key]), rel=1e-6, abs=1e-9), key


@pytest.mark.slow
@pytest.mark.parametrize('extra', [['--loss', 'bi_tempered', '--moex', '--moex-prob', '1.0', '--smoothing', '0.1'],
                                   ['--snapmix', '--moex', '--moex-prob', '1.0'],
                                   ['--loss', 'bi_tempered', '--snapmix']])
def test_bi_tempered_loss_and_snapmix_from_the_config(extra, run_args, tmp_path):
    out = tmp_path / 'run'
    results = train_moex.main(run_args(*extra, '--epochs', '1', out=out))
    assert results['last']['epoch'] == 1 and torch.isfinite(torch.tensor(results['last']['train_loss']))
    rows = read_summary(out)
    assert float(rows[0]['train_moex_frac']) == (1.0 if '--moex' in extra else 0.0)


def test_snapmix_refuses_mixing_and_token_models():
    from timm_moex.train import load_config
    with pytest.raises(ConfigError, match='snapmix: SnapMix does its own mixing'):
        load_config(['--snapmix', '--cutmix', '1.0'], check_paths=False)
    with pytest.raises(ConfigError, match='snapmix: '):
        load_config(['--snapmix', '--model', 'vit_tiny_patch16_224'], check_paths=False)
    with pytest.raises(ConfigError, match='bitempered'):
        load_config(['--loss', 'bi_tempered', '--bitempered-t1', '0'], check_paths=False)


@pytest.mark.slow
def test_mixstyle_and_dsu_keys_reach_the_training_forward(run_args, tmp_path, monkeypatch):
    """p 0 trains exactly as without the hooks (no draw either); p 1 changes the training and hooks the
    layers the keys name."""
    small = ['--epochs', '1', '--train-limit', '16', '--eval-limit', '8']
    attached = []
    for name in ('attach_mixstyle', 'attach_dsu'):
        real = getattr(builders, name)
        monkeypatch.setattr(builders, name, lambda *a, _real=real, **k: attached.append(_real(*a, **k)) or
                            attached[-1])

    def train_loss(*extra, out):
        train_moex.main(run_args(*small, *extra, out=tmp_path / out))
        return float(read_summary(tmp_path / out)[0]['train_loss'])

    plain = train_loss(out='plain')
    assert attached == []
    assert train_loss('--mixstyle', '--mixstyle-p', '0', '--dsu', '--dsu-p', '0', out='p0') == plain
    assert train_loss('--mixstyle', '--mixstyle-p', '1', '--mixstyle-layers', '[layer1]', '--dsu', '--dsu-p', '1',
                      out='p1') != plain
    assert [h.layers for h in attached[-2:]] == [('layer1',), ('conv1.0', 'maxpool', 'layer1', 'layer2', 'layer3',
                                                               'layer4')]
    assert [h.p for h in attached[-2:]] == [1.0, 1.0]
