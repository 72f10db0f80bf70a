"""CIFAR-10-C-style corruptions and the corruption evaluation: reproducible copies, severities that hurt more
as they grow, an evaluation that matches the clean one when nothing is corrupted, and train_moex.py's outputs."""
import csv
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from timm_moex.train import ConfigError, load_config, resume_differences
from timm_moex.train import corruptions as C
from timm_moex.train.data import create_datasets, create_loaders
from timm_moex.train.device_data import DeviceImageDataset
from timm_moex.train.metrics import evaluate
from timm_moex.train.robustness import clean_images, evaluate_corruptions, summary_line, write_corruption_report

from helpers import CIFAR10_JPEG, ROOT

RANDOM = {'gaussian_noise', 'shot_noise', 'impulse_noise', 'speckle_noise', 'glass_blur', 'motion_blur', 'snow', 'fog',
          'elastic_transform'}


@pytest.fixture(scope='module')
def photos():
    """32x32 crops of real photographs: scikit-learn's two sample photos, whole and in quarters (and the first
    CIFAR-10 test JPEGs when TIMM_MOEX_CIFAR10_JPEG points at them)."""
    from sklearn.datasets import load_sample_images
    images = []
    for a in load_sample_images().images:
        h, w = a.shape[:2]
        crops = [a] + [a[top:top + h // 2, left:left + w // 2] for top in (0, h // 2) for left in (0, w // 2)]
        images += [np.asarray(Image.fromarray(c).resize((32, 32), Image.BILINEAR)) for c in crops]
    if (CIFAR10_JPEG / 'test').is_dir():
        files = sorted((CIFAR10_JPEG / 'test').rglob('*.jp*g'))[:8]
        images += [np.asarray(Image.open(f).convert('RGB')) for f in files]
    return images


def mean_psnr(images, name, severity, copies=3):
    errors = [((C.corrupt(img, name, severity, 100 * k + i).astype(np.float64) - img) ** 2).mean()
              for k, img in enumerate(images) for i in range(copies)]
    return 10 * np.log10(255 ** 2 / np.mean(errors))


# ---------------------------------------------------------------------------------------------
# The corruptions
def test_the_registry():
    assert C.BENCHMARK_AVAILABLE == tuple(n for n in C.BENCHMARK if n != 'frost')  # scipy is a test dependency
    assert set(C.CORRUPTIONS) == set(C.BENCHMARK_AVAILABLE) | {'speckle_noise', 'gaussian_blur', 'saturate'}
    assert set(C.LEFT_OUT) == {'frost', 'spatter'} and set(C.UNAVAILABLE) == set(C.LEFT_OUT)
    usable, unavailable = C.available_corruptions(have_scipy=False)
    assert {'zoom_blur', 'elastic_transform', 'glass_blur', 'defocus_blur', 'snow', 'gaussian_blur'} <= set(unavailable)
    assert {'gaussian_noise', 'motion_blur', 'fog', 'jpeg_compression'} <= set(usable)
    assert 'scipy' in unavailable['zoom_blur']


@pytest.mark.parametrize('name', list(C.CORRUPTIONS))
def test_every_severity_is_reproducible_and_keeps_shape_and_dtype(name, photos):
    img = photos[1]
    for severity in C.SEVERITIES:
        out = C.corrupt(img, name, severity, index=3)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert np.array_equal(out, C.corrupt(img.copy(), name, severity, index=3))  # same seed, same bytes
        assert not np.array_equal(out, img), f'{name} {severity} left the image unchanged'
        other = C.corrupt(img, name, severity, index=4)
        assert np.array_equal(out, other) == (name not in RANDOM), 'another image index: other noise'
        if name in RANDOM:
            assert not np.array_equal(out, C.corrupt(img, name, severity, index=3, seed=1))
    with pytest.raises(ValueError, match='severity must be one of 1-5'):
        C.corrupt(img, name, 6, index=0)


def test_other_image_sizes():
    img = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    for name in C.CORRUPTIONS:
        assert C.corrupt(img, name, 5, index=0).shape == img.shape, name


RAMPS = [n for n in C.CORRUPTIONS if n not in ('glass_blur', 'motion_blur', 'elastic_transform', 'saturate')]


@pytest.mark.parametrize('name', RAMPS)
def test_a_higher_severity_is_further_from_the_clean_image(name, photos):
    psnr = [mean_psnr(photos, name, s) for s in C.SEVERITIES]
    assert all(a > b for a, b in zip(psnr, psnr[1:])), psnr


def test_where_the_published_parameters_are_not_one_ramp(photos):
    """motion_blur 3 -> 4: radius 6 -> 8 at sigma 2 only adds taps of weight exp(-13^2 / 8) < 1e-9, the same
    blur; glass_blur 1-3 differ in blur only (one displacement pass), which averages the displaced pixels back,
    and 4-5 add a second pass; saturate desaturates at 1-2 and oversaturates at 3-5; elastic_transform shrinks
    its affine warp (8 to 3 % of the side) as its displacement field grows, so its pixel error falls."""
    motion = [mean_psnr(photos, 'motion_blur', s) for s in C.SEVERITIES]
    assert motion[0] > motion[1] > motion[2] and motion[3] > motion[4] and abs(motion[2] - motion[3]) < 0.5, motion
    glass = [mean_psnr(photos, 'glass_blur', s) for s in C.SEVERITIES]
    assert min(glass[:3]) > max(glass[3:]) + 1, glass
    saturate = [mean_psnr(photos, 'saturate', s) for s in C.SEVERITIES]
    assert saturate[0] > saturate[1] and saturate[2] > saturate[3] > saturate[4], saturate
    elastic = [mean_psnr(photos, 'elastic_transform', s) for s in C.SEVERITIES]
    assert elastic[0] < elastic[-1] < 30, elastic


@pytest.mark.slow
def test_the_same_copies_in_another_process():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    probe = ('import hashlib, sys, numpy as np; from timm_moex.train.corruptions import CORRUPTIONS, corrupt; '
             'img = np.frombuffer(sys.stdin.buffer.read(), np.uint8).reshape(32, 32, 3); '
             'print(hashlib.sha256(b"".join(corrupt(img, n, 3, 7).tobytes() for n in CORRUPTIONS)).hexdigest())')
    proc = subprocess.run([sys.executable, '-c', probe], input=img.tobytes(), capture_output=True, timeout=300,
                          env=dict(os.environ, PYTHONHASHSEED='123'), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    here = hashlib.sha256(b''.join(C.corrupt(img, n, 3, 7).tobytes() for n in C.CORRUPTIONS)).hexdigest()
    assert proc.stdout.decode().strip() == here


# ---------------------------------------------------------------------------------------------
# The computations against their definitions
def test_zoom_is_scipys_crop_zoom_crop():
    from scipy.ndimage import zoom
    x = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    for factor in [*C._ZOOMS[-1], 1.75, 2.25]:
        crop = int(np.ceil(32 / factor))
        top = (32 - crop) // 2
        grown = zoom(x[top:top + crop, top:top + crop], (factor, factor, 1), order=1)
        trim = (grown.shape[0] - 32) // 2
        np.testing.assert_allclose(C._clipped_zoom(x, factor), grown[trim:trim + 32, trim:trim + 32], atol=1e-6)
    assert [len(z) for z in C._ZOOMS] == [7, 12, 16, 21, 26]  # np.arange's floating-point end points


def test_defocus_kernel_is_a_smoothed_disk():
    """The disk on a 17x17 grid (as for radii up to 8) smoothed by the 3x3 Gaussian of sigma alias_sigma."""
    from scipy.ndimage import correlate
    grid = np.arange(-8, 9)
    for radius, alias_sigma in ((0.3, 0.4), (1.0, 0.2), (1.5, 0.1)):
        disk = (grid[:, None] ** 2 + grid[None, :] ** 2 <= radius ** 2).astype(np.float64)
        g = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_sigma ** 2))
        g /= g.sum()
        expected = correlate(disk / disk.sum(), np.outer(g, g), mode='mirror')
        kernel = C._disk_kernel(radius, alias_sigma)
        pad = (17 - len(kernel)) // 2
        np.testing.assert_allclose(np.pad(kernel, pad), expected, atol=1e-12)


def test_motion_blur_along_the_axes():
    x = np.random.default_rng(0).random((16, 16, 1))
    taps = np.exp(-np.arange(13) ** 2 / (2 * 1.5 ** 2))
    taps /= taps.sum()
    right = sum(t * x[:, np.minimum(np.arange(16) + i, 15)] for i, t in enumerate(taps))
    np.testing.assert_allclose(C._motion_blur(x, 6, 1.5, 0.0), right)
    down = sum(t * x[np.minimum(np.arange(16) + i, 15)] for i, t in enumerate(taps))
    np.testing.assert_allclose(C._motion_blur(x, 6, 1.5, 90.0), down)


def test_glass_blur_displacement_is_the_published_loop(monkeypatch):
    """With the blurs taken out: the released loop, run pixel by pixel from the bottom-right corner with its
    copying 'swap', gives the one gather done here."""
    monkeypatch.setattr(C, '_gaussian', lambda x, sigma: x)
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = C.glass_blur(img, 4, np.random.default_rng(5))
    draws = np.random.default_rng(5)
    x = C._to_uint8(img / 255.0)
    for _ in range(2):
        dy, dx = draws.integers(-1, 1, size=(2, 30, 30))
        for h in range(31, 1, -1):
            for w in range(31, 1, -1):
                x[h, w] = x[h + dy[h - 2, w - 2], w + dx[h - 2, w - 2]]
    assert np.array_equal(out, C._to_uint8(x / 255.0))


def test_hsv_round_trip_matches_matplotlib():
    colors = pytest.importorskip('matplotlib.colors')
    rgb = np.random.default_rng(0).random((8, 8, 3))
    rgb[0, :3] = [[0.5, 0.5, 0.5], [0.2, 0.2, 0.7], [0, 0, 0]]
    np.testing.assert_allclose(C._rgb_to_hsv(rgb), colors.rgb_to_hsv(rgb), atol=1e-12)
    np.testing.assert_allclose(C._hsv_to_rgb(C._rgb_to_hsv(rgb)), rgb, atol=1e-12)


def test_parse_corruptions():
    assert C.parse_corruptions('none') == []
    assert C.parse_corruptions('all') == list(C.BENCHMARK_AVAILABLE)
    assert C.parse_corruptions(' fog, gaussian_noise,fog ') == ['fog', 'gaussian_noise']
    assert C.parse_corruptions('all,saturate')[-1] == 'saturate'
    with pytest.raises(ValueError, match="'gausian_noise' is not a corruption \\(did you mean 'gaussian_noise'"):
        C.parse_corruptions('gausian_noise')
    with pytest.raises(ValueError, match="'spatter' is not available: it is built from OpenCV"):
        C.parse_corruptions('spatter')


# ---------------------------------------------------------------------------------------------
# Configuration
@pytest.mark.parametrize('argv, match', [
    (['--eval-corruptions', 'gausian_noise'], r"eval_corruptions: 'gausian_noise' is not a corruption \(did you "
                                              r"mean 'gaussian_noise'"),
    (['--eval-corruptions', 'fog,frost'], r"eval_corruptions: 'frost' is not available: it needs the frost photographs"),
    (['--eval-corruptions', ','], r"eval_corruptions: ',' names no corruption"),
    (['--eval-corruptions', 'all', '--eval-corruptions-severities', '[0, 3]'],
     r'eval_corruptions_severities: must list distinct severities of 1-5, got \[0, 3\]'),
    (['--eval-corruptions-severities', '[]'], r'eval_corruptions_severities: must list distinct severities'),
    (['--eval-corruptions-severities', '[2, 2]'], r'eval_corruptions_severities: must list distinct severities'),
    (['--eval-corruptions-severities', '3'], r'eval_corruptions_severities: expected a list of integers'),
    (['--eval-corruptions-limit', '-5'], r'eval_corruptions_limit: must be non-negative, got -5'),
    (['--eval-corruptions', 'fog', '--dataset', 'imagefolder'],
     r'eval_corruptions: the CIFAR-10-C corruptions are set for 32 px images, not img_size=224'),
])
def test_bad_values_are_refused(argv, match):
    with pytest.raises(ConfigError, match=match):
        load_config(argv, check_paths=False)


def test_keys_from_the_command_line_and_resume():
    cfg = load_config(['--eval-corruptions', 'gaussian_noise,fog', '--eval-corruptions-severities', '[1, 5]',
                       '--eval-corruptions-limit', '100'], check_paths=False)
    assert (cfg.eval_corruptions, cfg.eval_corruptions_severities, cfg.eval_corruptions_limit) == \
        ('gaussian_noise,fog', [1, 5], 100)
    assert load_config([], check_paths=False).eval_corruptions == 'none'
    assert load_config(['--eval-corruptions', 'all', '--dataset', 'imagefolder', '--img-size', '64'],
                       check_paths=False).eval_corruptions == 'all'
    changes, conflicts = resume_differences(load_config([], check_paths=False).to_dict(), cfg)
    assert set(changes) == {'eval_corruptions', 'eval_corruptions_severities', 'eval_corruptions_limit'}
    assert not conflicts


# ---------------------------------------------------------------------------------------------
# The evaluation
def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(32, 10))


IDENTITY = {'identity': lambda image, severity, rng: image}


@pytest.mark.parametrize('loader', ['workers', 'device'])
def test_an_identity_corruption_gives_the_clean_error(loader):
    from accelerate import Accelerator
    cfg = load_config(['--dataset', 'digits', '--eval-limit', '60', '--loader', loader, '--workers', '0',
                       '--batch-size', '16'], check_paths=False)
    train_set, eval_set, _ = create_datasets(cfg, torch.device('cpu'))
    assert isinstance(eval_set, DeviceImageDataset) == (loader == 'device')
    accelerator = Accelerator(cpu=True)
    model, eval_loader = accelerator.prepare(tiny_model(), create_loaders(cfg, train_set, eval_set)[1])
    clean_err = evaluate(model, eval_loader, accelerator)['top1_err']
    clean = clean_images(eval_set)
    assert clean.images.shape == (60, 32, 32, 3) and clean.images.dtype == np.uint8
    results = evaluate_corruptions(model, clean, ['identity'], [1, 3], accelerator, batch_size=16, registry=IDENTITY)
    assert results['clean_top1_err'] == pytest.approx(clean_err, abs=1e-9)
    assert results['top1_err'] == {'identity': {'1': results['clean_top1_err'], '3': results['clean_top1_err']}}
    assert results['mean_corruption_error'] == pytest.approx(clean_err, abs=1e-9)
    assert results['images'] == 60 and model.training


def test_results_structure_report_and_shares(tmp_path):
    from accelerate import Accelerator
    cfg = load_config(['--dataset', 'digits', '--workers', '0'], check_paths=False)
    _, eval_set, _ = create_datasets(cfg)
    clean = clean_images(eval_set, limit=24)
    assert len(clean.index) == 24 and np.all(np.diff(clean.index) > 0)
    shares = [clean_images(eval_set, limit=24, process_index=r, num_processes=2) for r in range(2)]
    assert sorted(np.concatenate([s.index for s in shares]).tolist()) == clean.index.tolist()
    np.testing.assert_array_equal(shares[1].images, clean.images[1::2])

    results = evaluate_corruptions(tiny_model(), clean, ['gaussian_noise', 'contrast'], [1, 5], Accelerator(cpu=True))
    assert set(results) == {'images', 'seed', 'corruptions', 'severities', 'clean_top1_err', 'top1_err',
                            'mean_top1_err', 'mean_corruption_error', 'not_available', 'note'}
    assert set(results['top1_err']) == {'gaussian_noise', 'contrast'}
    assert all(set(row) == {'1', '5'} and all(0 <= e <= 100 for e in row.values())
               for row in results['top1_err'].values())
    for name, row in results['top1_err'].items():
        assert results['mean_top1_err'][name] == pytest.approx(np.mean(list(row.values())))
    all_errors = [e for row in results['top1_err'].values() for e in row.values()]
    assert results['mean_corruption_error'] == pytest.approx(np.mean(all_errors))
    assert 'frost' in results['not_available'] and 'AlexNet' in results['note']
    assert json.loads(json.dumps(results)) == results
    assert summary_line(results).startswith('corruptions: mean top-1 error ')

    written = write_corruption_report(results, tmp_path)
    with open(tmp_path / 'corruptions.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert rows[0] == {'corruption': 'clean', 'severity': '0', 'top1_err': f"{results['clean_top1_err']:.4f}"}
    assert len(rows) == 1 + 2 * 2
    pytest.importorskip('matplotlib')
    assert tmp_path / 'corruptions.png' in written and (tmp_path / 'corruptions.png').read_bytes()[:4] == b'\x89PNG'
    assert not list(tmp_path.glob('.*tmp'))


# ---------------------------------------------------------------------------------------------
# train_moex.py
@pytest.mark.slow
def test_train_moex_writes_the_corruption_results_and_keeps_the_clean_ones(tmp_path, capsys):
    import train_moex
    common = ['--dataset', 'digits', '--model', 'resnet10t', '--train-limit', '16', '--eval-limit', '8',
              '--epochs', '1', '--batch-size', '8', '--workers', '0', '--seed', '0', '--progress', 'false']
    plain = train_moex.main([*common, '--output-dir', str(tmp_path / 'plain')])
    capsys.readouterr()
    out = tmp_path / 'corrupted'
    results = train_moex.main([*common, '--output-dir', str(out), '--eval-corruptions', 'gaussian_noise',
                               '--eval-corruptions-severities', '[1, 5]'])
    assert 'corruptions: mean top-1 error' in capsys.readouterr().out
    assert results['last'] == plain['last'] and results['best'] == plain['best']
    saved = json.loads((out / 'results.json').read_text())
    assert saved['corruptions'] == results['corruptions']
    assert set(saved['corruptions']['top1_err']['gaussian_noise']) == {'1', '5'}
    assert saved['corruptions']['images'] == 8
    assert saved['corruptions']['clean_top1_err'] == pytest.approx(saved['last']['top1_err'])
    assert (out / 'corruptions.csv').is_file() and 'corruptions' not in plain
    assert not (tmp_path / 'plain' / 'corruptions.csv').exists()

    metrics = train_moex.main([*common, '--eval-only', '--checkpoint', str(out / 'model.safetensors'),
                               '--output-dir', str(tmp_path / 'evalonly'), '--eval-corruptions', 'gaussian_noise',
                               '--eval-corruptions-severities', '[1, 5]'])
    assert metrics['corruptions']['top1_err'] == results['corruptions']['top1_err']
    assert json.loads((tmp_path / 'evalonly' / 'eval.json').read_text())['corruptions'] == metrics['corruptions']


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != 'linux', reason='gloo DDP on CPU tested on Linux')
def test_two_processes_share_the_images_and_sum_to_the_one_process_result(tmp_path):
    """9 images over 2 processes (5 + 4, so the shards differ in length), summed: the one-process evaluation."""
    import train_moex
    out = tmp_path / 'ddp'
    common = ['--dataset', 'digits', '--model', 'resnet10t', '--eval-limit', '9', '--batch-size', '4', '--workers',
              '0', '--progress', 'false', '--eval-corruptions', 'gaussian_noise,pixelate',
              '--eval-corruptions-severities', '[2, 4]']
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0',
           str(ROOT / 'train_moex.py'), *common, '--train-limit', '16', '--epochs', '1', '--output-dir', str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count('corruptions: mean top-1 error') == 1  # one process reports
    ddp = json.loads((out / 'results.json').read_text())['corruptions']
    one = train_moex.main([*common, '--eval-only', '--checkpoint', str(out / 'model.safetensors'),
                           '--output-dir', str(tmp_path / 'one')])['corruptions']
    assert ddp['images'] == one['images'] == 9
    assert ddp['top1_err'] == one['top1_err'] and ddp['clean_top1_err'] == one['clean_top1_err']
