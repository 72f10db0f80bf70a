"""Every file the applications write is whole or absent: one writer, timm_moex.train.files, used by all."""
import os
import pathlib
import stat

import pytest
import timm

from timm_moex.train import checkpoint, files, load_config, model_folder


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_renames_what_the_writer_wrote_by_name(tmp_path):
    target = tmp_path / 'new' / 'weights.bin'  # the folder is created
    with files.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith('.weights.bin.') and not target.exists()
        with open(tmp, 'wb') as f:
            f.write(b'whole')
    assert target.read_bytes() == b'whole' and listing(target.parent) == ['weights.bin']
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # as a plain open, not mkstemp's 0600


def test_a_failed_write_leaves_the_earlier_file_and_no_temporary_one(tmp_path):
    target = tmp_path / 'summary.csv'
    target.write_text('earlier')
    with pytest.raises(OSError, match='disk full'):
        with files.atomic_path(target) as tmp:
            tmp.write_text('half')
            raise OSError('disk full')
    assert target.read_text() == 'earlier' and listing(tmp_path) == ['summary.csv']
    files.atomic_write_text(target, 'new')
    files.atomic_write_bytes(tmp_path / 'b', b'\x00')
    assert target.read_text() == 'new' and (tmp_path / 'b').read_bytes() == b'\x00'
    assert listing(tmp_path) == ['b', 'summary.csv']


def half_then_fail(write):
    """A writer that writes half its content, then fails as a full disk would."""
    def broken(*args, **kwargs):
        write(*args, **kwargs)
        raise OSError('disk full')
    return broken


@pytest.mark.parametrize('writer', ['export_weights', 'truncate_summary', 'write_model_folder'])
def test_the_training_apps_writers_leave_no_half_file(writer, tmp_path, monkeypatch):
    model = timm.create_model('resnet10t', num_classes=2)
    (tmp_path / 'summary.csv').write_text('epoch,loss\r\n1,0.5\r\n2,0.4\r\n')
    checkpoint.export_weights(model, tmp_path / 'model.safetensors')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(OSError, match='disk full'):
        if writer == 'export_weights':
            half = half_then_fail(lambda state, name, **kw: open(name, 'wb').write(b'ha'))
            monkeypatch.setattr(checkpoint, 'save_file', half)
            checkpoint.export_weights(model, tmp_path / 'model.safetensors')
        elif writer == 'truncate_summary':
            write_text = pathlib.Path.write_text
            half = half_then_fail(lambda path, text: write_text(path, text[:5]))
            monkeypatch.setattr(pathlib.Path, 'write_text', half)
            checkpoint.truncate_summary(tmp_path / 'summary.csv', 1)
        else:
            cfg = load_config(['--model', 'resnet10t', '--img-size', '32'], check_paths=False)
            monkeypatch.setattr(model_folder, 'save_config_for_hf',
                                half_then_fail(lambda model, name, **kw: open(name, 'w').write('{')))
            model_folder.write_model_folder(model, tmp_path, cfg)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_truncate_summary_rewrites_the_file_whole(tmp_path):
    (tmp_path / 'summary.csv').write_text('epoch,loss\r\n1,0.5\r\n2,0.4\r\n')
    checkpoint.truncate_summary(tmp_path / 'summary.csv', 1)
    assert (tmp_path / 'summary.csv').read_bytes() == b'epoch,loss\r\n1,0.5\r\n'
    assert listing(tmp_path) == ['summary.csv']
