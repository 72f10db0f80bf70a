"""timm's own train.py, unmodified, trains with MoEx through timm_moex.train.timm_train."""
import csv
import json
import logging
from pathlib import Path

import pytest
import timm
import torch
import yaml
from timm.loss import SoftTargetCrossEntropy

import timm_moex.hooks.moex
from timm_moex.train.checkpoint import load_weights
from timm_moex import attach_moex, get_moex_hook
from timm_moex.train.timm_train import cli, hook_running_model, load_timm_train, main

from helpers import fixture_file

TIMM_TRAIN, needs_train_py = fixture_file('TIMM_TRAIN_PY', "timm's train.py")


@pytest.fixture(autouse=True)
def no_bytecode(monkeypatch):
    monkeypatch.setattr('sys.dont_write_bytecode', True)  # the fixture folder may be read-only


def timm_args(image_folder, out, *extra, epochs=2):
    """A tiny CPU run of timm's train.py: resnet10t at 32 px, 4 batches of 8 per epoch."""
    return ['--timm-train', str(TIMM_TRAIN), '--data-dir', str(image_folder), '--train-split', 'train',
            '--val-split', 'test', '--model', 'resnet10t', '--num-classes', '2', '--img-size', '32', '-b', '8',
            '--epochs', str(epochs), '--device', 'cpu', '-j', '0', '--no-prefetcher', '--lr', '0.01',
            '--output', str(out), '--experiment', 'run', '--seed', '0', *extra]


@pytest.mark.slow
@needs_train_py
def test_timm_train_runs_moex_on_every_batch_and_writes_timms_outputs(image_folder, tmp_path):
    before = sorted(p.name for p in TIMM_TRAIN.parent.iterdir())
    run = main(timm_args(image_folder, tmp_path, '--moex-prob', '1.0', '--moex-lam', '0.7', '--moex-norm', 'in'))
    assert run['train_batches'] == 2 * 4 and run['moex_batches'] == 8  # prob 1: every batch
    task = run['task']
    assert run['pairing'] == task.moex.pairing == 'random' and task.moex.lam == 0.7 and task.hook.norm == 'in'
    # the hook sits on the module of the model that trained
    assert task.get_trainable_module().get_submodule(task.hook.layer) is task.hook._module
    out = tmp_path / 'run'
    assert Path(run['output_dir']) == out
    with open(out / 'summary.csv') as f:
        assert [row['epoch'] for row in csv.DictReader(f)] == ['0', '1']
    args = yaml.safe_load((out / 'args.yaml').read_text())
    assert (args['moex_prob'], args['moex_lam'], args['moex_norm'], args['model']) == (1.0, 0.7, 'in', 'resnet10t')
    assert json.loads((out / 'moex.json').read_text())['moex_batches'] == 8
    for name in ('last.pth.tar', 'model_best.pth.tar', 'checkpoint-1.pth.tar'):
        assert (out / name).is_file()
    model = timm.create_model('resnet10t', num_classes=2)
    load_weights(model, out / 'last.pth.tar')  # timm's checkpoints load as local weights
    assert sorted(p.name for p in TIMM_TRAIN.parent.iterdir()) == before  # nothing written beside train.py


@pytest.mark.slow
@needs_train_py
def test_with_mixup_moex_uses_mixups_pairing_and_the_config_file(image_folder, tmp_path):
    config = tmp_path / 'recipe.yaml'
    config.write_text(yaml.safe_dump(dict(mixup=0.2, cutmix=1.0, moex_prob=0.0, moex_lam=0.6)))
    run = main(timm_args(image_folder, tmp_path, '--config', str(config), epochs=1))
    assert run['pairing'] == run['task'].moex.pairing == 'flip'
    assert isinstance(run['task'].criterion, SoftTargetCrossEntropy)
    assert run['moex_batches'] == 0 and run['train_batches'] == 4 and run['task'].moex.lam == 0.6  # from the YAML
    again = main(timm_args(image_folder, tmp_path / 'cli', '--config', str(config), '--moex-prob', '1', epochs=1))
    assert again['moex_batches'] == again['train_batches'] == 4  # the command line wins
    again['task'].get_trainable_module().train()
    perm = again['task'].draw_perm(6, torch.device('cpu'))
    assert perm.tolist() == [5, 4, 3, 2, 1, 0]


@pytest.mark.slow
@needs_train_py
def test_moex_variant_runs_the_asked_norm_and_records_what_ran(image_folder, tmp_path, monkeypatch, caplog):
    ran = []  # the (norm, eps) of every exchange computed in the run
    exchange = timm_moex.hooks.moex.exchange_parsed

    def spy(x, perm, norm, norm_spec, eps, *args):
        ran.append((norm, eps))
        return exchange(x, perm, norm, norm_spec, eps, *args)

    monkeypatch.setattr(timm_moex.hooks.moex, 'exchange_parsed', spy)
    with caplog.at_level(logging.INFO, logger='timm_moex.train.timm_train'):
        run = main(timm_args(image_folder, tmp_path, '--model', 'resnet18_cifar_moex', '--moex-norm', 'in',
                             '--moex-eps', '0.001', epochs=1))
    assert run['moex_batches'] == run['train_batches'] == 4 and set(ran) == {('in', 0.001)} and len(ran) == 4
    hook = run['task'].hook
    assert hook is get_moex_hook(run['task'].get_trainable_module()) and (hook.norm, hook.eps) == ('in', 0.001)
    record = json.loads((tmp_path / 'run' / 'moex.json').read_text())
    assert (record['moex_norm'], record['moex_eps'], record['moex_layer']) == ('in', 0.001, hook.layer) == \
        (run['moex_norm'], run['moex_eps'], run['moex_layer'])
    assert f"in at '{hook.layer}', eps 0.001" in caplog.text  # the final log line


@needs_train_py
@pytest.mark.parametrize('model', ['resnet10t', 'resnet18_cifar_moex'])
def test_a_bad_layer_is_a_config_error(model, image_folder, tmp_path, capsys):
    assert cli(timm_args(image_folder, tmp_path, '--model', model, '--moex-layer', 'nope', epochs=1)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moex-timm-train: moex_layer: layer='nope' is not a module of ") and '\n' not in err, err
    assert not (tmp_path / 'run').exists()


def test_hook_running_model_gives_a_moex_variant_the_asked_settings():
    model = timm.create_model('resnet18_cifar_moex', num_classes=10).train()
    born = get_moex_hook(model)
    assert (born.norm, born.eps) == ('pono', 1e-5)
    hook = hook_running_model(model, norm='in', eps=1e-3)
    assert hook is get_moex_hook(model) and not born.attached
    assert (hook.layer, hook.norm, hook.eps) == (born.layer, 'in', 1e-3)
    assert hook_running_model(model, norm='in', eps=1e-3) is hook  # asked again: kept
    plain = timm.create_model('resnet18_cifar', num_classes=10).train()
    plain.load_state_dict(model.state_dict())
    expected = attach_moex(plain, norm='in', eps=1e-3)
    x, perm = torch.randn(4, 3, 32, 32), torch.tensor([1, 0, 3, 2])
    hook.arm(perm)
    expected.arm(perm)
    torch.testing.assert_close(model(x), plain(x))  # the exchange that runs is the asked one


@needs_train_py
@pytest.mark.parametrize('where, expected', [
    ('yaml', "unknown MoEx key 'moex_prb' (--config YAML); did you mean 'moex_prob'?"),
    ('command line', "unknown MoEx option '--moex-prb' (command line); did you mean '--moex-prob'?"),
    ('underscores', "unknown MoEx option '--moex_prob' (command line); did you mean '--moex-prob'?"),
])
def test_an_unknown_moex_key_is_refused_with_the_closest_name(where, expected, image_folder, tmp_path, capsys):
    config = tmp_path / 'c.yaml'
    config.write_text(yaml.safe_dump(dict(moex_prb=0.0)))
    extra = dict(yaml=['--config', str(config)], underscores=['--moex_prob=0.0'])
    assert cli(timm_args(image_folder, tmp_path, *extra.get(where, ['--moex-prb', '0.0']), epochs=1)) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and '\n' not in err, err
    assert not (tmp_path / 'run').exists()


@needs_train_py
@pytest.mark.parametrize('extra, code, expected', [
    (['--data-dir', 'MISSING'], 7, 'data_dir: no such folder (MISSING): pass --data-dir the folder'),
    (['--model', 'resnet18_cifar_mox'], 2, "model: timm has no model 'resnet18_cifar_mox'; did you mean "
                                           "'resnet18_cifar_moex'"),
    (['--model', 'no_such_net'], 2, "model: timm has no model 'no_such_net'; timm.list_models"),
])
def test_a_missing_data_dir_or_unknown_model_stops_before_train_py(extra, code, expected, image_folder, tmp_path,
                                                                    capsys):
    missing = str(tmp_path / 'nowhere')
    extra = [missing if a == 'MISSING' else a for a in extra]
    assert cli(timm_args(image_folder, tmp_path, *extra, epochs=1)) == code
    err = capsys.readouterr().err.strip()
    assert expected.replace('MISSING', missing) in err and '\n' not in err, err
    assert not (tmp_path / 'run').exists()


def test_help_lists_the_moex_options_without_train_py(capsys, monkeypatch):
    monkeypatch.delenv('TIMM_TRAIN_PY', raising=False)
    assert cli(['--help']) == 0
    out = capsys.readouterr().out
    for option in ('--moex-prob', '--moex-lam', '--moex-norm', '--moex-layer', '--moex-eps', '--timm-train PATH'):
        assert option in out
    assert 'set TIMM_TRAIN_PY' in out


@needs_train_py
def test_help_lists_the_moex_options_then_train_pys(capsys, tmp_path):
    assert cli(['--timm-train', str(TIMM_TRAIN), '-h']) == 0
    out = capsys.readouterr().out
    assert out.index('--moex-norm') < out.index('--data-dir') and '--model MODEL' in out
    assert cli(['--timm-train', str(tmp_path), '--help']) == 0  # a folder: help still works, and says why
    out = capsys.readouterr().out
    assert '--moex-norm' in out and f"{str(tmp_path)!r} is a folder" in out and '--data-dir' not in out


def test_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv('TIMM_TRAIN_PY', raising=False)
    other = tmp_path / 'train.py'
    other.write_text('def main():\n    pass\n')
    binary = tmp_path / 'weights.py'
    binary.write_bytes(b'\x00\x01 not python')
    exits = tmp_path / 'exits.py'
    exits.write_text('import sys\nsys.exit(3)\n')  # a script that runs on import
    folder = tmp_path / 'timm'
    folder.mkdir()
    cases = [
        ([], "where is timm's train.py"),
        (['--timm-train', str(tmp_path / 'missing.py')], 'no such file'),
        (['--timm-train', str(other)], "is not timm's train.py (it defines no ClassificationTask, _parse_args)"),
        (['--timm-train', str(binary)], 'cannot load'),
        (['--timm-train', str(exits)], 'cannot load'),
        (['--timm-train', str(folder)], f'{str(folder)!r} is a folder; pass --timm-train'),
    ]
    for argv, expected in cases:
        assert cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and '\n' not in err, err


@needs_train_py
@pytest.mark.parametrize('extra, expected', [
    (['--moex-prob', '1.5'], 'moex_prob: must be a number in [0, 1], got 1.5'),
    (['--moex-norm', 'bn'], 'moex_norm:'),
    (['--kd-model-name', 'resnet18'], 'kd_model_name: MoEx runs with the classification task only'),
    (['--jsd-loss', '--aug-splits', '2'], 'jsd_loss:'),
    (['--model-kwargs', 'moex_norm=in'], "model_kwargs: moex_norm would be replaced by this command's MoEx settings; pass --moex-norm"),
    (['--moex-impl', 'cuda'], 'moex_impl: must be one of auto, triton, torch'),
])
def test_bad_moex_settings_stop_before_training(extra, expected, image_folder, tmp_path, capsys):
    assert cli(timm_args(image_folder, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and '\n' not in err
    assert not (tmp_path / 'run').exists()


@needs_train_py
def test_loading_does_not_run_train_py_nor_write_beside_it(monkeypatch):
    monkeypatch.setattr('sys.dont_write_bytecode', False)  # compiled in memory anyway
    before = sorted(p.name for p in TIMM_TRAIN.parent.iterdir())
    module = load_timm_train(TIMM_TRAIN)
    assert module.__name__ != '__main__' and callable(module.main)
    assert module.ClassificationTask.__name__ == 'ClassificationTask'  # patched only inside main()
    assert sorted(p.name for p in TIMM_TRAIN.parent.iterdir()) == before


def test_a_batchnorm_conversion_does_not_orphan_the_hook():
    from timm.layers import convert_splitbn_model
    model = timm.create_model('pyramidnet110_a48_moex', num_classes=10)
    born = get_moex_hook(model)
    assert born.layer == 'bn1'  # a BatchNorm: convert_splitbn_model replaces it
    model = convert_splitbn_model(model, 2).train()
    assert model.bn1 is not born._module
    hook = hook_running_model(model)
    assert hook is get_moex_hook(model) and hook._module is model.bn1 and (hook.layer, hook.norm) == ('bn1', 'pono')
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    plain = model(x)
    hook.arm(torch.tensor([1, 0, 3, 2]))
    torch.manual_seed(0)
    exchanged = model(x)
    assert not hook.armed and not torch.allclose(plain, exchanged)
