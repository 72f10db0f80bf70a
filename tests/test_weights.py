"""Local weights in: every file timm's loaders take, the MoEx paper's checkpoints included."""
import json

import pytest
import timm
import torch
from safetensors.torch import save_file

import train_moex
from timm_moex.train.checkpoint import load_initial_weights, load_weights, read_weights
from timm_moex.train import CheckpointError, ConfigError, load_config


def official(model, path, prefix='module.', step=True):
    """A checkpoint as the MoEx paper's code saves it (DataParallel keys, epoch, arch, best error, optimizer)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1 if step else 0.0, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # the optimizer state then holds momentum buffers
    torch.save({'state_dict': {prefix + k: v for k, v in model.state_dict().items()}, 'epoch': 300,
                'arch': 'resnet', 'best_err1': 20.9, 'optimizer': opt.state_dict()}, path)
    return path


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.fixture
def source():
    torch.manual_seed(1)
    return timm.create_model('resnet10t', num_classes=3)


@pytest.mark.parametrize('fmt', ['official', 'safetensors', 'raw.pth', 'model.bin', 'ema_only.pth', 'compiled_ddp',
                                 'folder', 'safetensors_named_pth', 'timm_train_args'])
def test_every_weights_format_loads(fmt, source, tmp_path):
    state = source.state_dict()
    if fmt == 'official':
        path = official(source, tmp_path / 'model_best.pth.tar')
        state = source.state_dict()  # after the optimizer step
    elif fmt == 'safetensors':
        save_file(state, path := tmp_path / 'w.safetensors')
    elif fmt == 'raw.pth':
        torch.save(state, path := tmp_path / 'w.pth')
    elif fmt == 'model.bin':
        torch.save({'model': state, 'epoch': 3}, path := tmp_path / 'pytorch_model.bin')
    elif fmt == 'ema_only.pth':
        torch.save({'state_dict_ema': state}, path := tmp_path / 'ema.pth')
    elif fmt == 'compiled_ddp':
        torch.save({'state_dict': {'_orig_mod.module.' + k: v for k, v in state.items()}}, path := tmp_path / 'c.pth')
    elif fmt == 'folder':
        save_file(state, tmp_path / 'model.safetensors')
        path = tmp_path
    elif fmt == 'safetensors_named_pth':  # the type is read from the bytes, not the name
        save_file(state, path := tmp_path / 'w.pth')
    else:  # a timm train.py checkpoint: args as an argparse.Namespace, allowed by timm's loaders too
        import argparse
        torch.save({'state_dict': state, 'args': argparse.Namespace(model='resnet10t'), 'epoch': 1},
                   path := tmp_path / 'checkpoint-1.pth.tar')
    fresh = timm.create_model('resnet10t', num_classes=3)
    message = load_weights(fresh, path)
    assert str(path) in message and f'{len(state)} tensors' in message
    assert_same_weights(fresh, source)


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'thing': ConfigError('x')}, path)
    with pytest.raises(CheckpointError, match='weights_only=True') as err:
        read_weights(path)
    assert '\n' not in str(err.value)


@pytest.mark.parametrize('content, match', [
    (b'', 'cannot read the file as weights'),
    (b'hello, these are not weights\n', 'cannot read the file as weights'),
    (None, 'cannot read the file as weights'),  # truncated
])
def test_unreadable_file_is_one_clear_line(content, match, source, tmp_path):
    path = tmp_path / 'model_best.pth.tar'
    if content is None:
        official(source, path)
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as err:
        read_weights(path)
    assert '\n' not in str(err.value) and str(path) in str(err.value)


def test_dict_without_weights_names_its_keys(tmp_path):
    torch.save({'epoch': 3, 'best_err1': 1.0}, path := tmp_path / 'x.pth')
    with pytest.raises(CheckpointError, match="no state dict.*'epoch', 'best_err1'"):
        read_weights(path)
    with pytest.raises(CheckpointError, match='holds none of model.safetensors'):
        read_weights(tmp_path)


def test_weights_of_another_model_are_refused(source, tmp_path):
    path = official(source, tmp_path / 'model_best.pth.tar')
    other = timm.create_model('resnet18', num_classes=3)
    with pytest.raises(CheckpointError, match=r'do not fit ResNet: .*missing .*unexpected') as err:
        load_weights(other, path)
    assert '--initial-checkpoint' in str(err.value)
    heads = timm.create_model('resnet10t', num_classes=5)
    with pytest.raises(CheckpointError, match=r'1 missing|2 of another shape \(fc.weight: 3x512 in the file, 5x512'):
        load_weights(heads, path)  # evaluation needs the file's head


def test_initial_weights_drop_a_classifier_of_another_class_count(source, tmp_path):
    path = official(source, tmp_path / 'model_best.pth.tar')
    torch.manual_seed(7)
    model = timm.create_model('resnet10t', num_classes=5)
    fresh_head = {k: v.clone() for k, v in model.fc.state_dict().items()}
    message = load_initial_weights(model, path)
    assert 'classifier re-initialized: fc.weight (3x512 in the file, 5x512 here), fc.bias (3 in the file, 5 here)' \
        in message
    torch.testing.assert_close(model.fc.weight, fresh_head['weight'])  # the new head keeps its fresh init
    for k, v in source.state_dict().items():
        if not k.startswith('fc.'):
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    same = timm.create_model('resnet10t', num_classes=3)
    assert 're-initialized' not in load_initial_weights(same, path)
    assert_same_weights(same, source)
    body = timm.create_model('resnet14t', num_classes=5)  # another body is an error, not a silent partial load
    with pytest.raises(CheckpointError, match='do not fit'):
        load_initial_weights(body, path)


@pytest.mark.slow
def test_eval_only_and_fine_tuning_from_the_papers_format(run_args, tmp_path, capsys):
    out = tmp_path / 'run'
    results = train_moex.main(run_args('--img-size', '32', '--epochs', '1', out=out))
    trained = timm.create_model('resnet10t', num_classes=2)
    load_weights(trained, out)
    ckpt = official(trained.eval(), tmp_path / 'model_best.pth.tar', step=False)
    metrics = train_moex.main(run_args('--img-size', '32', '--eval-only', '--checkpoint', str(ckpt),
                                       out=tmp_path / 'eval'))
    assert metrics['top1_err'] == pytest.approx(results['last']['top1_err'])
    assert metrics['nll'] == pytest.approx(results['last']['loss'], rel=1e-5)
    assert json.loads((tmp_path / 'eval' / 'eval.json').read_text())['nll'] == pytest.approx(metrics['nll'])
    again = train_moex.main(run_args('--img-size', '32', '--eval-only', '--checkpoint', str(out),
                                     out=tmp_path / 'eval2'))  # the run folder itself
    assert again['nll'] == pytest.approx(metrics['nll'], rel=1e-6)
    assert f"checkpoint: loaded 86 tensors from {ckpt} (key 'state_dict')" in capsys.readouterr().out

    # fine-tuning: start from a 3-class file on the 2-class folder
    torch.manual_seed(3)
    three = timm.create_model('resnet10t', num_classes=3)
    src = official(three, tmp_path / 'three.pth.tar')
    train_moex.main(run_args('--img-size', '32', '--epochs', '1', '--lr', '0', '--weight-decay', '0',
                             '--initial-checkpoint', str(src), out=tmp_path / 'ft'))
    log = capsys.readouterr().out
    assert 'classifier re-initialized: fc.weight (3x512 in the file, 2x512 here)' in log
    tuned = timm.create_model('resnet10t', num_classes=2)
    load_weights(tuned, tmp_path / 'ft')
    conv = 'conv1.0.weight'  # lr 0: the body is still the file's
    torch.testing.assert_close(tuned.state_dict()[conv], three.state_dict()[conv], rtol=0, atol=0)


@pytest.mark.slow
def test_bad_files_end_the_command_in_one_line(run_args, tmp_path, capsys):
    bad = tmp_path / 'model_best.pth.tar'
    bad.write_bytes(b'\x80\x02garbage')
    code = train_moex.cli(run_args('--img-size', '32', '--eval-only', '--checkpoint', str(bad), out=tmp_path / 'e'))
    err = capsys.readouterr().err.strip()
    assert code == CheckpointError.exit_code and '\n' not in err and str(bad) in err
    assert not (tmp_path / 'e' / 'eval.json').exists()
    with pytest.raises(ConfigError, match="initial_checkpoint: '.*nope.pth' does not exist"):
        load_config(run_args('--initial-checkpoint', str(tmp_path / 'nope.pth')))
