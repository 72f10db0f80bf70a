"""The MoEx demo (timm_moex.demo.cli): the exchange in pixel and feature space, inputs, the grid and the CLI."""
import importlib.util
import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from timm_moex.demo import cli as demo

# Statistics over these axes of an (H, W, 3) image are the moments each norm exchanges.
NORM_AXES = {'pono': (2,), 'in': (0, 1), 'ln': (0, 1, 2), 'gn3': (0, 1), 'gn-d3': (0, 1, 2)}


def random_image(seed, height=24, width=20):
    return np.random.default_rng(seed).random((height, width, 3), dtype=np.float32)


def pono_normalized(x):
    return (x - x.mean(-1, keepdims=True)) / x.std(-1, ddof=1, keepdims=True)


def save(array, path, mode=None):
    img = Image.fromarray(np.asarray(array))
    (img.convert(mode) if mode else img).save(path)
    return path


@pytest.fixture
def demo_logs(caplog):
    caplog.set_level(logging.INFO, logger='timm_moex.demo.cli')
    return caplog


# ------------------------------------------------------------------------------- pixel space

@pytest.mark.parametrize('norm', sorted(NORM_AXES))
def test_exchanged_images_have_the_donors_moments(norm):
    a, b = random_image(0), random_image(1)
    out = demo.exchange_images(a, b, norm=norm, eps=1e-12)
    axes = NORM_AXES[norm]
    for mixed, donor in ((out['a_with_b_moments'], b), (out['b_with_a_moments'], a)):
        np.testing.assert_allclose(mixed.mean(axes), donor.mean(axes), atol=1e-5)
        np.testing.assert_allclose(mixed.std(axes, ddof=1), donor.std(axes, ddof=1), atol=1e-5)
    assert not np.allclose(out['a_with_b_moments'], a, atol=1e-2)


def test_the_feature_images_normalized_content_is_kept():
    a, b = random_image(2), random_image(3)
    out = demo.exchange_images(a, b, eps=1e-12)
    np.testing.assert_allclose(pono_normalized(out['a_with_b_moments']), pono_normalized(a), atol=1e-3)
    np.testing.assert_allclose(pono_normalized(out['b_with_a_moments']), pono_normalized(b), atol=1e-3)


def test_exchanging_twice_with_swapped_roles_is_consistent():
    a, b = random_image(4), random_image(5)
    ab = demo.exchange_images(a, b, eps=1e-12)
    ba = demo.exchange_images(b, a, eps=1e-12)
    np.testing.assert_allclose(ab['a_with_b_moments'], ba['b_with_a_moments'], atol=1e-6)
    # A's content with B's moments, then given A's moments back, is A again.
    back = demo.exchange_images(ab['a_with_b_moments'], a, eps=1e-12)
    np.testing.assert_allclose(back['a_with_b_moments'], a, atol=1e-4)


def test_moment_maps_are_per_pixel_mean_and_std_over_rgb():
    a, b = random_image(6), random_image(7)
    out = demo.exchange_images(a, b, eps=0.0)
    assert out['mean_a'].shape == out['std_b'].shape == a.shape[:2]
    np.testing.assert_allclose(out['mean_a'], a.mean(-1), atol=1e-6)
    np.testing.assert_allclose(out['std_b'], b.std(-1, ddof=1), atol=1e-6)


def test_results_are_raw_and_the_grid_clips_them_for_display():
    # Blue content on a bright yellow donor: PONO lands above 1 in the blue channel.
    a = np.zeros((2, 2, 3), np.float32)
    a[..., 2] = 1.0
    b = np.ones((2, 2, 3), np.float32)
    b[..., 2] = 0.0
    out = demo.exchange_images(a, b)
    assert out['a_with_b_moments'].max() > 1.2
    grid = demo.render_grid(out)
    assert grid.mode == 'RGB' and grid.width == demo.GRID_COLUMNS * demo.MIN_PANEL_SIDE + 5 * demo.PAD


def test_a_norm_that_does_not_fit_three_channels_names_pixel_space():
    with pytest.raises(demo.DemoError, match='pixel space'):
        demo.exchange_images(random_image(0), random_image(1), norm='gn2')
    with pytest.raises(demo.DemoError, match='bn'):
        demo.exchange_images(random_image(0), random_image(1), norm='bn')


# ------------------------------------------------------------------------------------ inputs

def test_a_moment_image_of_another_size_is_resized_with_a_message(demo_logs):
    a, b = random_image(0, 32, 48), random_image(1, 20, 20)
    out = demo.exchange_images(a, b)
    assert out['b'].shape == out['a_with_b_moments'].shape == (32, 48, 3)
    assert 'resizing the moment image to 48x32' in demo_logs.text
    assert 0.0 <= out['b'].min() and out['b'].max() <= 1.0


def test_same_sizes_need_no_message(demo_logs):
    demo.exchange_images(random_image(0), random_image(1))
    assert 'resizing' not in demo_logs.text


def test_size_fits_the_longer_side_and_keeps_the_aspect():
    a, b = demo.load_pair(random_image(0, 30, 60), random_image(1, 30, 60), size=40)
    assert a.shape == b.shape == (20, 40, 3)


def test_grayscale_and_rgba_files_become_rgb(tmp_path):
    gray = save(np.tile(np.arange(0, 240, 10, dtype=np.uint8), (16, 1)), tmp_path / 'gray.png')
    rgba = np.zeros((16, 24, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :12, 3] = 255  # the right half is fully transparent
    rgba_path = save(rgba, tmp_path / 'rgba.png')

    g = demo.load_image(gray)
    assert g.shape == (16, 24, 3) and np.array_equal(g[..., 0], g[..., 2])
    np.testing.assert_allclose(g[0, 1], 10 / 255, atol=1e-6)
    c = demo.load_image(rgba_path)
    assert c.shape == (16, 24, 3)
    np.testing.assert_allclose(c[0, 0], [200 / 255, 0, 0], atol=1e-6)
    np.testing.assert_allclose(c[0, -1], [1, 1, 1])  # transparent over white

    out = demo.exchange_images(gray, rgba_path)
    assert out['a_with_b_moments'].shape == (16, 24, 3)


def test_a_missing_file_is_named(tmp_path):
    missing = tmp_path / 'no_such_image.png'
    with pytest.raises(FileNotFoundError, match='no_such_image.png') as info:
        demo.exchange_images(missing, random_image(0))
    assert 'feature image' in str(info.value)


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    notes = tmp_path / 'notes.png'
    notes.write_text('not a picture')
    with pytest.raises(demo.DemoError, match='moment image .*notes.png'):
        demo.exchange_images(random_image(0), notes)


# ----------------------------------------------------------------------------- feature space

def test_feature_maps_have_the_stem_resolution_and_exchange_pono_moments():
    a, b = random_image(0, 64, 64), random_image(1, 64, 64)
    maps = demo.feature_maps(a, b, 'resnet18', norm='pono', seed=0)
    assert set(maps) == {f'{s}_{k}' for s in ('mean', 'std')
                         for k in ('a', 'b', 'a_with_b_moments', 'b_with_a_moments')}
    assert all(m.shape == (16, 16) and m.dtype == np.float32 for m in maps.values())  # resnet stem: /4
    np.testing.assert_allclose(maps['mean_a_with_b_moments'], maps['mean_b'], atol=1e-4)
    np.testing.assert_allclose(maps['std_b_with_a_moments'], maps['std_a'], atol=1e-4)
    assert not np.allclose(maps['mean_a'], maps['mean_b'], atol=1e-3)


def test_feature_maps_are_seeded():
    a, b = random_image(0, 32, 32), random_image(1, 32, 32)
    first = demo.feature_maps(a, b, 'resnet18', norm='in', seed=3)
    again = demo.feature_maps(a, b, 'resnet18', norm='in', seed=3)
    other = demo.feature_maps(a, b, 'resnet18', norm='in', seed=4)
    np.testing.assert_array_equal(first['mean_a_with_b_moments'], again['mean_a_with_b_moments'])
    assert not np.allclose(first['mean_a'], other['mean_a'])


def test_unavailable_pretrained_weights_give_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError('Name or service not known')

    monkeypatch.setattr(demo.timm, 'create_model', offline)
    with pytest.raises(demo.PretrainedWeightsError, match="'resnet18'.*without --pretrained|leave out --pretrained"):
        demo.create_feature_model('resnet18', pretrained=True)


# --------------------------------------------------------------------------------------- CLI

def write_pair(tmp_path, size_a=(40, 40), size_b=(40, 40)):
    a = save((random_image(0, *size_a) * 255).astype(np.uint8), tmp_path / 'a.png')
    b = save((random_image(1, *size_b) * 255).astype(np.uint8), tmp_path / 'b.png')
    return str(a), str(b)


@pytest.mark.slow
def test_cli_writes_the_grid_into_a_new_folder(tmp_path, capsys):
    a, b = write_pair(tmp_path, size_b=(30, 50))
    out = tmp_path / 'new' / 'deeper' / 'grid.png'
    assert demo.main([a, b, '-o', str(out), '--size', '64', '--norm', 'in']) == 0
    with Image.open(out) as grid:
        assert grid.format == 'PNG' and grid.mode == 'RGB'
        panel = 2 * 64  # 64 px images are shown at twice their size (MIN_PANEL_SIDE)
        assert grid.width == demo.GRID_COLUMNS * panel + (demo.GRID_COLUMNS + 1) * demo.PAD
        assert 4 * panel < grid.height < 4 * panel + 300
    assert sorted(p.name for p in out.parent.iterdir()) == ['grid.png']  # no temporary file left
    err = capsys.readouterr().err
    assert 'resizing the moment image' in err


@pytest.mark.slow
def test_cli_without_images_uses_the_shipped_samples(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'sklearn' else real_find_spec(name, *a))
    assert demo.main(['--size', '48']) == 0
    assert (tmp_path / 'moex_demo.png').is_file()
    assert 'sample_features.png' in capsys.readouterr().err


@pytest.mark.slow
def test_cli_without_images_uses_scikit_learns_photos(tmp_path, monkeypatch, capsys):
    pytest.importorskip('sklearn')
    feature, moment = demo.default_image_paths()
    assert (feature.name, moment.name) == ('flower.jpg', 'china.jpg')
    assert feature.is_file() and moment.is_file()
    monkeypatch.chdir(tmp_path)
    assert demo.main(['--size', '48']) == 0
    assert 'flower.jpg and china.jpg' in capsys.readouterr().err
    grid = Image.open(tmp_path / 'moex_demo.png')
    assert grid.size[0] > 48 * 4  # four panels a row, each at least the image's width


def test_the_shipped_samples_are_reproducible():
    shipped = demo.sample_image_paths()
    made = demo.make_sample_images()
    assert [p.name for p in shipped] == list(made)
    for path in shipped:
        with Image.open(path) as img:
            assert img.mode == 'RGB' and img.size == (demo.SAMPLE_SIZE, demo.SAMPLE_SIZE)
            assert np.array_equal(np.asarray(img), np.asarray(made[path.name]))
        assert path.stat().st_size < 20_000
    feature = np.asarray(made[demo.SAMPLE_FEATURE_IMAGE], np.float32)
    assert feature.std(-1).min() > 0.05  # colour everywhere, so PONO has content at every pixel


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['missing', 'not an image'])
def test_cli_reports_a_bad_input_file_without_a_traceback(tmp_path, capsys, kind):
    a, _ = write_pair(tmp_path)
    bad = tmp_path / 'bad.png'
    if kind == 'not an image':
        bad.write_bytes(b'\x00\x01 definitely not a png')
    out = tmp_path / 'grid.png'
    assert demo.main([a, str(bad), '-o', str(out)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and 'moment image' in err
    assert not out.exists()


@pytest.mark.slow
def test_cli_reports_unavailable_pretrained_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo.timm, 'create_model', lambda *a, **k: (_ for _ in ()).throw(OSError('offline')))
    a, b = write_pair(tmp_path)
    assert demo.main([a, b, '-o', str(tmp_path / 'g.png'), '--pretrained']) == 1
    err = capsys.readouterr().err
    assert 'could not load pretrained weights' in err and 'offline' in err


@pytest.mark.slow
def test_cli_rejects_unknown_models_and_norms(tmp_path, capsys):
    a, b = write_pair(tmp_path)
    assert demo.main([a, b, '-o', str(tmp_path / 'g.png'), '--model', 'no_such_net']) == 2
    assert 'no_such_net' in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        demo.main([a, b, '--norm', 'bn'])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        demo.main([a])  # one image: features without moments
    assert info.value.code == 2


@pytest.mark.slow
def test_python_dash_m_runs_and_fails_cleanly(tmp_path):
    missing = tmp_path / 'missing.png'
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_moex.demo', str(missing), str(missing), '-o', str(tmp_path / 'g.png')],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and 'Traceback' not in proc.stderr


def test_an_earlier_grid_survives_a_failed_write(tmp_path, monkeypatch):
    out = tmp_path / 'grid.png'
    out.write_bytes(b'earlier grid')
    image = Image.new('RGB', (4, 4))

    def broken_save(*args, **kwargs):
        raise OSError('disk full')

    monkeypatch.setattr(image, 'save', broken_save)
    with pytest.raises(OSError, match='disk full'):
        demo.save_png_atomic(image, out)
    assert out.read_bytes() == b'earlier grid'
    assert [p.name for p in tmp_path.iterdir()] == ['grid.png']
