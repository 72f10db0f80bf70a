"""The training configuration: YAML + command line, validated once, with clear errors."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import yaml

from timm_moex.train import ConfigError, DataError, TrainConfig, load_config, read_run_config, save_config, \
    validate_config

from helpers import ROOT

HPARAMS = sorted((ROOT / 'hparams').glob('*.yaml'))


def write_yaml(path: Path, **values) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_yaml_then_command_line_wins(tmp_path):
    f = write_yaml(tmp_path / 'c.yaml', model='resnet10t', lr=0.1, moex=True, decay_milestones=[3, 4])
    cfg = load_config(['--config', f, '--lr', '0.5', '--moex-prob=1', '--decay-milestones', '[5, 6]',
                       '--model_kwargs', '{drop_rate: 0.1}', '--output-dir', '123'], check_paths=False)
    assert cfg.model == 'resnet10t' and cfg.moex is True
    assert cfg.lr == 0.5 and cfg.moex_prob == 1.0 and isinstance(cfg.moex_prob, float)
    assert cfg.decay_milestones == [5, 6] and cfg.model_kwargs == {'drop_rate': 0.1}
    assert cfg.output_dir == '123'
    assert load_config(['--config', f, '--moex', 'false'], check_paths=False).moex is False


def test_bare_flag_sets_a_boolean(tmp_path):
    cfg = load_config(['--model-ema', '--moex'], check_paths=False)
    assert cfg.model_ema is True and cfg.moex is True


def test_effective_config_round_trips(tmp_path):
    cfg = load_config(['--lr', '0.3', '--cutmix', '1.0', '--moex'], check_paths=False)
    save_config(cfg, tmp_path / 'out' / 'config.yaml')
    assert not list((tmp_path / 'out').glob('*.tmp'))
    again = load_config(['--config', str(tmp_path / 'out' / 'config.yaml')], check_paths=False)
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize('argv, match', [
    (['--moex-lamb', '0.5'], r"unknown config key 'moex_lamb' \(command line\); did you mean 'moex_lam'"),
    (['--lr', 'fast'], r"lr: expected a number or null, got 'fast' \(str\)"),
    (['--epochs', '2.5'], r'epochs: expected an integer, got 2.5'),
    (['--moex', 'yes please'], r'moex: expected true/false'),
    (['--moex-lam', '1.5'], r'moex_lam: must be in \[0, 1\], got 1.5'),
    (['--moex-prob', '-0.1'], r'moex_prob: must be in \[0, 1\], got -0.1'),
    (['--smoothing', '2'], r'smoothing: must be in \[0, 1\]'),
    (['--cutmix', '1.0', '--batch-size', '7'], r'batch_size: 7 is odd, but Mixup/CutMix'),
    (['--mixup', '0.2', '--batch-size', '9'], r'batch_size: 9 is odd'),
    (['--model', 'resnet18x'], r"model: timm does not know 'resnet18x'; did you mean 'resnet18'"),
    (['--sched', 'cosin'], r"sched: 'cosin' is not one of .* \(did you mean 'cosine'\?\)"),
    (['--dataset', 'cifar'], r"dataset: 'cifar' is not one of digits, cifar10"),
    (['--moex', '--moex-norm', 'bn'], r'moex_norm: .*bn'),
    (['--batch-size', '0'], r'batch_size: must be positive, got 0'),
    (['--mixed-precision', 'fp8'], r"mixed_precision: 'fp8' is not one of no, fp16, bf16"),
    (['--auto-augment', 'autoaug'], r"auto_augment: 'autoaug' is not a timm policy string"),
    (['--auto-augment', 'rand-foo'], r"auto_augment: 'rand-foo' is not a timm policy string nor 'cifar10': "
                                     r"RandAugment does not read the section 'foo' \(timm would skip it\); its "
                                     r"sections are m<int>, n<int>, p<float>, mstd<float>, mmax<int>, inc<0\|1>, t<"),
    (['--auto-augment', 'augmix-m5-x2'], r"AugMix does not read the section 'x2'.*its sections are m<int>, w<int>"),
    (['--auto-augment', 'original-mstd.5'], r"AutoAugment does not read the section 'mstd.5'"),
    (['--auto-augment', 'rand-tfoo'], r"RandAugment does not read the section 'tfoo'"),
    (['--auto-augment', 'rand-m9x'], r"auto_augment: 'rand-m9x' is not a timm policy string nor 'cifar10': invalid "
                                     r"literal for int\(\)"),
    (['--opt-kwargs', '{bogus_arg: 1}'], r"^opt_kwargs: \{'bogus_arg': 1\} are not accepted by 'sgd': .*unexpected "
                                         r"keyword argument 'bogus_arg'$"),
    (['--opt', 'adamw', '--opt-kwargs', '{eps: -1}'], r"^opt_kwargs: \{'eps': -1\} are not accepted by 'adamw': "
                                                      r"Invalid epsilon value: -1$"),
    (['--opt', 'sdg'], r"opt: 'sdg' is not a timm optimizer; close names: \['sgd'"),
    (['--lr'], r'--lr needs a value'),
    (['--moex', '--moex-layer', 'layer9'], r"moex_layer: layer='layer9' is not a module of ResNet"),
    (['--model-kwargs', '{depthh: 3}'], r"model_kwargs: \{'depthh': 3\} are not accepted by 'resnet18'"),
    (['train.yaml'], r"unexpected command-line argument 'train.yaml'"),
    (['--loader', 'device', '--auto-augment', 'cifar10'], r"loader: 'device' has no AutoAugment"),
    (['--loader', 'device', '--dataset', 'imagefolder'], r"loader: 'device' is for images of at most 64 px, not "
                                                         r"img_size=224"),
    (['--loader', 'gpu'], r"loader: 'gpu' is not one of auto, workers, device"),
    (['--moex-impl', 'cuda'], r"moex_impl: 'cuda' is not one of auto, triton, torch"),
    (['--compile-mode', 'fast'], r"compile_mode: 'fast' is not one of default, reduce-overhead"),
    (['--moex-impl', 'triton', '--compile'], r"moex_impl: 'triton' cannot run under compile: true"),
])
def test_bad_values_are_refused_with_key_value_and_what_is_accepted(argv, match):
    with pytest.raises(ConfigError, match=match):
        load_config(argv, check_paths=False)


@pytest.mark.parametrize('policy', ['cifar10', 'rand-m9-mstd0.5', 'rand-m5-mstd0.5-inc1', 'rand-mstd1-tweights',
                                    'rand', 'original', 'original-mstd0.5', 'v0', 'augmix-m5-w4-d2'])
def test_timm_policy_strings_and_cifar10_are_accepted(policy):
    assert load_config(['--auto-augment', policy], check_paths=False).auto_augment == policy


def test_optimizer_arguments_it_takes_are_accepted():
    cfg = load_config(['--opt', 'adamw', '--opt-kwargs', '{betas: [0.9, 0.99], eps: 1.0e-6}'], check_paths=False)
    assert cfg.opt_kwargs == {'betas': [0.9, 0.99], 'eps': 1e-6}


def test_unknown_yaml_key_names_file_and_suggests(tmp_path):
    f = write_yaml(tmp_path / 'bad.yaml', model='resnet10t', wieght_decay=1e-4)
    with pytest.raises(ConfigError, match=r"unknown config key 'wieght_decay' \(.*bad.yaml\); did you mean "
                                          r"'weight_decay'"):
        load_config(['--config', f], check_paths=False)


def test_yaml_must_be_a_mapping(tmp_path):
    (tmp_path / 'list.yaml').write_text('- a\n- b\n')
    with pytest.raises(ConfigError, match='must hold a mapping'):
        load_config(['--config', str(tmp_path / 'list.yaml')], check_paths=False)
    with pytest.raises(ConfigError, match='no such file'):
        load_config(['--config', str(tmp_path / 'missing.yaml')], check_paths=False)


@pytest.mark.parametrize('content, problem', [
    (b'epochs: [1, 2\n', r"\(line 2, column 1: expected ',' or '\]', but got '<stream end>'\)$"),
    (b'model: resnet10t\n\tepochs: 1\n', r"\(line 2, column 1: found character '\\t' that cannot start any token\)$"),
    (bytes(range(256)) * 4, r'is not a text file \(.*, position \d+\)$'),
], ids=['unclosed-list', 'tab', 'binary'])
def test_a_yaml_file_that_cannot_be_read_is_one_line_naming_the_place(tmp_path, content, problem):
    """A syntax error names its line and column, a binary file is called one (it used to be a UnicodeDecodeError),
    in one line, for --config and for a run folder's config.yaml alike."""
    path = tmp_path / 'c.yaml'
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(['--config', str(path)], check_paths=False)
    assert '\n' not in str(e.value) and re.match(rf"config: '{re.escape(str(path))}' is ", str(e.value)), e.value
    assert re.search(problem, str(e.value)), e.value
    with pytest.raises(ConfigError) as e:
        read_run_config(path)
    assert '\n' not in str(e.value) and str(e.value).startswith(f"resume: '{path}' is "), e.value
    assert str(e.value).endswith('start a new run in another --output-dir'), e.value


def test_config_that_is_a_folder_says_so(tmp_path):
    """--config FOLDER used to say 'no such file'; a run folder's own config.yaml is suggested."""
    with pytest.raises(ConfigError, match=rf"config: '{tmp_path}' is a folder, not a YAML file; give a YAML file or"):
        load_config(['--config', str(tmp_path)], check_paths=False)
    save_config(TrainConfig(), tmp_path / 'config.yaml')
    with pytest.raises(ConfigError, match=rf"is a folder, not a YAML file; give a YAML file \(such as "
                                          rf"'{tmp_path / 'config.yaml'}'\)"):
        load_config(['--config', str(tmp_path)], check_paths=False)


@pytest.mark.parametrize('argv, written', [
    (['--eval-corruptions-severities', '1,5'], '[1,5]'),
    (['--decay-milestones', '150, 225'], '[150,225]'),
    (['--mean', '0.5'], '[0.5]'),  # an Optional list
])
def test_a_list_key_shows_the_list_syntax(argv, written):
    """A list key given as '1,5' is refused as every list key refuses it (values are YAML), showing how a list is
    written; the bracketed form is then accepted."""
    key = argv[0][2:].replace('-', '_')
    with pytest.raises(ConfigError, match=rf"{key}: expected a list of .*; write a list in brackets: "
                                          rf"{re.escape(written)}$"):
        load_config(argv, check_paths=False)
    if key != 'mean':  # a mean needs 3 values
        assert getattr(load_config([argv[0], written], check_paths=False), key) == yaml.safe_load(written)


def test_missing_cifar_names_the_folder_and_the_download_option(tmp_path):
    """A missing dataset is a data error (exit code 7, as the README says), not a configuration error."""
    with pytest.raises(DataError, match=r"no cifar10 files \(.*cifar-10-batches-py\): set download: true"):
        load_config(['--dataset', 'cifar10', '--data-dir', str(tmp_path)])
    cfg = load_config(['--dataset', 'cifar100', '--data-dir', str(tmp_path), '--download',
                       '--output-dir', str(tmp_path / 'o')])
    assert cfg.download


def test_missing_image_folder(tmp_path):
    (tmp_path / 'train').mkdir()
    with pytest.raises(DataError, match=r"data_dir: no test/, val/ or validation/ for dataset='imagefolder' "
                                        r"\(.*\): give --data-dir the folder that holds train/ and test/"):
        load_config(['--dataset', 'imagefolder', '--data-dir', str(tmp_path)])
    assert DataError.exit_code == 7


def test_resume_and_eval_only_paths(tmp_path):
    with pytest.raises(ConfigError, match=r"resume: '.*nowhere' is not a checkpoint folder"):
        load_config(['--resume', str(tmp_path / 'nowhere')])
    with pytest.raises(ConfigError, match='eval_only needs --checkpoint'):
        load_config(['--eval-only'])


def test_hand_built_config_is_type_checked():
    with pytest.raises(ConfigError, match='moex_prob: expected a number'):
        validate_config(TrainConfig(moex_prob='high'), check_paths=False)


@pytest.mark.slow
def test_command_line_error_exits_before_writing(tmp_path):
    out = tmp_path / 'never'
    proc = subprocess.run([sys.executable, str(ROOT / 'train_moex.py'), '--moex-lam', '2', '--output-dir', str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert 'moex_lam: must be in [0, 1], got 2.0' in proc.stderr
    assert not out.exists()
    helped = subprocess.run([sys.executable, str(ROOT / 'train_moex.py'), '--help'], capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0 and '--moex-lam' in helped.stdout


@pytest.mark.parametrize('path', HPARAMS, ids=[p.name for p in HPARAMS])
def test_every_hparams_file_validates(path):
    data = yaml.safe_load(path.read_text())
    assert timm.is_model(data['model']), data['model']
    cfg = load_config(['--config', str(path)], check_paths=False)
    assert cfg.config_file == str(path)


def test_paper_recipes_hold_the_reference_values():
    pyr = {v: yaml.safe_load((ROOT / 'hparams' / f'cifar100_pyramidnet200_{v}.yaml').read_text())
           for v in ('baseline', 'moex', 'cutmix', 'cutmix_moex')}
    for v, d in pyr.items():
        assert (d['batch_size'], d['lr'], d['opt'], d['momentum'], d['weight_decay'], d['epochs']) == \
            (64, 0.25, 'sgd', 0.9, 1e-4, 300), v
        assert d['sched'] == 'multistep' and d['decay_milestones'] == [150, 225] and d['decay_rate'] == 0.1
        assert d['moex'] == ('moex' in v)
        if 'moex' in v:
            assert (d['moex_lam'], d['moex_prob'], d['moex_norm'], d['moex_layer']) == (0.5, 0.25, 'pono', 'stem')
        if 'cutmix' in v:
            assert (d['cutmix'], d['mixup_prob']) == (1.0, 0.5)
    inet = {v: yaml.safe_load((ROOT / 'hparams' / f'imagenet_resnet50_{v}.yaml').read_text())
            for v in ('baseline', 'moex', 'cutmix_moex')}
    for v, d in inet.items():
        assert (d['batch_size'], d['lr_base'], d['lr_base_size'], d['warmup_epochs'], d['sched'], d['epochs']) == \
            (224, 0.1, 256, 5, 'cosine', 300)
    assert (inet['moex']['moex_lam'], inet['moex']['moex_prob']) == (0.9, 1.0)
    assert (inet['cutmix_moex']['moex_lam'], inet['cutmix_moex']['moex_prob'], inet['cutmix_moex']['cutmix'],
            inet['cutmix_moex']['mixup_prob']) == (0.9, 0.25, 1.0, 1.0)


@pytest.mark.parametrize('argv, match', [
    (['--mixstyle', '--mixstyle-p', '1.5'], r'mixstyle_p: must be in \[0, 1\], got 1.5'),
    (['--dsu', '--dsu-p', '-0.1'], r'dsu_p: must be in \[0, 1\], got -0.1'),
    (['--mixstyle', '--mixstyle-alpha', '0'], 'mixstyle_alpha: must be a positive number, got 0'),
    (['--mixstyle', '--mixstyle-mix', 'cross'], r"mixstyle_mix: 'cross' is not one of random, crossdomain "
                                                 r"\(did you mean 'crossdomain'\?\)"),
    (['--mixstyle', '--mixstyle-mix', 'crossdomain', '--batch-size', '7'], 'batch_size: 7 is odd, but mixstyle_mix'),
    (['--dsu', '--dsu-layers', '[]'], 'dsu_layers: give at least one module name'),
    (['--model', 'resnet10t', '--mixstyle', '--mixstyle-layers', '[layer9]'],
     r"mixstyle_layers: layer 'layer9' is not a module of ResNet"),
    (['--model', 'resnet10t', '--dsu', '--dsu-layers', '[layer1, layer1]'], 'dsu_layers: layers name one module twice'),
], ids=['mixstyle_p', 'dsu_p', 'alpha', 'mix', 'odd_batch', 'no_layers', 'unknown_layer', 'twice'])
def test_mixstyle_and_dsu_keys_are_checked(argv, match):
    with pytest.raises(ConfigError, match=match):
        load_config(argv, check_paths=False)


def test_mixstyle_and_dsu_defaults_are_the_authors():
    cfg = load_config(['--mixstyle', '--dsu'], check_paths=False)
    assert (cfg.mixstyle_p, cfg.mixstyle_alpha, cfg.mixstyle_mix, cfg.dsu_p) == (0.5, 0.1, 'random', 0.5)
    assert cfg.mixstyle_layers is None and cfg.dsu_layers is None  # the hooks' defaults (from feature_info)


def test_a_run_config_is_read_whole_or_refused(tmp_path):
    path = tmp_path / 'config.yaml'
    cfg = TrainConfig(moex=True, moex_lam=0.9)
    save_config(cfg, path)
    assert read_run_config(path) == cfg.to_dict()
    data = yaml.safe_load(path.read_text())
    del data['moex_lam']  # read at its default, it would resume another run's settings
    data['moex_lamb'] = 0.9
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"^resume: '.*config.yaml' lacks moex_lam; has unknown keys moex_lamb: "
                                          r'another version of train_moex.py wrote it; resume it with that version, '
                                          r'or start a new run in another --output-dir$'):
        read_run_config(path)
